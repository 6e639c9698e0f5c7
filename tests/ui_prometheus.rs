//! Issue 17, acceptance 4: the service graph from Prometheus
//! (`mesh-control serve --prometheus URL`), with a real Prometheus
//! (Debian's `prometheus`, installed by the test) scraping the shop demo.
//!
//! Prometheus starts first, told the shop's `/metrics` address through a
//! `file_sd` targets file once the shop prints it (its ports are
//! ephemeral); the shop's mesh-control reads the graph from that
//! Prometheus. Then, as an operator would see it:
//!
//! - through the admin API (TLS, the read-only operator token), `GET
//!   /v1/graph?source=prometheus` and `GET /v1/graph?source=window` (the
//!   pushed summaries) list the same edges (source workload → service →
//!   version), with the same observed shares within [`SHARE_TOLERANCE`],
//!   and Prometheus' edges carry p50 and p99;
//! - in a real browser (Chromium driven by Playwright,
//!   tests/ui/drive_prom.py), the page logged in with the operator token
//!   draws the edge frontend → catalog v2 from Prometheus (`GET /v1/graph`
//!   answers with `X-Graph-Source: prometheus`), with the share the API
//!   gives.
//!
//! The figures measured are printed. Run:
//! `cargo test -p proxyless --test ui_prometheus -- --nocapture`.

#[path = "support/shop_serve.rs"]
mod shop_serve;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mesh_testkit::install::{Venv, ensure_deb, target_dir};
use mesh_testkit::prometheus::{PrometheusServer, ScrapeJob, write_targets};
use serde_json::Value;
use shop_serve::Shop;

/// The Playwright release the test pins (tests/ui_browser.rs' own).
const PLAYWRIGHT: &str = "playwright==1.65.2";

/// Calls from frontend to catalog (v1 and v2) Prometheus must count before
/// the graphs are compared.
const ENOUGH_CALLS: u64 = 600;

/// How far an observed share read from Prometheus may be from the window's.
/// Both count the same calls, but not over exactly the same span: the
/// window lags up to one push (5 s), Prometheus one scrape (1 s), and
/// Prometheus misses the calls before its first scrape (its baseline) while
/// the first summary carries them: about 8 s of 20 calls/s, 160 calls, out
/// of at least [`ENOUGH_CALLS`]. The share of those few calls varies
/// binomially: for a 10-20% split, the two shares' difference has a
/// standard deviation near 0.008, so 0.04 is 5σ. The page is read a few
/// seconds after the API, with the same bound.
const SHARE_TOLERANCE: f64 = 0.04;

/// An edge group: `namespace/workload`, service, version.
type Group = (String, String, String);

