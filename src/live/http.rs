//! The live view's HTTP side: an acceptor thread and one short-lived thread a request, at most
//! `Limits::max_connections` connections at once (WebSockets included). A request head is
//! parsed with httparse; plain requests get one response and the connection closes;
//! `/events` upgrades to a WebSocket, handed to the one thread that serves them all
//! (src/live/ws.rs).
//!
//! Routes: `/` (the page), `/api/status` (`snapq status --json`), `/api/monitors`
//! (`snapq monitor list --json` without the configs), `/api/schedules` (`snapq schedule
//! list --json`), `/api/tasks/<id>` (`snapq show ID
//! --json`: a task's record), `/api/series` (the page's charts: the last 15 minutes of
//! heartbeat samples), `/metrics`, `/events`.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::{IpAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, unbounded};
use parking_lot::Mutex;
use serde::Serialize;

use super::LiveConfig;
use super::Tally;
use super::hub::HubHandle;
use super::metrics::{self, DbFigures};
use super::ws::Upgraded;
use crate::clock::now_micros;
use crate::db::{self, Synchronous};
use crate::error::{Error, Result};

/// The page, embedded: no build step, no CDN.
const PAGE: &str = include_str!("page.html");

/// The longest request head accepted.
const MAX_HEAD: usize = 16 * 1024;

/// How long a client may take to take a response.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// How long a client may take to send its whole request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// The share of `max_connections` one client address may hold at once (a quarter), so
/// that one peer cannot take every slot. Everybody who comes through an SSH tunnel shares
/// 127.0.0.1's share.
const PER_ADDRESS_SHARE: usize = 4;

/// Connection threads need little stack: parsing, a database read, a response.
const CONNECTION_STACK: usize = 256 * 1024;

pub(crate) struct Server {
    pub config: LiveConfig,
    pub hub: HubHandle,
    /// Set by `Live::stop`; the acceptor and the WebSocket thread read it.
    pub stopping: Arc<AtomicBool>,
    /// Connections being served now, WebSockets included; bounded by `max_connections`.
    active: AtomicUsize,
    /// Connections being served now by peer address, WebSockets included; each bounded by
    /// `max_connections / PER_ADDRESS_SHARE`. Taken by the acceptor to count a new
    /// connection in, and by a connection's end (its thread's, or the WebSocket thread's)
    /// to count it out; held for a map update only.
    per_address: Mutex<HashMap<IpAddr, usize>>,
    /// Upgraded sockets, to the WebSocket thread.
    upgraded: Sender<Upgraded>,
    /// Numbers WebSocket clients for the hub.
    next_client: AtomicU64,
    /// The producers' own figures, for `/metrics`.
    pub tally: Arc<Tally>,
}

impl Server {
    pub fn new(
        config: LiveConfig,
        hub: HubHandle,
        stopping: Arc<AtomicBool>,
        tally: Arc<Tally>,
    ) -> (Server, Receiver<Upgraded>) {
        // Unbounded: at most `max_connections` sockets are ever in flight.
        let (upgraded, websockets) = unbounded();
        let server = Server {
            config,
            hub,
            stopping,
            active: AtomicUsize::new(0),
            per_address: Mutex::new(HashMap::new()),
            upgraded,
            next_client: AtomicU64::new(1),
            tally,
        };
        (server, websockets)
    }

    /// Counts a new connection from `peer` in, unless that address holds its share of
    /// the slots already or every slot is taken.
    fn admit(&self, peer: IpAddr) -> bool {
        let share = (self.config.limits.max_connections / PER_ADDRESS_SHARE).max(1);
        let mut per_address = self.per_address.lock();
        let held = per_address.entry(peer).or_insert(0);
        if *held >= share {
            return false;
        }
        if self.active.fetch_add(1, Ordering::SeqCst) >= self.config.limits.max_connections {
            self.active.fetch_sub(1, Ordering::SeqCst);
            return false;
        }
        *held += 1;
        true
    }

