//! Dashboards proven: every query of the mesh's own Grafana dashboard
//! (`docs/grafana/proxyless-mesh.json`) and the HTTP/gRPC queries of Istio's
//! Mesh, Service and Workload dashboards, with Grafana's variables filled in for
//! the shop, run against a real Prometheus scraping the running shop demo.
//!
//! The queries are in `tests/fixtures/dashboard-queries.tsv` (its header says
//! how it is laid out and where each query comes from). The test starts
//! `examples/shop.rs` in `--serve` mode (a steady load of checkouts: canary
//! splits, the flaky payment instance's retries, an intruder's
//! denied calls and the chaos shoppers that make faults, timeouts, breaker
//! overflows and a passed deadline), a Prometheus (Debian's `prometheus`,
//! installed as root, otherwise the test fails with the apt command) scraping
//! the shop's `/metrics` and mesh-control's (HTTPS with an operator token)
//! every second, waits until both targets are up and every query expected to
//! answer does, then asserts each query's answer: `data` queries return at
//! least one series, `empty` ones none (the reason is in the fixture), `n/a`
//! ones (TCP, istiod) are not run. A failure lists every query that answered
//! otherwise, with its dashboard and panel.

#[path = "support/shop_serve.rs"]
mod shop_serve;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use mesh_testkit::prometheus::{PrometheusServer, ScrapeJob};
use shop_serve::Shop;

/// How long every `data` query may take to answer once the targets are up:
/// the series of rare events (an outlier ejection) appear within a few
/// seconds of load, and `rate()` needs two samples of each.
const ANSWERS_WITHIN: Duration = Duration::from_secs(30);

/// One line of the fixture.
#[derive(Debug)]
struct Query {
    /// Line number in the fixture.
    line: usize,
    expect: Expect,
    origin: String,
    promql: String,
}

#[derive(Debug, PartialEq)]
enum Expect {
    Data,
    Empty(String),
    NotApplicable(String),
}

fn fixture_path() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/dashboard-queries.tsv")
}

/// The fixture's queries; panics at the `file:line` of a malformed line.
fn queries() -> Vec<Query> {
    let path = fixture_path();
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() || line.starts_with('#') {
            continue;
        }
        let at = format!("{}:{}", path.display(), i + 1);
        let mut fields = line.splitn(3, '\t');
        let (Some(expect), Some(origin), Some(promql)) =
            (fields.next(), fields.next(), fields.next())
        else {
            panic!("{at}: expected `expect<TAB>origin<TAB>query`");
        };
        let expect = match expect.split_once(": ") {
            None if expect == "data" => Expect::Data,
            Some(("empty", why)) => Expect::Empty(why.to_owned()),
            Some(("n/a", why)) => Expect::NotApplicable(why.to_owned()),
            _ => panic!("{at}: expectation {expect:?} is not `data`, `empty: why` or `n/a: why`"),
        };
        out.push(Query {
            line: i + 1,
            expect,
            origin: origin.to_owned(),
            promql: promql.to_owned(),
        });
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_queries_answer_for_the_shop() {
    let queries = queries();
    assert!(queries.len() > 200, "the fixture lost queries");
    // Install Prometheus before the shop starts (it may take a while).
    tokio::task::spawn_blocking(PrometheusServer::binary)
        .await
        .expect("installing prometheus");
    let mut shop = tokio::task::spawn_blocking(Shop::start)
        .await
        .expect("starting the shop");
    let jobs = [
        ScrapeJob::new("shop", shop.get("metrics")),
        ScrapeJob::new("mesh-control", shop.get("control-metrics"))
            .tls(
                std::path::Path::new(shop.get("control-ca")),
                shop.get("control-server-name"),
            )
            .bearer_token_file(std::path::Path::new(shop.get("control-token-file"))),
    ];
    let prometheus = PrometheusServer::start(&jobs, Duration::from_secs(1)).await;
    let started = Instant::now();

    // Both targets up (mesh-control's scrape authenticated over TLS).
    let mut targets = Vec::new();
    while started.elapsed() < ANSWERS_WITHIN {
        targets = prometheus.targets().await.expect("GET /api/v1/targets");
        if targets.len() == 2 && targets.iter().all(|(_, health, _)| health == "up") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        targets.len() == 2 && targets.iter().all(|(_, health, _)| health == "up"),
        "scrape targets not up: {targets:?}\nprometheus log:\n{}",
        prometheus.log_tail()
    );

    // Poll until every `data` query answers (bounded), then check them all once more
    // with the `empty` ones.
    let run: Vec<&Query> = queries
        .iter()
        .filter(|q| !matches!(q.expect, Expect::NotApplicable(_)))
        .collect();
    let mut problems;
    loop {
        problems = Vec::new();
        for q in &run {
            match prometheus.query(&q.promql).await {
                Err(e) => problems.push(format!("{}: query failed: {e}", describe(q))),
                Ok(series) => match (&q.expect, series.is_empty()) {
                    (Expect::Data, true) => problems.push(format!("{}: no data", describe(q))),
                    (Expect::Empty(_), false) => problems.push(format!(
                        "{}: expected no data, got {} series, e.g. {}",
                        describe(q),
                        series.len(),
                        series[0]
                    )),
                    _ => {}
                },
            }
        }
        if problems.is_empty() || started.elapsed() > ANSWERS_WITHIN {
            break;
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    let status = shop.stop();
    let not_applicable = queries.len() - run.len();
    eprintln!(
        "{} dashboard queries: {} run ({} with data, {} empty as expected), {not_applicable} not applicable; \
         {} s after Prometheus started",
        queries.len(),
        run.len(),
        run.iter().filter(|q| q.expect == Expect::Data).count(),
        run.iter()
            .filter(|q| matches!(q.expect, Expect::Empty(_)))
            .count(),
        started.elapsed().as_secs()
    );
    assert!(
        problems.is_empty(),
        "{} of {} dashboard queries did not answer as expected:\n{}",
        problems.len(),
        run.len(),
        problems.join("\n")
    );
    assert!(
        status.success(),
        "the shop exited with {status} after its stdin closed"
    );
}

fn describe(q: &Query) -> String {
    let why = match &q.expect {
        Expect::Empty(why) => format!(" (expected empty: {why})"),
        _ => String::new(),
    };
    format!(
        "dashboard-queries.tsv:{} {}{why}\n    {}",
        q.line, q.origin, q.promql
    )
}
