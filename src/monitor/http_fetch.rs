//! The one way monitors make HTTP calls: a connect timeout, a total timeout and a cap on
//! the response size, each overridable in a monitor's config (SPEC "Monitors").

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Deserialize;
use ureq::unversioned::resolver::{ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{DefaultConnector, NextTimeout};

/// Defaults of SPEC: connect 3 s, total 10 s, responses up to 8 MiB.
pub const DEFAULT_CONNECT_TIMEOUT: f64 = 3.0;
pub const DEFAULT_TIMEOUT: f64 = 10.0;
pub const DEFAULT_MAX_RESPONSE_BYTES: u64 = 8 << 20;

/// The limits fields every HTTP-using config accepts.
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Seconds to establish the connection.
    #[serde(default = "default_connect")]
    pub connect_timeout: f64,
    /// Seconds for the whole call, connection to last byte.
    #[serde(default = "default_timeout")]
    pub timeout: f64,
    #[serde(default = "default_max")]
    pub max_response_bytes: u64,
}

fn default_connect() -> f64 {
    DEFAULT_CONNECT_TIMEOUT
}
fn default_timeout() -> f64 {
    DEFAULT_TIMEOUT
}
fn default_max() -> u64 {
    DEFAULT_MAX_RESPONSE_BYTES
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            timeout: DEFAULT_TIMEOUT,
            max_response_bytes: DEFAULT_MAX_RESPONSE_BYTES,
        }
    }
}

impl LimitsConfig {
    /// Checks the values and builds a client with them.
    pub fn client(&self) -> Result<Client, String> {
        let secs = |field: &str, v: f64| {
            if v.is_finite() && v > 0.0 && v <= 3600.0 {
                Ok(Duration::from_secs_f64(v))
            } else {
                Err(format!(
                    "{field} must be a number of seconds above 0 and at most 3600, not {v}"
                ))
            }
        };
        let connect = secs("connect_timeout", self.connect_timeout)?;
        let total = secs("timeout", self.timeout)?;
        if self.max_response_bytes == 0 {
            return Err("max_response_bytes must be above 0".into());
        }
        Ok(Client {
            agent: shared_agent(connect, total),
            max_bytes: self.max_response_bytes,
        })
    }
}

/// Agents by (connect, total) timeout. Monitors with the same timeouts share one agent and
/// its connection pool (at most `MAX_IDLE_CONNECTIONS` idle sockets), so a thousand
/// monitors of keep-alive servers do not hold a thousand sockets open. Locked only when a
/// config is validated, never during a round.
static AGENTS: Mutex<BTreeMap<(Duration, Duration), ureq::Agent>> = Mutex::new(BTreeMap::new());

/// Idle keep-alive connections one agent keeps.
const MAX_IDLE_CONNECTIONS: usize = 16;

fn shared_agent(connect: Duration, total: Duration) -> ureq::Agent {
    let mut agents = AGENTS.lock().unwrap_or_else(|e| e.into_inner());
    agents
        .entry((connect, total))
        .or_insert_with(|| {
            let config = ureq::Agent::config_builder()
                .timeout_connect(Some(connect))
                .timeout_global(Some(total))
                // A status is data for the monitor, not a transport error.
                .http_status_as_error(false)
                .max_redirects(3)
                .max_idle_connections(MAX_IDLE_CONNECTIONS)
                .user_agent(concat!("snapq/", env!("CARGO_PKG_VERSION")))
                .build();
            ureq::Agent::with_parts(config, DefaultConnector::new(), OnThisThread)
        })
        .clone()
}

/// Name resolution on the calling thread. ureq's own resolver, with a timeout set, starts
/// a thread for every lookup, even of `127.0.0.1`: with 1,000 monitors that was 100
/// threads started a second and 7% of the foreman's CPU, and it broke the bound on the
/// foreman's threads (invariant 6). An IP address in the URL is used as it is; a host name
/// is looked up with the system resolver on the worker, so a slow DNS server can make a
/// round last longer than its `timeout` (by the resolver's own timeout, 5 s by default in
/// resolv.conf).
#[derive(Debug, Default)]
struct OnThisThread;