    /// A connection from `peer` ended (a request served, or a WebSocket closed).
    pub fn release_connection(&self, peer: IpAddr) {
        self.active.fetch_sub(1, Ordering::SeqCst);
        let mut per_address = self.per_address.lock();
        if let Some(held) = per_address.get_mut(&peer) {
            *held -= 1;
            if *held == 0 {
                per_address.remove(&peer);
            }
        }
    }

    /// Hands an upgraded socket to the WebSocket thread, which then holds the connection's
    /// count (the request's thread releases it when it ends, so it is counted again here).
    fn hand_over(&self, stream: TcpStream, rest: Vec<u8>, peer: IpAddr) {
        self.active.fetch_add(1, Ordering::SeqCst);
        *self.per_address.lock().entry(peer).or_insert(0) += 1;
        if self.upgraded.send(Upgraded { stream, rest, peer }).is_err() {
            self.release_connection(peer);
            return;
        }
        self.hub.feed.wake();
    }

    pub fn next_client_id(&self) -> u64 {
        self.next_client.fetch_add(1, Ordering::Relaxed)
    }

    /// Starts the acceptor thread and the WebSocket thread.
    pub fn start(
        listener: TcpListener,
        server: Arc<Server>,
        websockets: Receiver<Upgraded>,
    ) -> Result<[JoinHandle<()>; 2]> {
        let ws = super::ws::start(Arc::clone(&server), websockets)?;
        let acceptor = std::thread::Builder::new()
            .name("snapq-live-http".into())
            .spawn(move || accept(&listener, &server))
            .map_err(|e| {
                Error::Runtime(format!("cannot start the live view's HTTP thread: {e}"))
            })?;
        Ok([acceptor, ws])
    }
}

fn accept(listener: &TcpListener, server: &Arc<Server>) {
    super::lower_priority();
    for stream in listener.incoming() {
        if server.stopping.load(Ordering::SeqCst) {
            return;
        }
        let mut stream = match stream {
            Ok(stream) => stream,
            Err(e) => {
                tracing::warn!("live view: accepting a connection failed: {e}");
                // Out of file descriptors, say: do not spin.
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
        };
        let Ok(peer) = stream.peer_addr().map(|a| a.ip()) else {
            continue;
        };
        if !server.admit(peer) {
            let _ = stream.set_write_timeout(Some(Duration::from_secs(1)));
            let _ = respond(
                &mut stream,
                503,
                "text/plain; charset=utf-8",
                &[("Retry-After", "5")],
                b"too many connections to the live view; try again shortly\n",
            );
            // Take what the client has sent so far, without waiting for more: closing a
            // socket with unread bytes resets it, and a reset may discard the answer
            // before the client reads it.
            let _ = stream.shutdown(std::net::Shutdown::Write);
            if stream.set_nonblocking(true).is_ok() {
                let mut sink = [0u8; 4096];
                while matches!(stream.read(&mut sink), Ok(n) if n > 0) {}
            }
            continue;
        }
        let shared = Arc::clone(server);
        let spawned = std::thread::Builder::new()
            .name("snapq-live-conn".into())
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                super::lower_priority();
                serve(stream, &shared, peer);
                shared.release_connection(peer);
            });
        if let Err(e) = spawned {
            tracing::warn!("live view: cannot start a connection thread: {e}");
            server.release_connection(peer);
        }
    }
}

/// A parsed request head: what routing needs.
struct Request {
    method: String,
    path: String,
    query: String,
    headers: Vec<(String, String)>,
    /// Bytes read past the head (a WebSocket client may send its first frame at once).
    rest: Vec<u8>,
}

impl Request {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn query_param(&self, name: &str) -> Option<&str> {
        self.query.split('&').find_map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (k == name).then_some(v)
        })
    }
}

fn serve(mut stream: TcpStream, server: &Server, peer: IpAddr) {
    let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
    let _ = stream.set_nodelay(true);
    let request = match read_head(&mut stream) {
        Ok(Some(request)) => request,
        Ok(None) => return,
        Err((status, message)) => {
            let _ = respond(&mut stream, status, TEXT, &[], message.as_bytes());
            return;
        }
    };
    if let Err(e) = route(stream, request, server, peer) {
        tracing::debug!("live view: a connection ended with an error: {e}");
    }
}

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";

