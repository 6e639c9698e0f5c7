//! What the multi-process benches (`overhead`, `propagation`) share.
//!
//! - **Modes.** `cargo bench --bench X` passes `--bench` to the binary and gets the
//!   full run; `cargo test --benches` does not, and gets the smoke run (a few
//!   seconds, what CI does), as criterion does for its own benches.
//!   `MESH_BENCH_SMOKE=1` forces the smoke run, `MESH_BENCH_SECS` sets the duration of
//!   a measured phase.
//! - **Roles.** Every process of a bench is the bench binary itself, re-executed
//!   ([`std::env::current_exe`]) with `MESH_BENCH_ROLE=<role>`: the client app, the
//!   server app and mesh-control run in processes of their own, so `/proc` can say
//!   what each costs. A role prints `READY <address>` on stdout once it serves, and
//!   exits when its stdin closes, so a parent that dies (panic, Ctrl-C) takes its
//!   children with it.
//! - **Costs.** CPU time (`utime + stime` of `/proc/<pid>/stat`, in clock ticks of
//!   10 ms, and the same time in nanoseconds from `/proc/<pid>/task/*/schedstat`,
//!   which a window of a few thousand requests needs) and resident memory (`VmRSS`,
//!   `VmHWM`, `RssAnon` of `/proc/<pid>/status`), and wake-ups (the voluntary context
//!   switches of every thread, `/proc/<pid>/task/*/status`), read from `/proc`
//!   (docs/ARCHITECTURE.md, Conventions: no libc).
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// The environment variable naming the role of a re-executed bench process.
pub(crate) const ROLE_ENV: &str = "MESH_BENCH_ROLE";

/// Whether this run is the short smoke run (see the module docs).
pub(crate) fn smoke() -> bool {
    let forced = std::env::var("MESH_BENCH_SMOKE").is_ok_and(|v| !v.is_empty() && v != "0");
    let from_cargo_bench = std::env::args().any(|a| a == "--bench");
    forced || !from_cargo_bench
}

/// The duration of one measured phase: `MESH_BENCH_SECS`, else `default` (full run) or
/// `smoke_default` (smoke run).
pub(crate) fn phase_duration(default: f64, smoke_default: f64) -> Duration {
    let secs = std::env::var("MESH_BENCH_SECS")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .unwrap_or(if smoke() { smoke_default } else { default });
    Duration::from_secs_f64(secs)
}

/// A positive integer from the environment, else `default`.
pub(crate) fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse::<usize>().ok())
        .filter(|v| *v > 0)
        .unwrap_or(default)
}

/// Cargo's target directory (where `target/bench/*.json` and the Envoy venv go), as
/// the tests find it.
pub(crate) use mesh_testkit::install::target_dir;

/// `target/bench`, created.
pub(crate) fn out_dir() -> PathBuf {
    let dir = target_dir().join("bench");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        eprintln!("warning: cannot create {}: {e}", dir.display());
    }
    dir
}

/// Writes `value` as pretty JSON to `path` and says so.
pub(crate) fn write_json(path: &Path, value: &serde_json::Value) {
    let text = serde_json::to_string_pretty(value).unwrap_or_default();
    match std::fs::write(path, text + "\n") {
        Ok(()) => println!("wrote {}", path.display()),
        Err(e) => eprintln!("error: writing {}: {e}", path.display()),
    }
}

/// Raises this process's open-file limit to its hard limit (1,000 xDS clients need
/// more than the usual soft limit of 1,024 descriptors). Children inherit it.
pub(crate) fn raise_fd_limit() {
    use rustix::process::{Resource, getrlimit, setrlimit};
    let mut limit = getrlimit(Resource::Nofile);
    // `None` is "unlimited"; the kernel caps descriptors at nr_open anyway.
    let target = limit.maximum.unwrap_or(1 << 20).min(1 << 20);
    if limit.current.is_some_and(|current| current < target) {
        limit.current = Some(target);
        if let Err(e) = setrlimit(Resource::Nofile, limit) {
            eprintln!("warning: cannot raise the open-file limit: {e}");
        }
    }
}

/// The open-file soft limit.
pub(crate) fn fd_limit() -> Option<u64> {
    rustix::process::getrlimit(rustix::process::Resource::Nofile).current
}

