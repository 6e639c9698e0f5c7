//! Reading a Prometheus text exposition (what a scrape of `/metrics` returns) into
//! samples, and Istio's standard metric labels as Istio documents them.
//!
//! Metrics tests compare a scrape with numbers, so they need the samples, not the
//! text; and they compare the label set with [`ISTIO_STANDARD_LABELS`], written here
//! (and [`ISTIO_STANDARD_SAMPLES`]), written here from Istio's documentation rather
//! than taken from the code under test, so a label dropped there is caught.
//!
//! [`PrometheusServer`]: a real Prometheus scraping real `/metrics` endpoints
//! and answering PromQL over its HTTP API, for tests that check what a
//! dashboard's queries return (tests/dashboards.rs) rather than what one
//! scrape holds.

use std::collections::BTreeMap;
use std::fs::File;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Istio's standard metric labels, as the Istio documentation lists them
/// (<https://istio.io/latest/docs/reference/config/metrics/#labels>), in that order.
pub const ISTIO_STANDARD_LABELS: [&str; 25] = [
    "reporter",
    "source_workload",
    "source_workload_namespace",
    "source_principal",
    "source_app",
    "source_version",
    "source_canonical_service",
    "source_canonical_revision",
    "source_cluster",
    "destination_workload",
    "destination_workload_namespace",
    "destination_principal",
    "destination_app",
    "destination_version",
    "destination_service",
    "destination_service_name",
    "destination_service_namespace",
    "destination_canonical_service",
    "destination_canonical_revision",
    "destination_cluster",
    "request_protocol",
    "response_code",
    "grpc_response_status",
    "response_flags",
    "connection_security_policy",
];

/// The samples Istio's standard metrics expose: the counter `istio_requests` (as
/// `istio_requests_total`) and three histograms, as Istio's dashboards query them.
pub const ISTIO_STANDARD_SAMPLES: [&str; 10] = [
    "istio_requests_total",
    "istio_request_duration_milliseconds_bucket",
    "istio_request_duration_milliseconds_sum",
    "istio_request_duration_milliseconds_count",
    "istio_request_bytes_bucket",
    "istio_request_bytes_sum",
    "istio_request_bytes_count",
    "istio_response_bytes_bucket",
    "istio_response_bytes_sum",
    "istio_response_bytes_count",
];

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The sample's name (a histogram's `_bucket`, `_sum`, `_count` included).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

impl Sample {
    /// The label `key`'s value; empty when it is missing.
    pub fn label(&self, key: &str) -> &str {
        self.labels.get(key).map_or("", String::as_str)
    }
}

/// The samples of a text exposition (comments and blank lines skipped); panics
/// naming a line that is not a sample.
pub fn parse(text: &str) -> Vec<Sample> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|line| match sample(line) {
            Some(sample) => sample,
            None => panic!("not a sample: {line}"),
        })
        .collect()
}

fn sample(line: &str) -> Option<Sample> {
    let (series, value) = line.rsplit_once(' ')?;
    let value = value.parse().ok()?;
    let (name, mut rest) = match series.split_once('{') {
        Some((name, rest)) => (name, rest.strip_suffix('}')?),
        None => (series, ""),
    };
    let mut labels = BTreeMap::new();
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"")?;
        // A value ends at the first quote not escaped by a backslash.
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next()? {
                (_, '\\') => match chars.next()?.1 {
                    'n' => value.push('\n'),
                    other => value.push(other),
                },
                (i, '"') => break i,
                (_, c) => value.push(c),
            }
        };
        labels.insert(key.trim_start_matches(',').to_owned(), value);
        rest = &after[end + 1..];
    }
    Some(Sample {
        name: name.to_owned(),
        labels,
        value,
    })
}