fn route(
    mut stream: TcpStream,
    request: Request,
    server: &Server,
    peer: IpAddr,
) -> std::io::Result<()> {
    // Before anything else, the token included: a page on a name that resolves to this
    // machine (DNS rebinding) must learn nothing, not even that a token is wanted.
    if let Some(problem) = foreign_host(&request, &server.config.allow_hosts) {
        return respond(&mut stream, 421, TEXT, &[], problem.as_bytes());
    }
    if let Some(expected) = &server.config.token
        && !authorized(&request, expected)
    {
        return respond(
            &mut stream,
            401,
            TEXT,
            &[("WWW-Authenticate", "Bearer realm=\"snapq\"")],
            b"a token is required: add ?token=TOKEN to the URL or send \
                  Authorization: Bearer TOKEN (the foreman's --http-token)\n",
        );
    }
    if request.method != "GET" {
        return respond(
            &mut stream,
            405,
            TEXT,
            &[("Allow", "GET")],
            b"only GET is served here\n",
        );
    }
    match request.path.as_str() {
        "/" | "/index.html" => respond(
            &mut stream,
            200,
            "text/html; charset=utf-8",
            &[],
            PAGE.as_bytes(),
        ),
        "/api/status" => match status_json(server) {
            Ok(body) => respond(&mut stream, 200, JSON, &[], body.as_bytes()),
            Err(e) => respond(&mut stream, 503, TEXT, &[], format!("{e}\n").as_bytes()),
        },
        "/api/schedules" => match schedules_json(server) {
            Ok(body) => respond(&mut stream, 200, JSON, &[], body.as_bytes()),
            Err(e) => respond(&mut stream, 503, TEXT, &[], format!("{e}\n").as_bytes()),
        },
        "/api/monitors" => match monitors_json(server) {
            Ok(body) => respond(&mut stream, 200, JSON, &[], body.as_bytes()),
            Err(e) => respond(&mut stream, 503, TEXT, &[], format!("{e}\n").as_bytes()),
        },
        "/api/series" => {
            // Copied out under the lock, serialised after it.
            let series: Vec<_> = server.hub.counters.lock().series.iter().copied().collect();
            match to_json(&series) {
                Ok(body) => respond(&mut stream, 200, JSON, &[], body.as_bytes()),
                Err(e) => respond(&mut stream, 503, TEXT, &[], format!("{e}\n").as_bytes()),
            }
        }
        path if path.starts_with(TASKS_ROUTE) => {
            let (status, body) = task_json(server, &path[TASKS_ROUTE.len()..]);
            respond(&mut stream, status, JSON, &[], body.as_bytes())
        }
        "/metrics" => {
            let body = metrics_text(server);
            respond(
                &mut stream,
                200,
                "text/plain; version=0.0.4; charset=utf-8",
                &[],
                body.as_bytes(),
            )
        }
        "/events" => {
            if let Some(problem) = not_same_origin(&request) {
                return respond(&mut stream, 403, TEXT, &[], problem.as_bytes());
            }
            let Some(accept) = websocket_accept(&request) else {
                return respond(
                    &mut stream,
                    400,
                    TEXT,
                    &[],
                    b"/events is a WebSocket: connect with a WebSocket client \
                      (Upgrade: websocket, Sec-WebSocket-Version: 13)\n",
                );
            };
            let head = format!(
                "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Accept: {accept}\r\n\r\n"
            );
            stream.write_all(head.as_bytes())?;
            server.hand_over(stream, request.rest, peer);
            Ok(())
        }
        _ => respond(
            &mut stream,
            404,
            TEXT,
            &[],
            b"not found; this server has /, /api/status, /api/monitors, /api/schedules, /api/tasks/<id>, \
              /api/series, /metrics and /events\n",
        ),
    }
}