/// The CPU time and memory of one process, read from `/proc/<pid>`.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct ProcSample {
    /// User + system CPU time so far (all threads, including exited ones), from
    /// `/proc/<pid>/stat` (10 ms resolution).
    pub(crate) cpu: Duration,
    /// CPU time so far of the threads alive now, from their `schedstat` (ns
    /// resolution); `None` where the kernel does not expose it.
    pub(crate) cpu_ns: Option<u64>,
    /// Resident set size now, in KiB.
    pub(crate) rss_kib: u64,
    /// Peak resident set size, in KiB.
    pub(crate) hwm_kib: u64,
    /// Anonymous resident memory (heap, stacks), in KiB: `VmRSS` minus file-backed
    /// pages such as the binary's code.
    pub(crate) anon_kib: u64,
    /// Voluntary context switches so far of the threads alive now (each time a
    /// thread blocked: a park in `epoll_wait`, a futex, a sleep), summed from
    /// `/proc/<pid>/task/*/status`; `None` where the kernel does not expose them.
    /// A thread blocks once per wake-up, so its growth counts wake-ups.
    pub(crate) voluntary_switches: Option<u64>,
    /// Nonvoluntary context switches so far of the threads alive now (preempted
    /// while runnable: a busy machine), from the same files.
    pub(crate) nonvoluntary_switches: Option<u64>,
}

/// Reads `/proc/<pid>/stat` and `/proc/<pid>/status`; `None` when the process is gone
/// (or this is not Linux).
pub(crate) fn proc_sample(pid: u32) -> Option<ProcSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count
    // fields after its closing parenthesis. utime and stime are fields 14 and 15.
    let after = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = after.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    let ticks = rustix::param::clock_ticks_per_second().max(1);
    let cpu = Duration::from_nanos((utime + stime).saturating_mul(1_000_000_000) / ticks);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib = |key: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let switches = task_switches(pid);
    Some(ProcSample {
        cpu,
        cpu_ns: schedstat_ns(pid),
        rss_kib: kib("VmRSS:"),
        hwm_kib: kib("VmHWM:"),
        anon_kib: kib("RssAnon:"),
        voluntary_switches: switches.map(|(v, _)| v),
        nonvoluntary_switches: switches.map(|(_, n)| n),
    })
}

/// The sums of `voluntary_ctxt_switches` and `nonvoluntary_ctxt_switches` over
/// `pid`'s threads. `/proc/<pid>/status` alone holds the main thread's counts only,
/// so every thread's own `status` is read. Threads that exited are not counted (as
/// with [`schedstat_ns`]); the bench's roles keep their threads.
pub(crate) fn task_switches(pid: u32) -> Option<(u64, u64)> {
    let (mut voluntary, mut nonvoluntary) = (0u64, 0u64);
    let mut seen = false;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("status");
        // A thread that exited since the listing simply counts no more.
        let Ok(text) = std::fs::read_to_string(path) else {
            continue;
        };
        let count = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(key))
                .and_then(|rest| rest.trim().parse::<u64>().ok())
        };
        if let (Some(v), Some(n)) = (
            count("voluntary_ctxt_switches:"),
            count("nonvoluntary_ctxt_switches:"),
        ) {
            voluntary += v;
            nonvoluntary += n;
            seen = true;
        }
    }
    seen.then_some((voluntary, nonvoluntary))
}

/// The (voluntary, nonvoluntary) context switches of a process between two samples;
/// zero where either sample lacks them (or a thread with switches exited).
pub(crate) fn switches_between(before: &ProcSample, after: &ProcSample) -> (u64, u64) {
    let grown = |b: Option<u64>, a: Option<u64>| match (b, a) {
        (Some(b), Some(a)) => a.saturating_sub(b),
        _ => 0,
    };
    (
        grown(before.voluntary_switches, after.voluntary_switches),
        grown(before.nonvoluntary_switches, after.nonvoluntary_switches),
    )
}

/// The sum of the on-CPU time (first field of `schedstat`, ns) of `pid`'s threads.
fn schedstat_ns(pid: u32) -> Option<u64> {
    let mut total = 0u64;
    for entry in std::fs::read_dir(format!("/proc/{pid}/task")).ok()? {
        let path = entry.ok()?.path().join("schedstat");
        // A thread that exited since the listing simply counts no more.
        if let Ok(text) = std::fs::read_to_string(path) {
            total += text.split_whitespace().next()?.parse::<u64>().ok()?;
        }
    }
    Some(total)
}