impl Resolver for OnThisThread {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        _config: &ureq::config::Config,
        _timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        let host = uri
            .host()
            .map(|h| h.trim_start_matches('[').trim_end_matches(']'))
            .ok_or(ureq::Error::HostNotFound)?;
        let port = uri
            .port_u16()
            .or_else(|| match uri.scheme_str() {
                Some("https") => Some(443),
                Some("http") => Some(80),
                _ => None,
            })
            .ok_or(ureq::Error::HostNotFound)?;
        let mut addrs = self.empty();
        if let Ok(ip) = host.parse::<IpAddr>() {
            addrs.push(SocketAddr::new(ip, port));
            return Ok(addrs);
        }
        for addr in (host, port).to_socket_addrs()?.take(16) {
            addrs.push(addr);
        }
        if addrs.is_empty() {
            return Err(ureq::Error::HostNotFound);
        }
        Ok(addrs)
    }
}

/// A reusable HTTP client with the monitor's limits (connections are kept alive between
/// rounds).
#[derive(Debug, Clone)]
pub struct Client {
    agent: ureq::Agent,
    max_bytes: u64,
}

/// What a GET brought back.
#[derive(Debug)]
pub struct Fetched {
    pub status: u16,
    pub body: String,
    pub latency: Duration,
}

/// Why a GET failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FetchError {
    /// No answer: refused, unreachable, unresolvable, or timed out.
    Unreachable(String),
    /// An answer that cannot be used: not HTTP, too large, not text.
    BadAnswer(String),
}

impl Client {
    pub fn get(&self, url: &str) -> Result<Fetched, FetchError> {
        self.get_until(url, None)
    }

    /// `get`, ended by `deadline` if that comes before the client's own total timeout: a
    /// round that tries several sources stays within its own time (`round_timeout`).
    pub fn get_until(&self, url: &str, deadline: Option<Instant>) -> Result<Fetched, FetchError> {
        let started = Instant::now();
        let request = self.agent.get(url);
        let call = match deadline {
            Some(deadline) => {
                let left = deadline.saturating_duration_since(started);
                if left.is_zero() {
                    return Err(FetchError::Unreachable("the round's time ran out".into()));
                }
                let total = self
                    .agent
                    .config()
                    .timeouts()
                    .global
                    .map_or(left, |t| t.min(left));
                request.config().timeout_global(Some(total)).build().call()
            }
            None => request.call(),
        };
        let mut response = call.map_err(classify)?;
        let status = response.status().as_u16();
        let body = response
            .body_mut()
            .with_config()
            .limit(self.max_bytes)
            .read_to_string()
            .map_err(classify)?;
        Ok(Fetched {
            status,
            body,
            latency: started.elapsed(),
        })
    }
}

fn classify(e: ureq::Error) -> FetchError {
    use ureq::Error as E;
    match e {
        E::Timeout(what) => FetchError::Unreachable(format!("timed out ({what})")),
        E::Io(io) => match io.kind() {
            std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock => {
                FetchError::Unreachable(format!("timed out ({io})"))
            }
            std::io::ErrorKind::InvalidData => FetchError::BadAnswer(format!("not text: {io}")),
            _ => FetchError::Unreachable(format!("connection failed ({io})")),
        },
        E::ConnectionFailed | E::HostNotFound => FetchError::Unreachable(e.to_string()),
        E::BodyExceedsLimit(limit) => FetchError::BadAnswer(format!(
            "the response is larger than {limit} bytes (max_response_bytes)"
        )),
        other => FetchError::BadAnswer(format!("not a usable HTTP answer: {other}")),
    }
}

