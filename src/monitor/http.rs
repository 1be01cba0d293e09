//! `http`: one GET per round; the status code, the latency, and optionally an expected
//! status and a substring the body must contain.

use std::sync::Arc;

use serde::Deserialize;
use serde_json::{Value, json};

use super::http_fetch::{Client, FetchError, check_url, split_limits};
use super::{MonitorKind, Probe, Round, RoundError, parse_config};

pub struct Http;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    url: String,
    /// The status the round expects; without it any 2xx or 3xx is ok.
    expected_status: Option<u16>,
    /// A substring the body must contain.
    body_contains: Option<String>,
}

struct HttpProbe {
    config: Config,
    client: Client,
}

impl MonitorKind for Http {
    fn name(&self) -> &'static str {
        "http"
    }

    fn prepare(&self, config: &Value) -> Result<Arc<dyn Probe>, String> {
        let (client, rest) = split_limits(config)?;
        let config: Config = parse_config(&rest)?;
        check_url("url", &config.url)?;
        if let Some(status) = config.expected_status
            && !(100..=599).contains(&status)
        {
            return Err(format!("expected_status: {status} is not an HTTP status"));
        }
        Ok(Arc::new(HttpProbe { config, client }))
    }
}

impl Probe for HttpProbe {
    fn round(&self, _state: &Value) -> Round {
        Round {
            outcome: self.check(),
            state: Value::Null,
            panic: None,
        }
    }
}

impl HttpProbe {
    fn check(&self) -> Result<Value, RoundError> {
        let url = &self.config.url;
        let fetched = self.client.get(url).map_err(|e| match e {
            FetchError::Unreachable(m) => RoundError::new("unreachable", format!("{url}: {m}")),
            FetchError::BadAnswer(m) => RoundError::new("bad_response", format!("{url}: {m}")),
        })?;
        let status_ok = match self.config.expected_status {
            Some(want) => fetched.status == want,
            None => (200..400).contains(&fetched.status),
        };
        if !status_ok {
            let want = self
                .config
                .expected_status
                .map_or("2xx or 3xx".to_owned(), |s| s.to_string());
            return Err(RoundError::new(
                "unexpected_status",
                format!("{url} answered {} (expected {want})", fetched.status),
            ));
        }
        if let Some(needle) = &self.config.body_contains
            && !fetched.body.contains(needle.as_str())
        {
            return Err(RoundError::new(
                "body_mismatch",
                format!("{url}: the body does not contain {needle:?}"),
            ));
        }
        Ok(json!({
            "url": url,
            "status": fetched.status,
            "latency_ms": crate::pool::round_ms(fetched.latency),
            "bytes": fetched.body.len(),
        }))
    }
}