/// The CPU time a process used between two samples: from `schedstat` when both
/// have it and it is consistent with `/proc/<pid>/stat` (no thread of the window
/// exited with time that would be lost), else from `/proc/<pid>/stat`.
pub(crate) fn cpu_between(before: &ProcSample, after: &ProcSample) -> Duration {
    let coarse = after.cpu.saturating_sub(before.cpu);
    match (before.cpu_ns, after.cpu_ns) {
        (Some(b), Some(a)) if a >= b => {
            let fine = Duration::from_nanos(a - b);
            // `stat` ticks lag by up to a tick at each end; beyond that, threads
            // exited and `schedstat` lost their time.
            if coarse <= fine + Duration::from_millis(25) {
                fine
            } else {
                coarse
            }
        }
        _ => coarse,
    }
}

/// This process's sample.
pub(crate) fn self_sample() -> ProcSample {
    proc_sample(std::process::id()).unwrap_or_default()
}

/// The machine, for the report: logical CPUs and the CPU model.
pub(crate) fn machine() -> serde_json::Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let model = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find_map(|l| l.strip_prefix("model name"))
                .and_then(|rest| rest.split_once(':'))
                .map(|(_, v)| v.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_owned())
        .unwrap_or_default();
    let load = std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default();
    serde_json::json!({ "cpus": cpus, "cpu_model": model, "kernel": kernel, "loadavg_at_start": load })
}

/// A child bench process (a role), killed when dropped.
pub(crate) struct RoleProcess {
    /// What it is, for messages (`client-app`, `server-app`, `envoy-client`, ...).
    pub(crate) name: String,
    child: Child,
    stdin: Option<ChildStdin>,
    lines: mpsc::Receiver<String>,
    /// Its stderr, collected by a thread (for failure messages).
    stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl RoleProcess {
    /// Starts this bench binary again as `role` with `args` and extra `env`.
    pub(crate) fn spawn_role(
        name: &str,
        role: &str,
        args: &[String],
        env: &[(String, String)],
    ) -> Result<RoleProcess, String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the bench binary to re-execute: {e}"))?;
        let mut command = Command::new(exe);
        command.args(args).env(ROLE_ENV, role);
        for (k, v) in env {
            command.env(k, v);
        }
        RoleProcess::spawn(name, command)
    }