/// How long the graphs may take to fill up.
const FILLED_WITHIN: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graph_renders_from_prometheus() {
    // Install before anything starts (these may take minutes the first time).
    let (chromium, python) = tokio::task::spawn_blocking(|| {
        PrometheusServer::binary();
        let chromium = ensure_deb(&["chromium"], "chromium").unwrap_or_else(|e| panic!("{e}"));
        let python = Venv::in_target_dir("ui-venv", &[PLAYWRIGHT], &["playwright.sync_api"])
            .ensure()
            .unwrap_or_else(|e| panic!("{e}"));
        (chromium, python)
    })
    .await
    .expect("installing prometheus, chromium and playwright");
    let shots = target_dir().join("ui-shots");
    std::fs::create_dir_all(&shots).expect("create target/ui-shots");

    // Prometheus first, scraping whatever the targets file lists (nothing yet).
    let dir = tempfile::tempdir().expect("a temporary directory");
    let targets = dir.path().join("shop-targets.json");
    let job = ScrapeJob::file_sd("shop", "http", "/metrics", &targets);
    let prometheus = PrometheusServer::start(&[job], Duration::from_secs(1)).await;
    let prom_url = format!("http://{}", prometheus.addr());

    let mut shop =
        tokio::task::spawn_blocking(move || Shop::start_with(&["--prometheus", prom_url.as_str()]))
            .await
            .expect("starting the shop");
    let metrics = shop.get("metrics").to_owned();
    let target = metrics
        .strip_prefix("http://")
        .and_then(|rest| rest.strip_suffix("/metrics"))
        .unwrap_or_else(|| panic!("metrics= is not http://host:port/metrics: {metrics}"));
    write_targets(&targets, &[target]);

    let origin = shop
        .get("control-metrics")
        .strip_suffix("/metrics")
        .expect("control-metrics ends with /metrics")
        .to_owned();
    let admin: SocketAddr = origin
        .strip_prefix("https://")
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("the admin origin is not https://ip:port: {origin}"));
    let ca = std::fs::read_to_string(shop.get("control-ca")).expect("read the control CA");
    let token = std::fs::read_to_string(shop.get("control-token-file"))
        .expect("read the operator token")
        .trim()
        .to_owned();
    let api = Api {
        addr: admin,
        tls: Arc::new(mesh_testkit::pki::client_config(&ca, None)),
        token,
    };

    // Until Prometheus' graph has frontend → catalog v1 and v2, with enough
    // calls to measure the split.
    let started = Instant::now();
    let mut prom;
    loop {
        prom = api.graph("prometheus").await;
        let calls = catalog_calls(&prom);
        if calls.0 > 0 && calls.1 > 0 && calls.0 + calls.1 >= ENOUGH_CALLS {
            break;
        }
        assert!(
            started.elapsed() < FILLED_WITHIN,
            "Prometheus' graph has not {ENOUGH_CALLS} calls frontend → catalog v1 + v2 within \
             {FILLED_WITHIN:?} (v1, v2: {calls:?}); graph: {prom}\ntargets: {:?}\nprometheus log:\n{}",
            prometheus.targets().await,
            prometheus.log_tail()
        );
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let window = api.graph("window").await;
    println!(
        "graphs compared {:.0} s after the shop's targets were given to Prometheus",
        started.elapsed().as_secs_f64()
    );

    // The same edges (with a few calls at least: an edge seen in the last
    // second may be in one and not yet in the other).
    let (p, w) = (groups(&prom), groups(&window));
    let busy = |g: &BTreeMap<Group, Agg>| -> Vec<Group> {
        g.iter()
            .filter(|(_, a)| a.requests >= 5)
            .map(|(k, _)| k.clone())
            .collect()
    };
    for key in busy(&w) {
        assert!(
            p.contains_key(&key),
            "the window's edge {key:?} is not in Prometheus' graph: {:?}",
            p.keys().collect::<Vec<_>>()
        );
    }
    for key in busy(&p) {
        assert!(
            w.contains_key(&key),
            "Prometheus' edge {key:?} is not in the window's graph: {:?}",
            w.keys().collect::<Vec<_>>()
        );
    }
    println!(
        "{:<18} {:<32} {:<8} {:>7} {:>7} {:>6} {:>6} {:>7} {:>7} {:>9} {:>9}",
        "source",
        "service",
        "version",
        "calls P",
        "calls W",
        "rps P",
        "rps W",
        "share P",
        "share W",
        "p50/p99 P",
        "p50/p99 W"
    );
    // Shares per source and service, where both count enough calls.
    let mut compared = 0;
    for (key, a) in &p {
        let Some(b) = w.get(key) else { continue };
        let ms = |x: Option<f64>| x.map_or("-".to_owned(), |v| format!("{v:.1}"));
        println!(
            "{:<18} {:<32} {:<8} {:>7} {:>7} {:>6.1} {:>6.1} {:>7.3} {:>7.3} {:>9} {:>9}",
            key.0,
            key.1,
            key.2,
            a.requests,
            b.requests,
            a.rps,
            b.rps,
            a.share,
            b.share,
            format!("{}/{}", ms(a.p50), ms(a.p99)),
            format!("{}/{}", ms(b.p50), ms(b.p99))
        );
        let source_total = |g: &BTreeMap<Group, Agg>| -> u64 {
            g.iter()
                .filter(|(k, _)| k.0 == key.0 && k.1 == key.1)
                .map(|(_, a)| a.requests)
                .sum()
        };
        if source_total(&p) >= ENOUGH_CALLS / 2 && source_total(&w) >= ENOUGH_CALLS / 2 {
            compared += 1;
            assert!(
                (a.share - b.share).abs() <= SHARE_TOLERANCE,
                "{key:?}: observed share {:.3} from Prometheus, {:.3} from the window \
                 (± {SHARE_TOLERANCE})",
                a.share,
                b.share
            );
        }
    }
    assert!(compared >= 2, "too few shares compared: {compared}");
    // p50 and p99 on Prometheus' edges from frontend to catalog.
    for version in ["v1", "v2"] {
        let a = &p[&frontend_catalog(&p, version)];
        assert!(
            a.p50.is_some_and(|v| v > 0.0) && a.p99.is_some_and(|v| v >= a.p50.unwrap_or(0.0)),
            "frontend → catalog {version}: p50 {:?}, p99 {:?} from Prometheus",
            a.p50,
            a.p99
        );
    }

    // The page, in a browser: the graph drawn from Prometheus.
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/drive_prom.py");
    let token_file = shop.get("control-token-file").to_owned();
    let (origin_env, shots_env) = (origin.clone(), shots.clone());
    let out = tokio::task::spawn_blocking(move || {
        Command::new(&python)
            .arg(&script)
            .env("ORIGIN", &origin_env)
            .env("TOKEN_FILE", &token_file)
            .env("CHROMIUM", &chromium)
            .env("SHOTS", &shots_env)
            .output()
            .expect("run tests/ui/drive_prom.py")
    })
    .await
    .expect("drive_prom.py");
    let after = groups(&api.graph("prometheus").await);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "drive_prom.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("PROM-RESULT "))
        .unwrap_or_else(|| {
            panic!("drive_prom.py printed no PROM-RESULT line:\n{stdout}\n{stderr}")
        });
    let r: Value = serde_json::from_str(line).expect("PROM-RESULT is JSON");
    println!("screenshot: {}", r["shot"].as_str().unwrap_or_default());
    let status = shop.stop();
    drop(prometheus);

    assert!(
        r["errors"].as_array().is_none_or(Vec::is_empty),
        "{}\nconsole: {}",
        r["errors"],
        r["console"]
    );
    let sources: Vec<&str> = r["graph_sources"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        !sources.is_empty() && sources.iter().all(|s| *s == "prometheus"),
        "the page's GET /v1/graph answers came from {sources:?} (statuses {})",
        r["graph_statuses"]
    );
    let page_share: f64 = r["v2_edges"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["share"].as_f64())
        .sum();
    let api_share = after[&frontend_catalog(&after, "v2")].share;
    println!(
        "page (from Prometheus): frontend → catalog v2 share {page_share:.3}; API right after: \
         {api_share:.3}; window earlier: {:.3}; {} answers of /v1/graph, all X-Graph-Source: prometheus",
        w[&frontend_catalog(&w, "v2")].share,
        sources.len()
    );
    assert!(
        (page_share - api_share).abs() <= SHARE_TOLERANCE,
        "the page's v2 share {page_share:.3}, the API's {api_share:.3}"
    );
    assert!(status.success(), "the shop exited with {status}");
}