/// The sum of `name` over the samples whose labels include every pair of `filter`.
pub fn total(samples: &[Sample], name: &str, filter: &[(&str, &str)]) -> f64 {
    samples
        .iter()
        .filter(|s| s.name == name)
        .filter(|s| {
            filter
                .iter()
                .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
        .map(|s| s.value)
        .sum()
}

/// One scrape job of a [`PrometheusServer`]: a `/metrics` URL, plaintext or
/// HTTPS (verified against a CA file, optionally with a bearer token, as
/// mesh-control's admin port wants).
#[derive(Debug, Clone)]
pub struct ScrapeJob {
    name: String,
    scheme: String,
    target: String,
    path: String,
    ca_file: Option<PathBuf>,
    server_name: Option<String>,
    bearer_token_file: Option<PathBuf>,
    /// Targets read from this file (`file_sd_configs`) instead of `target`.
    targets_file: Option<PathBuf>,
}

impl ScrapeJob {
    /// The job `name` scraping `scheme://<each target>/<path>` for the
    /// targets listed in `targets_file` ([`write_targets`]), which
    /// Prometheus watches: so it can start before what it scrapes, and be
    /// told the addresses (ephemeral ports) later. The file is created
    /// empty if it does not exist.
    pub fn file_sd(name: &str, scheme: &str, path: &str, targets_file: &Path) -> ScrapeJob {
        if !targets_file.exists() {
            write_targets(targets_file, &[]);
        }
        ScrapeJob {
            name: name.to_owned(),
            scheme: scheme.to_owned(),
            target: String::new(),
            path: path.to_owned(),
            ca_file: None,
            server_name: None,
            bearer_token_file: None,
            targets_file: Some(targets_file.to_path_buf()),
        }
    }

    /// The job `name` scraping `url` (`http://127.0.0.1:9090/metrics` or
    /// `https://...`); panics on a URL that is not `scheme://host:port/path`.
    pub fn new(name: &str, url: &str) -> ScrapeJob {
        let (scheme, rest) = url
            .split_once("://")
            .unwrap_or_else(|| panic!("scrape URL without a scheme: {url}"));
        let (target, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/metrics"),
        };
        ScrapeJob {
            name: name.to_owned(),
            scheme: scheme.to_owned(),
            target: target.to_owned(),
            path: path.to_owned(),
            ca_file: None,
            server_name: None,
            bearer_token_file: None,
            targets_file: None,
        }
    }

    /// Verifies the server's certificate against `ca_file`, for the name
    /// `server_name` (what its certificate holds, `localhost` say).
    pub fn tls(mut self, ca_file: &Path, server_name: &str) -> ScrapeJob {
        self.ca_file = Some(ca_file.to_path_buf());
        self.server_name = Some(server_name.to_owned());
        self
    }

    /// Sends `Authorization: Bearer <the file's content>`.
    pub fn bearer_token_file(mut self, path: &Path) -> ScrapeJob {
        self.bearer_token_file = Some(path.to_path_buf());
        self
    }

    fn yaml(&self) -> String {
        // Values are JSON strings: valid YAML scalars, whatever they hold.
        let q = |s: &str| serde_json::Value::from(s).to_string();
        let mut out = format!(
            "  - job_name: {}\n    scheme: {}\n    metrics_path: {}\n",
            q(&self.name),
            q(&self.scheme),
            q(&self.path),
        );
        match &self.targets_file {
            // Watched (inotify), and read again every second besides.
            Some(file) => {
                out += &format!(
                    "    file_sd_configs:\n      - files: [{}]\n        refresh_interval: 1s\n",
                    q(&file.display().to_string())
                )
            }
            None => {
                out += &format!(
                    "    static_configs:\n      - targets: [{}]\n",
                    q(&self.target)
                )
            }
        }
        if let Some(ca) = &self.ca_file {
            out += &format!(
                "    tls_config:\n      ca_file: {}\n",
                q(&ca.display().to_string())
            );
            if let Some(name) = &self.server_name {
                out += &format!("      server_name: {}\n", q(name));
            }
        }
        if let Some(token) = &self.bearer_token_file {
            out += &format!(
                "    authorization:\n      type: Bearer\n      credentials_file: {}\n",
                q(&token.display().to_string())
            );
        }
        out
    }
}

/// Writes `targets` (`host:port` each) to a [`ScrapeJob::file_sd`] job's
/// file, atomically (a copy renamed over it: Prometheus never reads half a
/// file).
pub fn write_targets(targets_file: &Path, targets: &[&str]) {
    let json = serde_json::json!([{ "targets": targets }]).to_string();
    let tmp = targets_file.with_extension("tmp");
    std::fs::write(&tmp, json).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, targets_file).unwrap_or_else(|e| {
        panic!(
            "renaming {} to {}: {e}",
            tmp.display(),
            targets_file.display()
        )
    });
}

/// A real Prometheus server (Debian's `prometheus`, installed by
/// [`crate::install::ensure_deb`] when missing) on a free loopback port,
/// scraping [`ScrapeJob`]s at a fixed interval into a fresh TSDB directory;
/// queried over its HTTP API like Grafana does. Killed, and its directory
/// removed, on drop.
#[derive(Debug)]
pub struct PrometheusServer {
    child: Option<Child>,
    dir: PathBuf,
    addr: SocketAddr,
}

/// How long Prometheus may take to answer `/-/ready`.
const PROMETHEUS_READY_WITHIN: Duration = Duration::from_secs(30);

impl PrometheusServer {
    /// The `prometheus` binary, installed from Debian's `prometheus` when it
    /// is not on PATH (without root: a panic naming the command to run).
    /// Blocks: call it in `spawn_blocking` from async code.
    pub fn binary() -> PathBuf {
        crate::install::ensure_deb(&["prometheus"], "prometheus").unwrap_or_else(|e| panic!("{e}"))
    }

    /// Starts Prometheus scraping `jobs` every `interval` (also its rule
    /// evaluation interval and scrape timeout), and waits until it is ready.
    pub async fn start(jobs: &[ScrapeJob], interval: Duration) -> PrometheusServer {
        let binary = tokio::task::spawn_blocking(PrometheusServer::binary)
            .await
            .unwrap_or_else(|e| panic!("installing prometheus: {e}"));
        let secs = format!("{}ms", interval.as_millis().max(1));
        let mut config = format!(
            "global:\n  scrape_interval: {secs}\n  scrape_timeout: {secs}\n  evaluation_interval: {secs}\nscrape_configs:\n"
        );
        for job in jobs {
            config += &job.yaml();
        }
        let mut last_log = String::new();
        for _ in 0..5 {
            let dir = fresh_dir();
            let config_file = dir.join("prometheus.yml");
            std::fs::write(&config_file, &config)
                .unwrap_or_else(|e| panic!("writing {}: {e}", config_file.display()));
            let log = dir.join("prometheus.log");
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log_file =
                File::create(&log).unwrap_or_else(|e| panic!("creating {}: {e}", log.display()));
            let stderr = log_file
                .try_clone()
                .unwrap_or_else(|e| panic!("opening {}: {e}", log.display()));
            let child = Command::new(&binary)
                .arg(format!("--config.file={}", config_file.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .stdin(Stdio::null())
                .stdout(Stdio::from(log_file))
                .stderr(Stdio::from(stderr))
                .spawn()
                .unwrap_or_else(|e| panic!("starting {}: {e}", binary.display()));
            let mut server = PrometheusServer {
                child: Some(child),
                dir,
                addr,
            };
            match server.wait_ready().await {
                Ok(()) => return server,
                // Another process took the free port first: a new one.
                Err(tail) if tail.contains("address already in use") => last_log = tail,
                Err(tail) => panic!("prometheus exited before it was ready; its log:\n{tail}"),
            }
        }
        panic!("prometheus found no free port in 5 tries; its log:\n{last_log}");
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let start = Instant::now();
        loop {
            if tokio::net::TcpStream::connect(self.addr).await.is_ok() {
                let (status, _) = crate::http::get_text(self.addr, "/-/ready").await;
                if status == 200 {
                    return Ok(());
                }
            }
            if let Some(child) = &mut self.child
                && let Ok(Some(status)) = child.try_wait()
            {
                self.child = None;
                return Err(format!("({status})\n{}", self.log_tail()));
            }
            if start.elapsed() > PROMETHEUS_READY_WITHIN {
                panic!(
                    "prometheus was not ready within {PROMETHEUS_READY_WITHIN:?}; its log:\n{}",
                    self.log_tail()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Its HTTP address (the API and the web UI).
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `GET /api/v1/<path_and_query>`: the `data` of a `success` answer, or
    /// what went wrong (status, `error`, the body).
    pub async fn api(&self, path_and_query: &str) -> Result<serde_json::Value, String> {
        let (status, body) =
            crate::http::get_text(self.addr, &format!("/api/v1/{path_and_query}")).await;
        let json: serde_json::Value = serde_json::from_str(&body)
            .map_err(|e| format!("HTTP {status}, not JSON ({e}): {body}"))?;
        if status != 200 || json["status"] != "success" {
            return Err(format!(
                "HTTP {status}: {} {}",
                json["errorType"].as_str().unwrap_or(""),
                json["error"].as_str().unwrap_or(&body)
            ));
        }
        Ok(json["data"].clone())
    }

    /// Evaluates `promql` now (`/api/v1/query`): the series of its result
    /// (each `{"metric": {...}, "value": [t, "v"]}`; a scalar or string
    /// result as one element), or Prometheus's error (a parse error, say).
    pub async fn query(&self, promql: &str) -> Result<Vec<serde_json::Value>, String> {
        let data = self
            .api(&format!("query?query={}", percent_encode(promql)))
            .await?;
        Ok(match data["resultType"].as_str() {
            Some("vector") | Some("matrix") => {
                data["result"].as_array().cloned().unwrap_or_default()
            }
            _ => vec![data["result"].clone()],
        })
    }

    /// The scrape targets as Prometheus sees them: (job, health, last
    /// error) each, health being `up`, `down` or `unknown`.
    pub async fn targets(&self) -> Result<Vec<(String, String, String)>, String> {
        let data = self.api("targets?state=active").await?;
        let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
        Ok(data["activeTargets"]
            .as_array()
            .map(|ts| {
                ts.iter()
                    .map(|t| {
                        (
                            text(&t["labels"]["job"]),
                            text(&t["health"]),
                            text(&t["lastError"]),
                        )
                    })
                    .collect()
            })
            .unwrap_or_default())
    }

    /// The last lines Prometheus logged, for failure messages.
    pub fn log_tail(&self) -> String {
        tail(&self.dir.join("prometheus.log"))
    }

    /// Kills Prometheus (SIGKILL) and waits for it to exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for PrometheusServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// `text` percent-encoded for a URL's query (everything but RFC 3986's
/// unreserved characters).
fn percent_encode(text: &str) -> String {
    let mut out = String::with_capacity(text.len() * 3);
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(char::from(b));
        } else {
            out += &format!("%{b:02X}");
        }
    }
    out
}

fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap_or_else(|e| panic!("binding a free loopback port: {e}"))
        .port()
}

/// A new, empty directory under the system's temporary directory.
fn fresh_dir() -> PathBuf {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "proxyless-prometheus-{}-{nanos}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("creating {}: {e}", dir.display()));
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scrape_jobs_and_queries_are_written_as_prometheus_reads_them() {
        let plain = ScrapeJob::new("shop", "http://127.0.0.1:9100/metrics").yaml();
        assert!(plain.contains("scheme: \"http\""), "{plain}");
        assert!(plain.contains("targets: [\"127.0.0.1:9100\"]"), "{plain}");
        assert!(plain.contains("metrics_path: \"/metrics\""), "{plain}");
        assert!(!plain.contains("tls_config"), "{plain}");
        let tls = ScrapeJob::new("control", "https://127.0.0.1:15014/stats")
            .tls(Path::new("/tmp/ca.pem"), "localhost")
            .bearer_token_file(Path::new("/tmp/token"))
            .yaml();
        assert!(tls.contains("metrics_path: \"/stats\""), "{tls}");
        assert!(
            tls.contains("ca_file: \"/tmp/ca.pem\"\n      server_name: \"localhost\""),
            "{tls}"
        );
        assert!(tls.contains("credentials_file: \"/tmp/token\""), "{tls}");
        let dir = fresh_dir();
        let file = dir.join("targets.json");
        let sd = ScrapeJob::file_sd("shop", "http", "/metrics", &file).yaml();
        assert!(
            sd.contains(&format!("files: [\"{}\"]", file.display())),
            "{sd}"
        );
        assert!(!sd.contains("static_configs"), "{sd}");
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            r#"[{"targets":[]}]"#
        );
        write_targets(&file, &["127.0.0.1:9100"]);
        assert_eq!(
            std::fs::read_to_string(&file).unwrap(),
            r#"[{"targets":["127.0.0.1:9100"]}]"#
        );
        let _ = std::fs::remove_dir_all(&dir);
        assert_eq!(
            percent_encode("sum(rate(x{a=~\"b|c\"}[1m])) / 2"),
            "sum%28rate%28x%7Ba%3D~%22b%7Cc%22%7D%5B1m%5D%29%29%20%2F%202"
        );
    }

    #[test]
    fn samples_and_totals() {
        let text = "# TYPE istio_requests counter\n\
            istio_requests_total{reporter=\"source\",response_code=\"200\",grpc_response_status=\"\"} 5\n\
            istio_requests_total{reporter=\"destination\",response_code=\"503\",path=\"a\\\"b,c\"} 2\n\
            up 1\n\
            # EOF\n";
        let samples = parse(text);
        assert_eq!(samples.len(), 3);
        assert_eq!(samples[0].label("grpc_response_status"), "");
        assert_eq!(samples[1].label("path"), "a\"b,c");
        assert_eq!(samples[2].name, "up");
        assert_eq!(total(&samples, "istio_requests_total", &[]), 7.0);
        assert_eq!(
            total(&samples, "istio_requests_total", &[("reporter", "source")]),
            5.0
        );
        assert_eq!(
            total(&samples, "istio_requests_total", &[("missing", "")]),
            0.0
        );
    }
}