    /// Starts `command` (any program: Envoy) with piped stdio.
    pub(crate) fn spawn(name: &str, mut command: Command) -> Result<RoleProcess, String> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = command
            .spawn()
            .map_err(|e| format!("starting {name} ({command:?}): {e}"))?;
        let stdin = child.stdin.take();
        let (tx, lines) = mpsc::channel();
        if let Some(stdout) = child.stdout.take() {
            std::thread::spawn(move || {
                for line in BufReader::new(stdout).lines() {
                    let Ok(line) = line else { break };
                    if tx.send(line).is_err() {
                        break;
                    }
                }
            });
        }
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        if let Some(mut pipe) = child.stderr.take() {
            let sink = stderr.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if let Ok(mut s) = sink.lock() {
                        s.push_str(&String::from_utf8_lossy(buf.get(..n).unwrap_or_default()));
                        // Keep the tail only.
                        if s.len() > 64 * 1024 {
                            let cut = s.len() - 32 * 1024;
                            let cut = (cut..s.len()).find(|i| s.is_char_boundary(*i)).unwrap_or(0);
                            s.drain(..cut);
                        }
                    }
                }
            });
        }
        Ok(RoleProcess {
            name: name.to_owned(),
            child,
            stdin,
            lines,
            stderr,
        })
    }

    /// The process id.
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits for the `READY <value>` line and returns `<value>`.
    pub(crate) fn wait_ready(&mut self, timeout: Duration) -> Result<String, String> {
        let deadline = Instant::now() + timeout;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    if let Some(value) = line.strip_prefix("READY ") {
                        return Ok(value.trim().to_owned());
                    }
                    if let Some(error) = line.strip_prefix("ERROR ") {
                        return Err(format!("{} failed: {error}", self.name));
                    }
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    return Err(format!(
                        "{} not ready after {timeout:?}; stderr:\n{}",
                        self.name,
                        self.stderr_tail()
                    ));
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => {
                    let status = self.child.wait().map(|s| s.to_string()).unwrap_or_default();
                    return Err(format!(
                        "{} exited ({status}) before it was ready; stderr:\n{}",
                        self.name,
                        self.stderr_tail()
                    ));
                }
            }
        }
    }

    /// The next stdout line, waiting up to `timeout`.
    pub(crate) fn next_line(&mut self, timeout: Duration) -> Option<String> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Writes one line to the process's stdin (a command to a role).
    pub(crate) fn send_line(&mut self, line: &str) -> Result<(), String> {
        let stdin = self
            .stdin
            .as_mut()
            .ok_or_else(|| format!("{}: stdin closed", self.name))?;
        writeln!(stdin, "{line}")
            .and_then(|()| stdin.flush())
            .map_err(|e| format!("{}: writing to stdin: {e}", self.name))
    }

    /// The last lines of its stderr.
    pub(crate) fn stderr_tail(&self) -> String {
        let text = self.stderr.lock().map(|s| s.clone()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    /// `Some(exit status)` once the process has exited.
    pub(crate) fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(status)) => Some(status.to_string()),
            Ok(None) => None,
            Err(e) => Some(format!("unknown ({e})")),
        }
    }

    /// Its CPU and memory now.
    pub(crate) fn sample(&self) -> Option<ProcSample> {
        proc_sample(self.pid())
    }

    /// Closes stdin (a role exits on that), waits briefly, then kills.
    pub(crate) fn stop(&mut self) {
        self.stdin.take();
        let deadline = Instant::now() + Duration::from_secs(3);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RoleProcess {
    fn drop(&mut self) {
        self.stdin.take();
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
        }
        let _ = self.child.wait();
    }
}

/// In a role process: exits the process when stdin closes (the parent is gone or done).
pub(crate) fn exit_when_stdin_closes() {
    std::thread::spawn(|| {
        let mut sink = Vec::new();
        let _ = std::io::stdin().lock().read_to_end(&mut sink);
        std::process::exit(0);
    });
}

/// In a role process: announces readiness to the parent.
pub(crate) fn announce_ready(value: impl std::fmt::Display) {
    println!("READY {value}");
    let _ = std::io::stdout().flush();
}

/// In a role process: reports a start-up failure to the parent, then exits.
pub(crate) fn fail_role(error: impl std::fmt::Display) -> ! {
    println!("ERROR {error}");
    let _ = std::io::stdout().flush();
    eprintln!("error: {error}");
    std::process::exit(1);
}

/// A role's tokio runtime: current-thread when `threads` is 1 (one worker, as Envoy
/// with `--concurrency 1`), else multi-thread with that many workers.
pub(crate) fn runtime(threads: usize) -> tokio::runtime::Runtime {
    let built = if threads <= 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(threads)
            .enable_all()
            .build()
    };
    built.unwrap_or_else(|e| fail_role(format!("cannot build a tokio runtime: {e}")))
}

/// Latency percentiles of a set of samples.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub(crate) struct Percentiles {
    /// Samples.
    pub(crate) count: usize,
    /// Median, µs.
    pub(crate) p50: f64,
    /// 90th percentile, µs.
    pub(crate) p90: f64,
    /// 99th percentile, µs.
    pub(crate) p99: f64,
    /// 99.9th percentile, µs.
    pub(crate) p999: f64,
    /// Largest, µs.
    pub(crate) max: f64,
    /// Mean, µs.
    pub(crate) mean: f64,
}

impl Percentiles {
    /// From samples in nanoseconds (sorted here).
    pub(crate) fn from_nanos(samples: &mut [u64]) -> Percentiles {
        samples.sort_unstable();
        if samples.is_empty() {
            return Percentiles::default();
        }
        let us = |ns: u64| ns as f64 / 1000.0;
        let sum: u128 = samples.iter().map(|&s| u128::from(s)).sum();
        Percentiles {
            count: samples.len(),
            p50: us(quantile(samples, 0.50)),
            p90: us(quantile(samples, 0.90)),
            p99: us(quantile(samples, 0.99)),
            p999: us(quantile(samples, 0.999)),
            max: us(samples.last().copied().unwrap_or(0)),
            mean: sum as f64 / samples.len() as f64 / 1000.0,
        }
    }

