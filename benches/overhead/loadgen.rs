//! The load generator: blocking HTTP/1.1 keep-alive connections, one OS thread each,
//! in the bench's own process (not counted in any row's CPU).
//!
//! - **Closed loop** (`concurrency` connections, each sends its next request when the
//!   previous answer is in): throughput at saturation.
//! - **Open loop** (a fixed total rate spread over `connections`, each with its own
//!   schedule, as wrk2 does): every request has an intended start time and its
//!   latency is measured from that time, not from when it was sent, so a stall that
//!   delays the next requests counts against all of them (no coordinated omission,
//!   Gil Tene's term). A connection busy past the next intended start sends late,
//!   and that lateness is in the latency.
//!
//! Blocking sockets keep the generator's own path short (no event loop between the
//! socket and the clock). Waiting for an intended start sleeps until
//! [`SPIN_MARGIN`] before it, then spins: `nanosleep` wakes up to the thread's timer
//! slack (50 µs by default) late, which would otherwise count as latency.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Sleep until this long before an intended start, then spin.
const SPIN_MARGIN: Duration = Duration::from_micros(80);

/// The one request every row answers: a GET whose answer carries 1 KiB.
const REQUEST: &[u8] = b"GET /bench HTTP/1.1\r\nhost: bench\r\n\r\n";

/// How long a single request may take before the connection is given up on.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

/// One keep-alive HTTP/1.1 connection to the client app.
pub(crate) struct HttpConn {
    addr: SocketAddr,
    stream: Option<TcpStream>,
    buf: Vec<u8>,
}

impl HttpConn {
    /// A connection to `addr`, dialed on first use.
    pub(crate) fn new(addr: SocketAddr) -> Self {
        HttpConn {
            addr,
            stream: None,
            buf: Vec::with_capacity(4096),
        }
    }

    fn stream(&mut self) -> Result<&mut TcpStream, String> {
        if self.stream.is_none() {
            let stream = TcpStream::connect_timeout(&self.addr, IO_TIMEOUT)
                .map_err(|e| format!("connecting to {}: {e}", self.addr))?;
            let _ = stream.set_nodelay(true);
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let _ = stream.set_write_timeout(Some(IO_TIMEOUT));
            self.stream = Some(stream);
        }
        self.stream
            .as_mut()
            .ok_or_else(|| "no connection".to_owned())
    }

    /// Sends the request and reads the whole answer; returns the body length. A
    /// non-200 answer is an error carrying the body; the connection is dropped
    /// (and redialed next time) after any error.
    pub(crate) fn get(&mut self) -> Result<usize, String> {
        let result = self.exchange();
        if result.is_err() {
            self.stream = None;
        }
        result
    }

    fn exchange(&mut self) -> Result<usize, String> {
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        let result = (|| {
            let stream = self.stream()?;
            stream
                .write_all(REQUEST)
                .map_err(|e| format!("sending: {e}"))?;
            let mut chunk = [0u8; 8192];
            let head_end = loop {
                if let Some(i) = find(&buf, b"\r\n\r\n") {
                    break i + 4;
                }
                let n = stream
                    .read(&mut chunk)
                    .map_err(|e| format!("reading the answer: {e}"))?;
                if n == 0 {
                    return Err("the connection closed before the answer".to_owned());
                }
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            };
            let head = std::str::from_utf8(buf.get(..head_end).unwrap_or_default())
                .map_err(|_| "the answer's head is not UTF-8".to_owned())?;
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|s| s.parse::<u16>().ok())
                .ok_or_else(|| format!("no status in {head:?}"))?;
            let length = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.trim()
                        .eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())
                        .flatten()
                })
                .ok_or_else(|| format!("no content-length in {head:?}"))?;
            while buf.len() < head_end + length {
                let n = stream
                    .read(&mut chunk)
                    .map_err(|e| format!("reading the body: {e}"))?;
                if n == 0 {
                    return Err("the connection closed inside the body".to_owned());
                }
                buf.extend_from_slice(chunk.get(..n).unwrap_or_default());
            }
            if status != 200 {
                let body = buf.get(head_end..).unwrap_or_default();
                return Err(format!(
                    "status {status}: {}",
                    String::from_utf8_lossy(body)
                        .chars()
                        .take(300)
                        .collect::<String>()
                ));
            }
            Ok(length)
        })();
        self.buf = buf;
        result
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// What one phase measured.
#[derive(Debug, Default)]
pub(crate) struct PhaseResult {
    /// Latencies (ns) of the requests whose (intended) start fell in the window and
    /// that succeeded.
    pub(crate) latencies: Vec<u64>,
    /// Open loop: how late requests were sent after their intended start (ns).
    pub(crate) lateness: Vec<u64>,
    /// Failed requests in the window.
    pub(crate) errors: u64,
    /// The first error seen, for the report.
    pub(crate) first_error: Option<String>,
    /// Requests completed inside the window.
    pub(crate) completed_in_window: u64,
    /// The measured window.
    pub(crate) window: Duration,
}