/// The names of the limit fields, which every HTTP-using config accepts at its top level.
const LIMIT_FIELDS: [&str; 3] = ["connect_timeout", "timeout", "max_response_bytes"];

/// Splits a config object into its limit fields (checked, with defaults) and the rest, so
/// that each kind parses only its own fields and still refuses unknown ones.
pub fn split_limits(config: &serde_json::Value) -> Result<(Client, serde_json::Value), String> {
    let object = config
        .as_object()
        .ok_or_else(|| format!("the config must be a JSON object, not {config}"))?;
    let (limits, rest): (serde_json::Map<_, _>, serde_json::Map<_, _>) = object
        .clone()
        .into_iter()
        .partition(|(k, _)| LIMIT_FIELDS.contains(&k.as_str()));
    let limits: LimitsConfig = super::parse_config(&serde_json::Value::Object(limits))?;
    Ok((limits.client()?, serde_json::Value::Object(rest)))
}

/// Checks that a URL is http(s) with a host, for config validation.
pub fn check_url(field: &str, url: &str) -> Result<(), String> {
    let rest = url
        .strip_prefix("http://")
        .or_else(|| url.strip_prefix("https://"))
        .ok_or_else(|| format!("{field}: {url:?} is not an http:// or https:// URL"))?;
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    if host.is_empty() || host.contains(char::is_whitespace) {
        return Err(format!("{field}: {url:?} has no host"));
    }
    url.parse::<ureq::http::Uri>()
        .map(drop)
        .map_err(|e| format!("{field}: {url:?} is not a valid URL ({e})"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(url: &str) -> Result<Vec<SocketAddr>, ureq::Error> {
        let uri: ureq::http::Uri = url.parse().unwrap();
        let config = ureq::Agent::config_builder().build();
        OnThisThread
            .resolve(&uri, &config, NextTimeout::default())
            .map(|a| a.iter().copied().collect())
    }

    #[test]
    fn literals_are_used_as_they_are_and_names_are_looked_up_here() {
        assert_eq!(
            resolve("http://127.0.0.1:9100/metrics").unwrap(),
            vec!["127.0.0.1:9100".parse().unwrap()]
        );
        assert_eq!(
            resolve("https://[::1]/x").unwrap(),
            vec!["[::1]:443".parse().unwrap()]
        );
        let local = resolve("http://localhost:8080/").unwrap();
        assert!(
            local
                .iter()
                .all(|a| a.ip().is_loopback() && a.port() == 8080),
            "{local:?}"
        );
        assert!(resolve("http://no-such-host.invalid/").is_err());
    }

    /// Resolving starts no thread (ureq's default resolver starts one for each lookup with
    /// a timeout). Counted
    /// in a process of its own, where no other test starts or ends threads meanwhile.
    #[test]
    fn resolving_starts_no_thread() {
        const CHILD: &str = "SNAPQ_TEST_COUNT_THREADS";
        if std::env::var_os(CHILD).is_some() {
            let threads_before = std::fs::read_dir("/proc/self/task").unwrap().count();
            for _ in 0..20 {
                resolve("http://localhost:8080/").unwrap();
            }
            assert_eq!(
                std::fs::read_dir("/proc/self/task").unwrap().count(),
                threads_before
            );
            return;
        }
        let status = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "monitor::http_fetch::tests::resolving_starts_no_thread",
            ])
            .args(["--test-threads", "1", "--quiet"])
            .env(CHILD, "1")
            .stdout(std::process::Stdio::null())
            .status()
            .unwrap();
        assert!(status.success());
    }

    #[test]
    fn urls_are_checked() {
        assert!(check_url("url", "http://example.com/x").is_ok());
        assert!(check_url("url", "https://10.0.0.1:6688/metrics").is_ok());
        for bad in ["ftp://x", "http://", "example.com", "http:// x/"] {
            assert!(check_url("url", bad).is_err(), "{bad}");
        }
    }
}
