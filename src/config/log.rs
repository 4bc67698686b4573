//! `[log]`: what is logged and how.

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// tracing filter, e.g. "info" or "herald=debug".
    pub level: String,
    pub format: LogFormat,
    /// Log each connect and clean disconnect at info (at 800k devices they are noise, so
    /// they are at debug unless this is on). Refused CONNECTs are always at info.
    pub connections: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            level: "info".into(),
            format: LogFormat::Text,
            connections: false,
        }
    }
}
