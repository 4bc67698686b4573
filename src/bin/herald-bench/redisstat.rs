//! Commands a Redis store ran in a phase (`--store-addr`): `INFO commandstats` before and
//! after, over a plain TCP connection (RESP by hand; this tool has no Redis client). Calls
//! per message do not depend on how busy the machine is, unlike CPU time.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::report::ScenarioResult;

/// Per command: (calls, microseconds Redis spent in it).
pub type Stats = BTreeMap<String, (u64, u64)>;

/// `INFO commandstats` of the Redis at `addr`.
pub fn read(addr: SocketAddr) -> Result<Stats, String> {
    let t = Duration::from_secs(2);
    let mut s = TcpStream::connect_timeout(&addr, t).map_err(|e| format!("{addr}: {e}"))?;
    s.set_read_timeout(Some(t)).map_err(|e| e.to_string())?;
    s.write_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
        .map_err(|e| format!("{addr}: {e}"))?;
    let mut r = BufReader::new(s);
    let mut head = String::new();
    r.read_line(&mut head).map_err(|e| format!("{addr}: {e}"))?;
    let len: usize = head
        .strip_prefix('$')
        .and_then(|l| l.trim().parse().ok())
        .ok_or_else(|| format!("{addr}: unexpected reply {head:?}"))?;
    let mut body = vec![0; len + 2];
    r.read_exact(&mut body)
        .map_err(|e| format!("{addr}: {e}"))?;
    Ok(parse(&String::from_utf8_lossy(&body)))
}

/// `cmdstat_hmget:calls=3,usec=10,usec_per_call=3.33,...` lines.
fn parse(text: &str) -> Stats {
    let mut out = Stats::new();
    for line in text.lines() {
        let Some((name, fields)) = line.trim().split_once(':') else {
            continue;
        };
        let Some(cmd) = name.strip_prefix("cmdstat_") else {
            continue;
        };
        let field = |k: &str| {
            fields
                .split(',')
                .find_map(|f| f.strip_prefix(k)?.strip_prefix('=')?.parse::<u64>().ok())
        };
        if let Some(calls) = field("calls") {
            out.insert(cmd.to_string(), (calls, field("usec").unwrap_or(0)));
        }
    }
    out
}

/// What ran between `before` and `after`, per message, as metrics `redis_cmds_per_msg`
/// (all commands), `redis_cmd_usec_per_msg` (Redis's own time in them) and
/// `redis_<command>_per_msg`. The reading itself (one INFO) is not counted.
pub fn report(r: &mut ScenarioResult, before: &Stats, after: &Stats, msgs: u64) {
    report_per(r, before, after, msgs, "msg");
}

/// `report` per `count` of something else: metrics `redis_cmds_per_<unit>`,
/// `redis_cmd_usec_per_<unit>` and `redis_<command>_per_<unit>` (storm: per reconnect,
/// `conn`).
pub fn report_per(r: &mut ScenarioResult, before: &Stats, after: &Stats, count: u64, unit: &str) {
    if count == 0 {
        return;
    }
    let (mut calls, mut usec) = (0u64, 0u64);
    for (cmd, &(c1, u1)) in after {
        let (c0, u0) = before.get(cmd).copied().unwrap_or((0, 0));
        let mut c = c1.saturating_sub(c0);
        if cmd == "info" {
            c = c.saturating_sub(1);
        }
        if c == 0 {
            continue;
        }
        calls += c;
        usec += u1.saturating_sub(u0);
        r.metric(&format!("redis_{cmd}_per_{unit}"), c as f64 / count as f64);
    }
    r.metric(
        &format!("redis_cmds_per_{unit}"),
        calls as f64 / count as f64,
    );
    r.metric(
        &format!("redis_cmd_usec_per_{unit}"),
        usec as f64 / count as f64,
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_commandstats() {
        let s = parse(
            "# Commandstats\r\ncmdstat_hmget:calls=12,usec=30,usec_per_call=2.50,\
             rejected_calls=0,failed_calls=0\r\ncmdstat_evalsha:calls=5,usec=100\r\n",
        );
        assert_eq!(s.get("hmget"), Some(&(12, 30)));
        assert_eq!(s.get("evalsha"), Some(&(5, 100)));
        let mut r = ScenarioResult::new("push", "push");
        let mut after = s.clone();
        after.insert("hmget".into(), (22, 50));
        report(&mut r, &s, &after, 10);
        assert_eq!(r.metrics.get("redis_hmget_per_msg"), Some(&1.0));
        assert_eq!(r.metrics.get("redis_cmds_per_msg"), Some(&1.0));
        assert_eq!(r.metrics.get("redis_cmd_usec_per_msg"), Some(&2.0));
        let mut r = ScenarioResult::new("storm", "storm");
        report_per(&mut r, &s, &after, 5, "conn");
        assert_eq!(r.metrics.get("redis_hmget_per_conn"), Some(&2.0));
        assert_eq!(r.metrics.get("redis_cmds_per_conn"), Some(&2.0));
    }
}
