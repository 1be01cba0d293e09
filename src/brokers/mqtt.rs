//! MQTT (3.1.1) as a broker kind: `--mqtt-url mqtt://[user:password@]host[:port]`.
//!
//! Each outbox message is published at QoS 1 and counts as delivered once the broker's
//! PUBACK for it came back: the outbox's guarantees (nothing lost across an outage or a
//! restart, in order, at least once) hold as for RabbitMQ. Topics mirror the RabbitMQ
//! routing keys, the exchange first and each dot a level: `raw_data/node/chainlink`,
//! `raw_data/http/<monitor>`, `health_check/heartbeat/manager`, and pings are read from
//! `health_check/ping`. A subscriber takes RabbitMQ's `#` and `*` as MQTT's `#` and `+`.
//!
//! The client is synchronous, on std's `TcpStream`, with `mqttrs` encoding and decoding the
//! packets: no async runtime. Threads: the publisher (src/outbox.rs) writes PUBLISH
//! packets and waits for their PUBACKs; `snapq-mqtt-io` reads the socket (PUBACKs, pings,
//! PINGRESPs) and sends the keep-alive PINGREQ.

use std::cell::{Cell, RefCell};
use std::collections::HashSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, Sender, bounded, unbounded};
use mqttrs::{
    Connect, ConnectReturnCode, Packet, Pid, Protocol, Publish, QoS, QosPid, Subscribe,
    SubscribeTopic, decode_slice, encode_slice,
};
use parking_lot::Mutex;

use super::{BrokerKind, InFlight, Link, Outgoing, Plan};

pub struct Mqtt;

/// Seconds of silence the broker allows before it drops the connection (MQTT's
/// keep-alive); the reader sends a PINGREQ after half of it without traffic.
const KEEP_ALIVE_SECS: u16 = 30;
/// How long connecting, the CONNACK and the SUBACK may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one write may block on a broker that stops reading.
const WRITE_TIMEOUT: Duration = Duration::from_secs(10);

impl BrokerKind for Mqtt {
    fn name(&self) -> &'static str {
        "mqtt"
    }

    fn title(&self) -> &'static str {
        "MQTT"
    }

    fn schemes(&self) -> &'static [&'static str] {
        &["mqtt"]
    }

    fn example(&self) -> &'static str {
        "mqtt://127.0.0.1:1883"
    }

    fn connect(&self, url: &str, plan: &Plan<'_>) -> Result<Box<dyn Link>, String> {
        MqttLink::connect(url, &topic(plan.ping.0, plan.ping.1)).map(|l| Box::new(l) as _)
    }
}

/// RabbitMQ's (exchange, routing key) as an MQTT topic.
pub fn topic(exchange: &str, routing_key: &str) -> String {
    format!("{exchange}/{}", routing_key.replace('.', "/"))
}

struct MqttLink {
    /// The socket's writing side. Locked for each whole write, so the reader's PINGREQ
    /// never lands inside a PUBLISH.
    writer: Arc<Mutex<TcpStream>>,
    /// Packet ids the broker acknowledged (PUBACK), from the reader.
    acks: Receiver<u16>,
    errors: Receiver<String>,
    pings: Receiver<()>,
    /// The next packet id (1..=65535); the publisher thread alone uses it. With at most
    /// two batches of about a thousand messages in flight, an id is never reused while
    /// the broker may still acknowledge its earlier message.
    next_pid: Cell<u16>,
    /// PUBACKs read while another batch was being waited for: its own come later.
    early: RefCell<HashSet<u16>>,
    reader: Option<JoinHandle<()>>,
}

