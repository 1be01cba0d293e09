//! A real HTTP server on 127.0.0.1 for monitor tests: Prometheus text, garbage, silence,
//! a huge body, or gone (connection refused) once stopped.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

/// What the server answers.
#[derive(Debug, Clone)]
pub enum Mode {
    /// 200 with this body as Prometheus text.
    Text(String),
    /// Bytes that are not HTTP at all.
    Garbage,
    /// Accepts the connection and never answers.
    Silent,
    /// 200 with a body of this many bytes, streamed.
    Huge(usize),
}

pub struct FakeServer {
    pub addr: SocketAddr,
    /// Set to stop the accept loop and silent handlers.
    stop: Arc<AtomicBool>,
    /// Requests answered or accepted.
    hits: Arc<AtomicUsize>,
    thread: Option<JoinHandle<()>>,
}

impl FakeServer {
    pub fn start(mode: Mode) -> FakeServer {
        FakeServer::start_on(0, mode)
    }

    /// Binds `port` (0 for any), e.g. to bring a stopped server back on the same address.
    pub fn start_on(port: u16, mode: Mode) -> FakeServer {
        let listener = TcpListener::bind(("127.0.0.1", port)).unwrap();
        let addr = listener.local_addr().unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let hits = Arc::new(AtomicUsize::new(0));
        let thread = {
            let (stop, hits) = (Arc::clone(&stop), Arc::clone(&hits));
            std::thread::spawn(move || {
                for stream in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(stream) = stream else { continue };
                    hits.fetch_add(1, Ordering::SeqCst);
                    let mode = mode.clone();
                    let stop = Arc::clone(&stop);
                    std::thread::spawn(move || serve(stream, &mode, &stop));
                }
            })
        };
        FakeServer {
            addr,
            stop,
            hits,
            thread: Some(thread),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/metrics", self.addr)
    }

    pub fn hits(&self) -> usize {
        self.hits.load(Ordering::SeqCst)
    }

    /// Closes the listening socket: new connections are refused. Returns the port.
    pub fn stop(mut self) -> u16 {
        self.shut();
        self.addr.port()
    }

    fn shut(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Unblock accept() so the loop sees the flag and drops the listener.
        let _ = TcpStream::connect(self.addr);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

impl Drop for FakeServer {
    fn drop(&mut self) {
        self.shut();
    }
}

fn serve(mut stream: TcpStream, mode: &Mode, stop: &AtomicBool) {
    // Read the request head.
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    stream
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match stream.read(&mut buf) {
            Ok(0) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(_) if stop.load(Ordering::SeqCst) => return,
            Err(_) => continue,
        }
    }
    match mode {
        Mode::Text(body) => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        }
        Mode::Garbage => {
            let _ = stream.write_all(b"\x00\x01garbage, not HTTP at all\r\n\r\n\xff\xfe");
        }
        Mode::Silent => {
            while !stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(20));
                // Keep reading so the client's bytes do not pile up; never answer.
                let _ = stream.read(&mut buf);
            }
        }
        Mode::Huge(size) => {
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
            );
            let chunk = vec![b'x'; 64 * 1024];
            let mut left = *size;
            while left > 0 {
                let n = left.min(chunk.len());
                if stream.write_all(&chunk[..n]).is_err() {
                    return;
                }
                left -= n;
            }
        }
    }
}

/// A Chainlink node's metrics, with `head` as its current head.
pub fn chainlink_metrics(head: u64) -> String {
    format!(
        "# HELP head_tracker_current_head The highest seen head number\n\
         # TYPE head_tracker_current_head gauge\n\
         head_tracker_current_head {head}\n\
         head_tracker_heads_received_total 1500\n\
         max_unconfirmed_blocks 2\n\
         process_start_time_seconds 1.7000000e+09\n\
         unconfirmed_transactions 1\n\
         eth_balance{{account=\"0x1aB5\"}} 12.5\n\
         tx_manager_num_gas_bumps_total 3\n\
         tx_manager_gas_bump_exceeds_limit_total 0\n\
         gas_updater_set_gas_price{{percentile=\"20%\"}} 2.5e+10\n\
         run_status_update_total{{job_spec_id=\"1\",status=\"errored\"}} 4\n\
         run_status_update_total{{job_spec_id=\"1\",status=\"completed\"}} 40\n"
    )
}