/// Reads and parses the request head. `Ok(None)`: the peer closed without a request.
fn read_head(stream: &mut TcpStream) -> std::result::Result<Option<Request>, (u16, String)> {
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 2048];
    // The whole head within HEAD_TIMEOUT, however it is dripped: each read's timeout is
    // what is left of it (a per-read timeout let one byte every 5 s hold a slot for good).
    let deadline = Instant::now() + HEAD_TIMEOUT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err((408, "the request head did not arrive within 5 s\n".into()));
        }
        let _ = stream.set_read_timeout(Some(left));
        let n = match stream.read(&mut chunk) {
            Ok(0) if buf.is_empty() => return Ok(None),
            Ok(0) => return Err((400, "the request ended before its head did\n".into())),
            Ok(n) => n,
            Err(_) if buf.is_empty() => return Ok(None),
            Err(e) => return Err((408, format!("reading the request failed: {e}\n"))),
        };
        buf.extend_from_slice(&chunk[..n]);
        let mut headers = [httparse::EMPTY_HEADER; 48];
        let mut parsed = httparse::Request::new(&mut headers);
        match parsed.parse(&buf) {
            Ok(httparse::Status::Complete(len)) => {
                let target = parsed.path.unwrap_or("/");
                let (path, query) = target.split_once('?').unwrap_or((target, ""));
                return Ok(Some(Request {
                    method: parsed.method.unwrap_or("GET").to_owned(),
                    path: path.to_owned(),
                    query: query.to_owned(),
                    headers: parsed
                        .headers
                        .iter()
                        .map(|h| {
                            (
                                h.name.to_owned(),
                                String::from_utf8_lossy(h.value).into_owned(),
                            )
                        })
                        .collect(),
                    rest: buf[len..].to_vec(),
                }));
            }
            Ok(httparse::Status::Partial) if buf.len() < MAX_HEAD => {}
            Ok(httparse::Status::Partial) => {
                return Err((431, "the request head is larger than 16 KiB\n".into()));
            }
            Err(e) => return Err((400, format!("not an HTTP/1.x request: {e}\n"))),
        }
    }
}

