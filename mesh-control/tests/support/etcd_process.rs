//! A real etcd for tests: started on free loopback ports with its own data
//! directory, killed and restarted on the same ports and data, killed on
//! drop. The `etcd` binary comes from Debian's `etcd-server`, installed by
//! `mesh_testkit::install::ensure_deb` when it is not on PATH.

use std::fs::File;
use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long etcd may take to be ready (a first start on a slow disk).
const READY_WITHIN: Duration = Duration::from_secs(30);
/// What etcd logs once it serves clients (3.4 and later).
const READY_LINE: &str = "ready to serve client requests";

/// A running (or stopped) etcd.
pub(crate) struct EtcdProcess {
    binary: PathBuf,
    dir: tempfile::TempDir,
    client_port: u16,
    peer_port: u16,
    child: Option<Child>,
    starts: u32,
}

fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0")
        .unwrap_or_else(|e| panic!("binding a free loopback port: {e}"));
    listener
        .local_addr()
        .unwrap_or_else(|e| panic!("reading a bound port: {e}"))
        .port()
}

impl EtcdProcess {
    /// Starts a plaintext etcd and waits until it serves clients.
    pub(crate) async fn start() -> EtcdProcess {
        let binary = tokio::task::spawn_blocking(|| {
            mesh_testkit::install::ensure_deb(&["etcd-server"], "etcd")
                .unwrap_or_else(|e| panic!("{e}"))
        })
        .await
        .unwrap_or_else(|e| panic!("installing etcd: {e}"));
        let dir = tempfile::Builder::new()
            .prefix("proxyless-etcd-")
            .tempdir()
            .unwrap_or_else(|e| panic!("creating etcd's data directory: {e}"));
        let mut etcd = EtcdProcess {
            binary,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            child: None,
            starts: 0,
        };
        etcd.spawn_and_wait().await;
        etcd
    }

    /// The client URL.
    pub(crate) fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.client_port)
    }

    /// Kills etcd (SIGKILL: a crash, which etcd's WAL survives) and waits
    /// for it to exit. Its ports are free afterwards.
    pub(crate) fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Stops etcd if it runs, then starts it again on the same ports with
    /// the same data, and waits until it serves clients.
    pub(crate) async fn restart(&mut self) {
        self.stop();
        self.spawn_and_wait().await;
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join(format!("etcd-{}.log", self.starts))
    }

    /// The last lines etcd logged, for failure messages.
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }

    async fn spawn_and_wait(&mut self) {
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
        // Settings from the environment (ETCD_*) would override the flags.
        for (name, _) in std::env::vars_os() {
            if name.to_string_lossy().starts_with("ETCD_") {
                command.env_remove(name);
            }
        }
        command
            .arg("--name=test")
            .arg(format!(
                "--data-dir={}",
                self.dir.path().join("data").display()
            ))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            // A fast raft clock: a single member elects itself in
            // milliseconds, and the minimum lease TTL is 1 s.
            .arg("--heartbeat-interval=10")
            .arg("--election-timeout=50");
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
                return;
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "etcd exited ({status}) before serving clients on {client}; its log:\n{}",
                    self.log_tail()
                );
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
    }
}