impl MqttLink {
    fn connect(url: &str, ping_topic: &str) -> Result<MqttLink, String> {
        let parsed = url::Url::parse(url).map_err(|e| format!("{url:?} is not a URL: {e}"))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| "the URL names no host".to_owned())?;
        let port = parsed.port().unwrap_or(1883);
        // The URL keeps them percent-encoded (`p%40ss` for `p@ss`).
        let decode = |s: &str| {
            percent_encoding::percent_decode_str(s)
                .decode_utf8_lossy()
                .into_owned()
        };
        let username = (!parsed.username().is_empty()).then(|| decode(parsed.username()));
        let password = parsed.password().map(decode);
        let addrs: Vec<_> = (host, port)
            .to_socket_addrs()
            .map_err(|e| format!("cannot resolve {host}: {e}"))?
            .collect();
        let mut stream = None;
        let mut last = String::from("no address");
        for addr in addrs {
            match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
                Ok(s) => {
                    stream = Some(s);
                    break;
                }
                Err(e) => last = format!("{addr}: {e}"),
            }
        }
        let mut stream = stream.ok_or_else(|| format!("cannot connect: {last}"))?;
        let io = |e: std::io::Error| format!("the connection failed: {e}");
        stream.set_nodelay(true).map_err(io)?;
        stream.set_write_timeout(Some(WRITE_TIMEOUT)).map_err(io)?;
        stream
            .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
            .map_err(io)?;
        let client_id = format!(
            "snapq-{}-{}",
            std::process::id(),
            crate::clock::now_micros() % 1_000_000_000
        );
        write_packet(
            &mut stream,
            &Packet::Connect(Connect {
                protocol: Protocol::MQTT311,
                keep_alive: KEEP_ALIVE_SECS,
                client_id: &client_id,
                clean_session: true,
                last_will: None,
                username: username.as_deref(),
                password: password.as_deref().map(str::as_bytes),
            }),
        )
        .map_err(io)?;
        let frame = read_frame(&mut stream).map_err(|e| format!("no CONNACK: {e}"))?;
        match decode_slice(&frame) {
            Ok(Some(Packet::Connack(ack))) if ack.code == ConnectReturnCode::Accepted => {}
            Ok(Some(Packet::Connack(ack))) => {
                return Err(match ack.code {
                    ConnectReturnCode::BadUsernamePassword | ConnectReturnCode::NotAuthorized => {
                        format!("cannot connect: invalid credentials ({:?})", ack.code)
                    }
                    code => format!("cannot connect: the broker refused ({code:?})"),
                });
            }
            other => return Err(format!("cannot connect: expected CONNACK, got {other:?}")),
        }
        let sub_pid = Pid::try_from(1).map_err(|e| format!("{e:?}"))?;
        write_packet(
            &mut stream,
            &Packet::Subscribe(Subscribe::new(
                sub_pid,
                vec![SubscribeTopic {
                    topic_path: ping_topic.to_owned(),
                    qos: QoS::AtMostOnce,
                }],
            )),
        )
        .map_err(io)?;
        let frame = read_frame(&mut stream).map_err(|e| format!("no SUBACK: {e}"))?;
        if !matches!(decode_slice(&frame), Ok(Some(Packet::Suback(_)))) {
            return Err(format!("cannot subscribe to {ping_topic}"));
        }
        // The reader wakes at least this often to keep the connection alive.
        stream
            .set_read_timeout(Some(Duration::from_secs(u64::from(KEEP_ALIVE_SECS / 2))))
            .map_err(io)?;
        let writer = Arc::new(Mutex::new(stream.try_clone().map_err(io)?));
        let (ack_tx, acks) = unbounded();
        let (error_tx, errors) = unbounded();
        let (ping_tx, pings) = bounded(1);
        let reader = {
            let writer = Arc::clone(&writer);
            std::thread::Builder::new()
                .name("snapq-mqtt-io".into())
                .spawn(move || read_loop(stream, &writer, &ack_tx, &error_tx, &ping_tx))
                .map_err(|e| format!("cannot start the MQTT reader: {e}"))?
        };
        Ok(MqttLink {
            writer,
            acks,
            errors,
            pings,
            next_pid: Cell::new(2),
            early: RefCell::new(HashSet::new()),
            reader: Some(reader),
        })
    }

    fn take_pid(&self) -> u16 {
        let pid = self.next_pid.get();
        self.next_pid.set(if pid == u16::MAX { 1 } else { pid + 1 });
        pid
    }
}