/// Bearer header or `?token=`, compared without an early exit.
fn authorized(request: &Request, expected: &str) -> bool {
    let given = request
        .header("Authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| request.query_param("token"));
    given.is_some_and(|given| {
        given.len() == expected.len()
            && given
                .bytes()
                .zip(expected.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    })
}

/// Refuses a Host header that names this server by a name it was not given. A browser
/// page on `attacker.example`, whose name its owner points at 127.0.0.1 after the page has
/// loaded (DNS rebinding), sends `Host: attacker.example`, and its Origin matches that
/// Host, so only the Host itself tells it apart. An IP literal cannot be rebound, and
/// `localhost` is this machine's; other names must be listed (`--http-allow-host`). A
/// request with no Host (not a browser's) is served.
fn foreign_host(request: &Request, allowed: &[String]) -> Option<String> {
    let host = request.header("Host")?;
    let name = match host.strip_prefix('[') {
        // `[v6]` or `[v6]:port`: an IP literal, or nothing this server answers to.
        Some(rest) => rest.split(']').next().unwrap_or(""),
        None => host.rsplit_once(':').map_or(host, |(name, _port)| name),
    };
    if name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|a| a.eq_ignore_ascii_case(name))
    {
        return None;
    }
    Some(format!(
        "this live view is not served as {name:?}: open it by its IP address or localhost, or \
         start the foreman with --http-allow-host {name} if that name is this machine's\n"
    ))
}

/// A browser page of another site must not read the feed (WebSockets are not covered by
/// CORS): when an Origin is sent, its host must be the one the request was sent to.
fn not_same_origin(request: &Request) -> Option<String> {
    let origin = request.header("Origin")?;
    let host = request.header("Host").unwrap_or("");
    let origin_host = origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .unwrap_or(origin);
    if origin_host.eq_ignore_ascii_case(host) {
        None
    } else {
        Some(format!(
            "a page from {origin} may not open this feed; open the live view at http://{host}/\n"
        ))
    }
}

/// The Sec-WebSocket-Accept value, if this is a valid WebSocket upgrade request.
fn websocket_accept(request: &Request) -> Option<String> {
    let upgrade = request.header("Upgrade")?;
    let connection = request.header("Connection")?;
    let version = request.header("Sec-WebSocket-Version")?;
    let key = request.header("Sec-WebSocket-Key")?;
    let upgrades = connection
        .split(',')
        .any(|t| t.trim().eq_ignore_ascii_case("upgrade"));
    (upgrade.eq_ignore_ascii_case("websocket") && upgrades && version.trim() == "13")
        .then(|| tungstenite::handshake::derive_accept_key(key.trim().as_bytes()))
}

fn respond(
    stream: &mut TcpStream,
    status: u16,
    content_type: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<()> {
    let reason = match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "",
    };
    let mut head = format!(
        "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\nConnection: close\r\n",
        body.len()
    );
    for (name, value) in headers {
        head.push_str(name);
        head.push_str(": ");
        head.push_str(value);
        head.push_str("\r\n");
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    stream.write_all(&out)?;
    stream.flush()
}

fn open_db(server: &Server) -> Result<rusqlite::Connection> {
    db::open(&server.config.db, Synchronous::Normal)
}

fn status_json(server: &Server) -> Result<String> {
    let conn = open_db(server)?;
    let status = crate::status::read(&conn, &server.config.db)?;
    to_json(&status)
}

/// `monitor list --json` without the configs, which may hold addresses or credentials
/// the page has no need for.
fn monitors_json(server: &Server) -> Result<String> {
    let conn = open_db(server)?;
    let mut monitors = serde_json::to_value(crate::monitor::store::list(&conn)?)
        .map_err(|e| Error::Runtime(format!("serialising: {e}")))?;
    for monitor in monitors.as_array_mut().into_iter().flatten() {
        if let Some(fields) = monitor.as_object_mut() {
            fields.remove("config");
        }
    }
    to_json(&monitors)
}

/// `/api/schedules`: `snapq schedule list --json`.
fn schedules_json(server: &Server) -> Result<String> {
    let conn = open_db(server)?;
    let mut shown = Vec::new();
    for s in crate::schedules::list(&conn)? {
        shown.push(crate::schedules::Shown::of(&conn, &s, 0)?);
    }
    to_json(&shown)
}

/// `/api/tasks/<id>`: a task's record, as `snapq show ID --json` prints it.
const TASKS_ROUTE: &str = "/api/tasks/";

/// The status and JSON body for `/api/tasks/<id>`: 200 and the record, 404 for an id with
/// neither a queued row nor a record, 400 for what is not an id, 503 when the database
/// cannot be read.
fn task_json(server: &Server, id: &str) -> (u16, String) {
    let error = |message: String| serde_json::json!({ "error": message }).to_string();
    let Some(id) = id
        .parse::<i64>()
        .ok()
        .filter(|n| itoa::Buffer::new().format(*n) == id)
    else {
        return (
            400,
            error(format!(
                "{id:?} is not a task id; ask for /api/tasks/<id>, e.g. /api/tasks/42"
            )),
        );
    };
    let found = open_db(server).and_then(|conn| crate::records::show(&conn, id));
    match found {
        Ok(Some(record)) => match to_json(&record) {
            Ok(body) => (200, body),
            Err(e) => (503, error(e.to_string())),
        },
        Ok(None) => (404, error(crate::records::not_found_message(id))),
        Err(e) => (503, error(e.to_string())),
    }
}

fn to_json(value: &impl Serialize) -> Result<String> {
    serde_json::to_string(value).map_err(|e| Error::Runtime(format!("serialising: {e}")))
}

fn metrics_text(server: &Server) -> String {
    let now = now_micros();
    let (counts, monitors) = match open_db(server) {
        Ok(conn) => (
            crate::queue::counts(&conn, now).ok(),
            crate::monitor::store::list(&conn).unwrap_or_default(),
        ),
        Err(e) => {
            tracing::warn!("live view: /metrics cannot read the database: {e}");
            (None, Vec::new())
        }
    };
    let db = DbFigures {
        counts,
        monitors,
        now,
    };
    let counters = server.hub.counters.lock();
    metrics::render(
        &counters,
        &db,
        server.tally.running.load(Ordering::Relaxed),
        server.tally.dropped.load(Ordering::Relaxed),
    )
}
