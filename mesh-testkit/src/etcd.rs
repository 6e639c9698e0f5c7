//! A real etcd for tests: started on free loopback ports with its own data
//! directory, killed and restarted on the same ports and data, killed (and
//! its directory removed) on drop. The `etcd` binary comes from Debian's
//! `etcd-server`, installed by [`crate::install::ensure_deb`] when it is
//! not on PATH.
//!
//! [`EtcdProcess::start_tls`] starts one that serves clients over TLS and
//! requires client certificates (`--client-cert-auth`), as a production
//! etcd shared by mesh-control replicas should.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// How long etcd may take to be ready (a first start on a slow disk).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// What etcd logs once it serves clients (3.4 and later).
const READY_LINE: &str = "ready to serve client requests";

/// The files of an etcd serving clients over TLS with client
/// certificates: `--cert-file`, `--key-file`, `--trusted-ca-file`.
#[derive(Debug, Clone)]
pub struct ServerTls {
    /// etcd's certificate chain (valid for 127.0.0.1).
    pub cert: PathBuf,
    /// Its key.
    pub key: PathBuf,
    /// The CA client certificates must chain to.
    pub client_ca: PathBuf,
}

/// A running (or stopped) etcd.
#[derive(Debug)]
pub struct EtcdProcess {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<ServerTls>,
    child: Option<Child>,
    starts: u32,
}

/// The `etcd` binary, installed from Debian's `etcd-server` when it is not
/// on PATH (or, without root, a panic naming the command to run).
pub fn binary() -> PathBuf {
    crate::install::ensure_deb(&["etcd-server"], "etcd").unwrap_or_else(|e| panic!("{e}"))
}

/// What `etcd --version` prints first (`etcd Version: 3.4.23`).
pub fn version(binary: &Path) -> String {
    let output = Command::new(binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|e| panic!("running {} --version: {e}", binary.display()));
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned()
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("binding a free loopback port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("reading a bound port: {e}"))
        .port()
}

/// A new, empty directory under the system's temporary directory.
fn fresh_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "proxyless-etcd-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir)
        .unwrap_or_else(|e| panic!("creating etcd's data directory {}: {e}", dir.display()));
    dir
}

impl EtcdProcess {
    /// Starts a plaintext etcd and waits until it serves clients.
    pub async fn start() -> EtcdProcess {
        EtcdProcess::start_with(None).await
    }

    /// Starts an etcd serving clients over TLS, requiring client
    /// certificates issued by `tls.client_ca`.
    pub async fn start_tls(tls: ServerTls) -> EtcdProcess {
        EtcdProcess::start_with(Some(tls)).await
    }

    async fn start_with(tls: Option<ServerTls>) -> EtcdProcess {
        let binary = tokio::task::spawn_blocking(binary)
            .await
            .unwrap_or_else(|e| panic!("installing etcd: {e}"));
        let mut etcd = EtcdProcess {
            binary,
            dir: fresh_dir(),
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            child: None,
            starts: 0,
        };
        // The ports were free when picked, but another test may bind one
        // before etcd does: then etcd exits at once, and new ports are tried.
        for _ in 1..5 {
            match etcd.try_spawn().await {
                Ok(()) => return etcd,
                Err(log) if log.contains("address already in use") => {
                    etcd.client_port = free_port();
                    etcd.peer_port = free_port();
                    let _ = std::fs::remove_dir_all(etcd.dir.join("data"));
                }
                Err(log) => panic!("etcd exited before serving clients; its log:\n{log}"),
            }
        }
        etcd.spawn_and_wait().await;
        etcd
    }

    /// The client URL (`http://127.0.0.1:PORT`, `https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://127.0.0.1:{}", self.client_port)
    }

    /// The directory holding etcd's data and logs.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Kills etcd (SIGKILL: a crash, which etcd's WAL survives) and waits
    /// for it to exit. Its ports are free afterwards.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops etcd if it runs, then starts it again on the same ports with
    /// the same data, and waits until it serves clients.
    pub async fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait().await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join(format!("etcd-{}.log", self.starts))
    }

    /// The last lines etcd logged, for failure messages.
    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn spawn_and_wait(&mut self) {
        if let Err(log) = self.try_spawn().await {
            panic!(
                "etcd exited before serving clients on {}; its log:\n{log}",
                self.endpoint()
            );
        }
    }

    /// Starts etcd and waits until it serves clients; `Err` with the tail
    /// of its log when it exits first.
    async fn try_spawn(&mut self) -> Result<(), String> {
        self.starts += 1;
        let log = self.log_path();
        let log_file =
            File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
        let stderr = log_file
            .try_clone()
            .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
        let client = self.endpoint();
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut command = Command::new(&self.binary);
        command.env("ETCDCTL_API", "3");
        // Settings from the environment (ETCD_*) would override the flags.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            // A fast raft clock: a single member elects itself in
            // milliseconds, and the minimum lease TTL is 1 s.
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=50");
        if let Some(tls) = &self.tls {
            command
                .arg(format!("--cert-file={}", tls.cert.display()))
                .arg(format!("--key-file={}", tls.key.display()))
                .arg(format!("--trusted-ca-file={}", tls.client_ca.display()))
                .arg("--client-cert-auth");
        }
        let child = command
            .stdin(Stdio::null())
            .stdout(Stdio::from(log_file))
            .stderr(Stdio::from(stderr))
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.binary.display()));
        self.child = Some(child);
        let start = Instant::now();
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            if text.contains(READY_LINE) {
                return Ok(());
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("({status})\n{}", self.log_tail()));
            }
            if start.elapsed() > READY_WITHIN {
                panic!(
                    "etcd did not log {READY_LINE:?} within {READY_WITHIN:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

impl Drop for EtcdProcess {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
