//! Results: the per-run table, the JSON file, `compare` (side-by-side table with the
//! Herald/Mosquitto ratio and the targets of issue 3, and of issue 4 for a durable-store
//! column), `cluster-report` (local against forwarded, the targets of issue 5) and
//! `security-report` (TLS and authentication, issue 10) and `http-report` (issue 15).
//!
//! - here: `ScenarioResult` and `RunFile` (the JSON), `load` (a column of results).
//! - `specs`: which metrics are shown, how, in what order, and their targets.
//! - `table`: the per-run table (`print_run`), value formatting, text and Markdown tables.
//! - `compare`: the side-by-side table of issues 3 and 4.
//! - `cluster`: `cluster-report` (issue 5).
//! - `security`: `security-report` (issue 10).
//! - `http`: `http-report` (issue 15: the HTTP API against MQTT).

mod cluster;
mod compare;
mod http;
mod security;
mod specs;
mod table;

pub use cluster::cluster_report;
pub use compare::compare;
pub use http::{http_report, print_http};
pub use security::security_report;
pub use table::print_run;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// One scenario (variant) of one run against one broker.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ScenarioResult {
    /// idle, push, push-rate, qos0, drain.
    pub scenario: String,
    /// The scenario with its size: idle-10000, qos0-4, ... Columns are matched on it.
    pub variant: String,
    /// Everything was delivered and no connection failed.
    pub ok: bool,
    pub errors: Vec<String>,
    /// Remarks that do not fail the run (e.g. the offered rate was not reached).
    #[serde(default)]
    pub notes: Vec<String>,
    pub params: BTreeMap<String, serde_json::Value>,
    pub metrics: BTreeMap<String, f64>,
}

impl ScenarioResult {
    pub fn new(scenario: &str, variant: impl Into<String>) -> Self {
        ScenarioResult {
            scenario: scenario.into(),
            variant: variant.into(),
            ok: true,
            errors: Vec::new(),
            notes: Vec::new(),
            params: BTreeMap::new(),
            metrics: BTreeMap::new(),
        }
    }

    pub fn param(&mut self, k: &str, v: impl Into<serde_json::Value>) {
        self.params.insert(k.into(), v.into());
    }

    pub fn metric(&mut self, k: &str, v: f64) {
        if v.is_finite() {
            self.metrics.insert(k.into(), v);
        }
    }

    pub fn opt_metric(&mut self, k: &str, v: Option<f64>) {
        if let Some(v) = v {
            self.metric(k, v);
        }
    }

    pub fn error(&mut self, e: impl Into<String>) {
        self.ok = false;
        self.errors.push(e.into());
    }
}

/// The JSON file of one `herald-bench` run.
#[derive(Debug, Serialize, Deserialize)]
pub struct RunFile {
    pub tool: String,
    pub label: String,
    pub broker: String,
    /// Where the publisher connected, when not to `broker` (another node of a cluster).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish_broker: Option<String>,
    /// The first --broker-pid.
    pub broker_pid: Option<u32>,
    /// Every --broker-pid (the nodes of a cluster), in the order given.
    #[serde(default)]
    pub broker_pids: Vec<u32>,
    #[serde(default)]
    pub store_pid: Option<u32>,
    pub unix_time: u64,
    pub results: Vec<ScenarioResult>,
}

/// Loads one column: a JSON file, or every *.json in a directory.
fn load(path: &Path) -> Result<Vec<ScenarioResult>, String> {
    let mut files: Vec<PathBuf> = if path.is_dir() {
        let mut v: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect();
        v.sort();
        v
    } else {
        vec![path.to_path_buf()]
    };
    let mut out = Vec::new();
    for f in files.drain(..) {
        let text = std::fs::read_to_string(&f).map_err(|e| format!("{}: {e}", f.display()))?;
        let run: RunFile =
            serde_json::from_str(&text).map_err(|e| format!("{}: {e}", f.display()))?;
        out.extend(run.results);
    }
    Ok(out)
}