impl PhaseResult {
    /// Completed requests per second in the window.
    pub(crate) fn rps(&self) -> f64 {
        let secs = self.window.as_secs_f64();
        if secs > 0.0 {
            self.completed_in_window as f64 / secs
        } else {
            0.0
        }
    }

    fn merge(&mut self, other: PhaseResult) {
        self.latencies.extend(other.latencies);
        self.lateness.extend(other.lateness);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.completed_in_window += other.completed_in_window;
    }
}

/// The timing of a phase: a warm-up, then the measured window.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Window {
    /// When load starts.
    pub(crate) start: Instant,
    /// When measurement starts (after the warm-up).
    pub(crate) measure_from: Instant,
    /// When load and measurement end.
    pub(crate) end: Instant,
}

impl Window {
    /// A window starting a few milliseconds from now (time for the threads to start).
    pub(crate) fn new(warmup: Duration, measure: Duration) -> Window {
        let start = Instant::now() + Duration::from_millis(20);
        Window {
            start,
            measure_from: start + warmup,
            end: start + warmup + measure,
        }
    }
}

/// Sleeps until `t`, spinning for the last [`SPIN_MARGIN`].
pub(crate) fn wait_until(t: Instant) {
    loop {
        let now = Instant::now();
        if now >= t {
            return;
        }
        let left = t - now;
        if left > SPIN_MARGIN {
            std::thread::sleep(left - SPIN_MARGIN);
        } else {
            std::hint::spin_loop();
        }
    }
}

/// Runs closed-loop load: `concurrency` connections, back to back, during `window`.
/// `during` runs on the calling thread meanwhile (it samples `/proc`).
pub(crate) fn closed_loop(
    addr: SocketAddr,
    concurrency: usize,
    window: Window,
    during: impl FnOnce(),
) -> PhaseResult {
    let threads: Vec<_> = (0..concurrency)
        .map(|_| {
            std::thread::spawn(move || {
                let mut conn = HttpConn::new(addr);
                let mut out = PhaseResult::default();
                wait_until(window.start);
                loop {
                    let sent = Instant::now();
                    if sent >= window.end {
                        break;
                    }
                    let result = conn.get();
                    let done = Instant::now();
                    let measured = sent >= window.measure_from && done <= window.end;
                    match result {
                        Ok(_) if measured => {
                            out.latencies.push(duration_ns(done - sent));
                            out.completed_in_window += 1;
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if measured {
                                out.errors += 1;
                            }
                            out.first_error.get_or_insert(e);
                            // Do not spin on a dead server.
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
                out
            })
        })
        .collect();
    during();
    collect(threads, window)
}

/// Runs open-loop load: `rate` requests per second in total over `connections`
/// connections, each with its own schedule (offset so that sends interleave).
pub(crate) fn open_loop(
    addr: SocketAddr,
    connections: usize,
    rate: f64,
    window: Window,
    during: impl FnOnce(),
) -> PhaseResult {
    let connections = connections.max(1);
    let interval = Duration::from_secs_f64(connections as f64 / rate.max(1.0));
    let threads: Vec<_> = (0..connections)
        .map(|i| {
            std::thread::spawn(move || {
                let mut conn = HttpConn::new(addr);
                let mut out = PhaseResult::default();
                let offset = interval.mul_f64(i as f64 / connections as f64);
                let mut k: u32 = 0;
                loop {
                    let intended = window.start + offset + interval * k;
                    k = k.saturating_add(1);
                    if intended >= window.end {
                        break;
                    }
                    wait_until(intended);
                    let sent = Instant::now();
                    let result = conn.get();
                    let done = Instant::now();
                    let measured = intended >= window.measure_from;
                    match result {
                        Ok(_) if measured => {
                            out.latencies.push(duration_ns(done - intended));
                            out.lateness.push(duration_ns(sent - intended));
                            if done <= window.end {
                                out.completed_in_window += 1;
                            }
                        }
                        Ok(_) => {}
                        Err(e) => {
                            if measured {
                                out.errors += 1;
                            }
                            out.first_error.get_or_insert(e);
                        }
                    }
                }
                out
            })
        })
        .collect();
    during();
    collect(threads, window)
}

fn collect(threads: Vec<std::thread::JoinHandle<PhaseResult>>, window: Window) -> PhaseResult {
    let mut total = PhaseResult {
        window: window.end.saturating_duration_since(window.measure_from),
        ..PhaseResult::default()
    };
    for t in threads {
        match t.join() {
            Ok(r) => total.merge(r),
            Err(_) => {
                total.errors += 1;
                total
                    .first_error
                    .get_or_insert_with(|| "a load generator thread panicked".to_owned());
            }
        }
    }
    total
}

fn duration_ns(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(u64::MAX)
}