    /// As JSON (µs, one decimal).
    pub(crate) fn to_json(self) -> serde_json::Value {
        serde_json::json!({
            "count": self.count,
            "p50_us": round1(self.p50),
            "p90_us": round1(self.p90),
            "p99_us": round1(self.p99),
            "p999_us": round1(self.p999),
            "max_us": round1(self.max),
            "mean_us": round1(self.mean),
        })
    }
}

/// The `q` quantile (nearest rank) of sorted samples.
pub(crate) fn quantile(sorted: &[u64], q: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((q * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    sorted.get(rank - 1).copied().unwrap_or(0)
}

/// Rounds to one decimal, for JSON and tables.
pub(crate) fn round1(v: f64) -> f64 {
    (v * 10.0).round() / 10.0
}

/// Rounds to two decimals.
pub(crate) fn round2(v: f64) -> f64 {
    (v * 100.0).round() / 100.0
}

/// A markdown table from a header and rows.
pub(crate) fn markdown_table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut out = String::new();
    out.push_str(&format!("| {} |\n", header.join(" | ")));
    out.push_str(&format!(
        "|{}\n",
        header.iter().map(|_| "---|").collect::<String>()
    ));
    for row in rows {
        out.push_str(&format!("| {} |\n", row.join(" | ")));
    }
    out
}

/// Prints a banner that cannot be missed (rows that could not run).
pub(crate) fn loud(message: &str) {
    let bar = "!".repeat(78);
    println!("{bar}\n!! {message}\n{bar}");
}

/// Key/value pairs as a JSON object.
pub(crate) fn json_object(pairs: BTreeMap<String, serde_json::Value>) -> serde_json::Value {
    serde_json::Value::Object(pairs.into_iter().collect())
}

/// The mesh-control role (`MESH_BENCH_ROLE=control`): an embedded control server in a
/// process of its own, serving `MESH_BENCH_CONFIG_DIR` (an empty directory when
/// unset) on ephemeral loopback ports. Prints `READY <xds address> <admin address>`.
/// `threads` tokio workers (1: current-thread).
pub(crate) fn control_main(threads: usize) -> ! {
    control_main_with(threads, None)
}

/// [`control_main`] with security on: `ca` (the CA, and the file its trust bundle
/// is written to for bootstraps) makes mesh-control issue workload certificates,
/// authenticate registrations and serve ADS and the admin API over TLS.
pub(crate) fn control_main_with(
    threads: usize,
    ca: Option<(proxyless::control::ca::CertificateAuthority, PathBuf)>,
) -> ! {
    exit_when_stdin_closes();
    let _scratch;
    let dir = match std::env::var_os("MESH_BENCH_CONFIG_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => match tempfile::tempdir() {
            Ok(t) => {
                let path = t.path().to_path_buf();
                _scratch = t;
                path
            }
            Err(e) => fail_role(format!("creating a config directory: {e}")),
        },
    };
    let rt = runtime(threads);
    rt.block_on(async move {
        let mut builder = proxyless::control::Server::builder().config_dir(&dir);
        if let Some((ca, bundle)) = ca {
            builder = builder.ca(ca).trust_bundle_file(bundle);
        }
        match builder.start().await {
            Ok(handle) => {
                announce_ready(format!("{} {}", handle.xds_addr(), handle.admin_addr()));
                std::future::pending::<()>().await;
                drop(handle);
            }
            Err(e) => fail_role(format!("starting mesh-control on {}: {e}", dir.display())),
        }
    });
    std::process::exit(0)
}

/// Parses the control role's `READY` value: (xDS address, admin address).
pub(crate) fn parse_control_ready(
    value: &str,
) -> Result<(std::net::SocketAddr, std::net::SocketAddr), String> {
    let mut parts = value.split_whitespace();
    let mut next = |what: &str| {
        parts
            .next()
            .and_then(|p| p.parse().ok())
            .ok_or_else(|| format!("mesh-control announced no {what} address: {value:?}"))
    };
    Ok((next("xDS")?, next("admin")?))
}