impl Link for MqttLink {
    fn publish<'a>(
        &'a self,
        messages: &[Outgoing<'_>],
        _timeout: Duration,
    ) -> Result<Box<dyn InFlight + 'a>, String> {
        let mut bytes = Vec::new();
        let mut waiting = HashSet::with_capacity(messages.len());
        for (exchange, key, body) in messages {
            let topic = topic(exchange, key);
            let pid = self.take_pid();
            let packet = Packet::Publish(Publish {
                dup: false,
                qospid: QosPid::AtLeastOnce(Pid::try_from(pid).map_err(|e| format!("{e:?}"))?),
                retain: false,
                topic_name: &topic,
                payload: body.as_bytes(),
            });
            encode_into(&packet, topic.len() + body.len(), &mut bytes)
                .map_err(|e| format!("cannot encode a message for {topic}: {e:?}"))?;
            waiting.insert(pid);
        }
        // Bounded by the socket's write timeout (`WRITE_TIMEOUT`).
        self.writer
            .lock()
            .write_all(&bytes)
            .map_err(|e| format!("publishing failed: {e}"))?;
        Ok(Box::new(Batch {
            link: self,
            waiting,
            total: messages.len(),
        }))
    }

    fn errors(&self) -> &Receiver<String> {
        &self.errors
    }

    fn pings(&self) -> &Receiver<()> {
        &self.pings
    }

    fn close(self: Box<Self>) {
        let _ = write_packet(&mut self.writer.lock(), &Packet::Disconnect);
        // Drop shuts the socket and joins the reader.
    }
}

/// A batch sent, its packet ids not all acknowledged yet.
struct Batch<'a> {
    link: &'a MqttLink,
    waiting: HashSet<u16>,
    total: usize,
}

impl InFlight for Batch<'_> {
    fn wait(mut self: Box<Self>, timeout: Duration) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        // PUBACKs of this batch that came while an earlier one (or a heartbeat) waited.
        self.link
            .early
            .borrow_mut()
            .retain(|pid| !self.waiting.remove(pid));
        while !self.waiting.is_empty() {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.link.acks.recv_timeout(left) {
                Ok(pid) => {
                    if !self.waiting.remove(&pid) {
                        self.link.early.borrow_mut().insert(pid);
                    }
                }
                Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} of {} messages not acknowledged within {} s",
                        self.waiting.len(),
                        self.total,
                        timeout.as_secs()
                    ));
                }
                Err(crossbeam_channel::RecvTimeoutError::Disconnected) => {
                    return Err("the connection closed before every PUBACK came".into());
                }
            }
        }
        Ok(())
    }
}

impl Drop for MqttLink {
    fn drop(&mut self) {
        let _ = self.writer.lock().shutdown(Shutdown::Both);
        if let Some(reader) = self.reader.take() {
            let _ = reader.join();
        }
    }
}

/// Appends one encoded packet to `out`; `size_hint` is its variable part's length.
fn encode_into(
    packet: &Packet<'_>,
    size_hint: usize,
    out: &mut Vec<u8>,
) -> Result<(), mqttrs::Error> {
    let start = out.len();
    out.resize(start + size_hint + 16, 0);
    let written = encode_slice(packet, &mut out[start..])?;
    out.truncate(start + written);
    Ok(())
}

/// Writes a control packet (not a PUBLISH, which `publish` encodes in batches).
fn write_packet(stream: &mut TcpStream, packet: &Packet<'_>) -> std::io::Result<()> {
    // The variable part's length: names, credentials and topics, plus their prefixes.
    let size = match packet {
        Packet::Connect(c) => {
            c.client_id.len()
                + c.username.map_or(0, str::len)
                + c.password.map_or(0, <[u8]>::len)
                + 32
        }
        Packet::Subscribe(s) => {
            s.topics
                .iter()
                .map(|t| t.topic_path.len() + 3)
                .sum::<usize>()
                + 2
        }
        _ => 2,
    };
    let mut bytes = Vec::new();
    encode_into(packet, size, &mut bytes)
        .map_err(|e| std::io::Error::other(format!("cannot encode {packet:?}: {e:?}")))?;
    stream.write_all(&bytes)
}