/// The admin API with the operator token.
struct Api {
    addr: SocketAddr,
    tls: Arc<rustls::ClientConfig>,
    token: String,
}

impl Api {
    /// `GET /v1/graph?source=<source>`, which must answer 200.
    async fn graph(&self, source: &str) -> Value {
        let (status, body) = mesh_testkit::http::json_request_tls_bearer(
            self.addr,
            self.tls.clone(),
            "GET",
            &format!("/v1/graph?source={source}"),
            Some(&self.token),
            &Value::Null,
        )
        .await;
        assert_eq!(status, 200, "GET /v1/graph?source={source}: {body}");
        body
    }
}

/// An edge group's figures: calls and shares summed over what the group
/// merges (source versions, service accounts, protocols, mTLS modes);
/// latency of its busiest edge.
#[derive(Debug, Default)]
struct Agg {
    requests: u64,
    rps: f64,
    share: f64,
    p50: Option<f64>,
    p99: Option<f64>,
    busiest: u64,
}

/// The graph's edges from the shop's namespace to its services, by
/// source workload → service → version.
fn groups(graph: &Value) -> BTreeMap<Group, Agg> {
    let mut out: BTreeMap<Group, Agg> = BTreeMap::new();
    for e in graph["edges"].as_array().into_iter().flatten() {
        let text = |k: &str| e[k].as_str().unwrap_or_default().to_owned();
        if text("source_namespace") != "shop"
            || !text("destination_service").ends_with(".shop.svc.cluster.local")
        {
            continue;
        }
        let key = (
            format!("shop/{}", text("source_workload")),
            text("destination_service"),
            text("destination_version"),
        );
        let requests = e["requests"].as_u64().unwrap_or(0);
        let a = out.entry(key).or_default();
        a.requests += requests;
        a.rps += e["rps"].as_f64().unwrap_or(0.0);
        a.share += e["observed_share"].as_f64().unwrap_or(0.0);
        if requests >= a.busiest {
            a.busiest = requests;
            a.p50 = e["p50_ms"].as_f64();
            a.p99 = e["p99_ms"].as_f64();
        }
    }
    out
}

/// The group frontend → catalog `version` (the frontend's workload name
/// carries its version: `frontend-v1`).
fn frontend_catalog(g: &BTreeMap<Group, Agg>, version: &str) -> Group {
    g.keys()
        .find(|(source, service, v)| {
            source.starts_with("shop/frontend") && service.starts_with("catalog.") && v == version
        })
        .cloned()
        .unwrap_or_else(|| {
            panic!(
                "no edge frontend → catalog {version}: {:?}",
                g.keys().collect::<Vec<_>>()
            )
        })
}

/// Calls frontend → catalog v1 and v2 in the graph.
fn catalog_calls(graph: &Value) -> (u64, u64) {
    let g = groups(graph);
    let calls = |version: &str| {
        g.iter()
            .filter(|((source, service, v), _)| {
                source.starts_with("shop/frontend")
                    && service.starts_with("catalog.")
                    && v == version
            })
            .map(|(_, a)| a.requests)
            .sum::<u64>()
    };
    (calls("v1"), calls("v2"))
}