/// Reads one whole packet: the fixed header's byte, the remaining length (one to four
/// bytes, seven bits each) and that many bytes.
fn read_frame(stream: &mut impl Read) -> std::io::Result<Vec<u8>> {
    let mut frame = vec![0u8; 1];
    stream.read_exact(&mut frame)?;
    let mut remaining = 0usize;
    for shift in 0..4 {
        let mut byte = [0u8; 1];
        stream.read_exact(&mut byte)?;
        frame.push(byte[0]);
        remaining |= usize::from(byte[0] & 0x7f) << (7 * shift);
        if byte[0] & 0x80 == 0 {
            let start = frame.len();
            frame.resize(start + remaining, 0);
            stream.read_exact(&mut frame[start..])?;
            return Ok(frame);
        }
    }
    Err(std::io::Error::new(
        ErrorKind::InvalidData,
        "a packet length longer than four bytes",
    ))
}

/// Asks the kernel to acknowledge what arrives at once rather than after its delayed-ACK
/// timer. A broker with Nagle's algorithm on (Mosquitto's default) holds each PUBACK until
/// the previous one is acknowledged, so without this every batch waited ~40 ms for the
/// last PUBACK (p50 42 ms from commit to confirm, 5,200 results/s). Linux resets the flag
/// as it goes, hence before every read.
fn quick_ack(stream: &TcpStream) {
    use std::os::fd::AsRawFd;
    let on: libc::c_int = 1;
    // SAFETY: a valid socket descriptor owned by `stream`, and a pointer to a c_int that
    // lives through the call, with its size.
    unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_QUICKACK,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// The reader: PUBACKs to the publisher, pings, keep-alive. Ends at the first error (or
/// the socket's shutdown), reported on `errors`; dropping `acks` then wakes a publisher
/// waiting for PUBACKs.
fn read_loop(
    stream: TcpStream,
    writer: &Mutex<TcpStream>,
    acks: &Sender<u16>,
    errors: &Sender<String>,
    pings: &Sender<()>,
) {
    let mut ping_sent: Option<Instant> = None;
    let fail = |why: String| {
        let _ = errors.send(why);
    };
    // Buffered: a batch's PUBACKs (four bytes each) come in a few reads, not three
    // system calls each.
    let mut reader = std::io::BufReader::with_capacity(64 * 1024, stream);
    loop {
        if reader.buffer().is_empty() {
            quick_ack(reader.get_ref());
        }
        match read_frame(&mut reader) {
            Ok(frame) => match decode_slice(&frame) {
                Ok(Some(Packet::Puback(pid))) => {
                    let _ = acks.send(pid.get());
                }
                Ok(Some(Packet::Publish(_))) => {
                    let _ = pings.try_send(());
                }
                Ok(Some(Packet::Pingresp)) => ping_sent = None,
                Ok(Some(_)) | Ok(None) => {}
                Err(e) => return fail(format!("the broker sent an unreadable packet: {e:?}")),
            },
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                if ping_sent
                    .is_some_and(|t| t.elapsed() >= Duration::from_secs(KEEP_ALIVE_SECS.into()))
                {
                    return fail("the broker did not answer the keep-alive".into());
                }
                if ping_sent.is_none() {
                    if let Err(e) = write_packet(&mut writer.lock(), &Packet::Pingreq) {
                        return fail(format!("the connection failed: {e}"));
                    }
                    ping_sent = Some(Instant::now());
                }
            }
            Err(e) if e.kind() == ErrorKind::UnexpectedEof => {
                return fail("the broker closed the connection".into());
            }
            Err(e) => return fail(format!("the connection failed: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_mirror_routing_keys() {
        assert_eq!(
            topic("raw_data", "node.chainlink"),
            "raw_data/node/chainlink"
        );
        assert_eq!(topic("raw_data", "http.api.v2"), "raw_data/http/api/v2");
        assert_eq!(topic("health_check", "ping"), "health_check/ping");
    }
}
