//! mesh-control's web page (`/ui`, issue 17) in a real browser: Debian's
//! Chromium driven by Playwright (Python), against the shop demo running in
//! `--serve` mode (a CA, TLS, a read-only operator token, steady traffic).
//!
//! The test installs what it needs: `chromium` with apt (as root; otherwise it
//! fails with the command to run) and Playwright with pip in a venv under the
//! target dir (`ui-venv`). It never runs `playwright install`: that downloads
//! a browser build, which this project does not fetch; Playwright launches
//! the system Chromium through `executable_path`.
//!
//! What it asserts, as an operator would see it (tests/ui/drive_ui.py drives
//! the page and reports; this file decides):
//! - without credentials `/ui` is the login form (401) and `/status`,
//!   `/v1/graph` and the page's script answer 401; a wrong token sets no
//!   cookie;
//! - the operator token through the form gives a session cookie that is
//!   HttpOnly, Secure, SameSite=Strict and is not the token; the page
//!   carries `Content-Security-Policy: default-src 'self'`;
//! - the config-sync table lists every client `/status` lists, each with
//!   every type ACKed and no NACK;
//! - every request the page made went to the admin origin (nothing from a
//!   CDN or elsewhere);
//! - the graph shows frontend → catalog with both versions, v2's observed
//!   share of the answered calls within a computed tolerance of the
//!   configured 10%, the configured share (90% / 10%) on each edge's label,
//!   the frontend workload with its version as a sub-node, and a padlock
//!   (`data-mtls="true"`) on frontend → catalog (the shop runs STRICT
//!   mTLS);
//! - clicking catalog shows its routes in order (the chaos routes, the
//!   beta-user header match, the 90/10 split), each weighted destination
//!   with its version's live rps beside the configured percent, and the
//!   note that live traffic is per destination version;
//! - the denials table lists the intruder's denials under a policy, with
//!   a count;
//! - the page refreshes without reloading; logging out ends the session on
//!   the server (the old cookie replayed gets a 401).
//!
//! Screenshots go to `target/ui-shots/` (their paths are printed).
//!
//! Run: `cargo test -p proxyless --test ui_browser -- --nocapture`.

#[path = "support/shop_serve.rs"]
mod shop_serve;

use std::path::Path;
use std::process::Command;

use mesh_testkit::install::{Venv, ensure_deb, target_dir};
use serde_json::Value;
use shop_serve::Shop;

/// The Playwright release the test pins.
const PLAYWRIGHT: &str = "playwright==1.65.2";

/// The shop's canary for frontend → catalog in `--serve` mode: the default
/// route's 90/10 split, and no beta users in its steady load.
const CATALOG_V2_SHARE: f64 = 0.10;
/// The answered frontend → catalog calls (v1 + v2) the page is read after
/// (drive_ui.py waits for them; at 20 checkouts a second, under a minute).
const MIN_CALLS: u64 = 1_000;
/// How many standard deviations of the binomial share the observed one may
/// be off by: 4 σ fails a correct split about once in 16,000 runs.
const SIGMAS: f64 = 4.0;
/// The chaos checkouts' bias: once a second about one `chaos-fault`
/// checkout is delayed and answered by v1 and a few `chaos-slow` ones
/// time out on a v1 endpoint (both counted as v1), against 20 ordinary
/// checkouts: up to 1.5 extra v1 calls per 20 pull v2's share down to
/// 0.10 × 20 / 21.5 = 0.093. Measured: 53 such calls per 1,215 ordinary
/// ones (0.0044 off).
const CHAOS_BIAS: f64 = 0.007;

#[test]
fn the_ui_shows_config_sync_and_the_graph_in_a_browser() {
    // Install before the shop starts (these may take minutes the first time).
    let chromium = ensure_deb(&["chromium"], "chromium").unwrap_or_else(|e| panic!("{e}"));
    let python = Venv::in_target_dir("ui-venv", &[PLAYWRIGHT], &["playwright.sync_api"])
        .ensure()
        .unwrap_or_else(|e| panic!("{e}"));
    let shots = target_dir().join("ui-shots");
    std::fs::create_dir_all(&shots).expect("create target/ui-shots");

    let mut shop = Shop::start();
    let origin = shop
        .get("control-metrics")
        .strip_suffix("/metrics")
        .expect("control-metrics ends with /metrics")
        .to_owned();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/ui/drive_ui.py");
    let out = Command::new(&python)
        .arg(&script)
        .env("ORIGIN", &origin)
        .env("TOKEN_FILE", shop.get("control-token-file"))
        .env("CA", shop.get("control-ca"))
        .env("CHROMIUM", &chromium)
        .env("SHOTS", &shots)
        .env("MIN_CALLS", MIN_CALLS.to_string())
        .output()
        .expect("run tests/ui/drive_ui.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "drive_ui.py failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    let line = stdout
        .lines()
        .find_map(|l| l.strip_prefix("UI-RESULT "))
        .unwrap_or_else(|| panic!("drive_ui.py printed no UI-RESULT line:\n{stdout}\n{stderr}"));
    let r: Value = serde_json::from_str(line).expect("UI-RESULT is JSON");
    for shot in r["shots"].as_array().into_iter().flatten() {
        println!("screenshot: {}", shot.as_str().unwrap_or_default());
    }
    let status = shop.stop();
    assert!(status.success(), "the shop exited with {status}");
    check(&r, &origin);
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_owned))
        .collect()
}

fn check(r: &Value, origin: &str) {
    let ctx = || format!("console: {}\nerrors: {}", r["console"], r["errors"]);
    // Without credentials.
    assert_eq!(r["unauthenticated_status"], 401, "/ui without credentials");
    assert_eq!(
        r["login_form"], true,
        "/ui without credentials shows the login form"
    );
    assert_eq!(
        r["unauthenticated_api"],
        serde_json::json!([401, 401, 401]),
        "/status, /v1/graph and /ui/app.js without credentials"
    );
    assert_eq!(
        r["wrong_token_form"], true,
        "a wrong token gets the form again"
    );
    assert_eq!(
        r["cookies_after_wrong_token"], 0,
        "a wrong token sets no cookie"
    );

    // The session cookie and the page's headers.
    let cookies = r["cookies"].as_array().expect("cookies");
    assert_eq!(cookies.len(), 1, "one session cookie: {cookies:?}");
    let cookie = &cookies[0];
    assert_eq!(cookie["httpOnly"], true, "{cookie}");
    assert_eq!(cookie["secure"], true, "{cookie}");
    assert_eq!(cookie["sameSite"], "Strict", "{cookie}");
    assert_eq!(
        r["token_in_cookie"], false,
        "the cookie must not hold the token"
    );
    let csp = r["ui_headers"]["content-security-policy"]
        .as_str()
        .unwrap_or_default();
    assert!(
        csp.contains("default-src 'self'") && !csp.contains("unsafe"),
        "CSP: {csp:?}"
    );

    // The config-sync table: every client of /status, every type ACKed.
    let expected = strings(&r["status_node_ids"]);
    let rows = r["rows"].as_array().expect("rows");
    let mut shown: Vec<String> = rows
        .iter()
        .filter_map(|row| row["node"].as_str().map(str::to_owned))
        .collect();
    shown.sort();
    for id in &expected {
        assert!(
            shown.contains(id),
            "{id} is in /status but not in the table: {shown:?}"
        );
    }
    for workload in ["frontend", "catalog", "payment", "shopper"] {
        assert!(
            shown.iter().any(|id| id.contains(workload)),
            "no row for {workload}: {shown:?}"
        );
    }
    for row in rows {
        assert_eq!(row["acked"], true, "not every type ACKed: {row}\n{}", ctx());
        assert_eq!(row["nack"], "", "a NACK: {row}");
        assert!(
            !row["types"].as_array().is_none_or(Vec::is_empty),
            "no types: {row}"
        );
    }

    // Every request went to the admin origin.
    let requests = strings(&r["requests"]);
    assert!(
        requests.len() >= 5,
        "too few requests recorded: {requests:?}"
    );
    for url in &requests {
        assert!(
            url.starts_with(&format!("{origin}/")),
            "the page requested {url}, outside {origin}"
        );
    }
    for path in [
        "/ui/app.js",
        "/ui/app.css",
        "/status",
        "/v1/graph",
        "/v1/routes?service=",
    ] {
        assert!(
            requests.iter().any(|u| u.contains(path)),
            "the page never requested {path}: {requests:?}"
        );
    }

    // The graph: frontend (with its version) → catalog v1 and v2, v2's
    // share of the answered calls near the configured split.
    let nodes = r["graph_nodes"].as_array().cloned().unwrap_or_default();
    let node = |cls: &str, prefix: &str| {
        nodes
            .iter()
            .find(|n| {
                n["cls"]
                    .as_str()
                    .is_some_and(|c| c.split(' ').any(|c| c == cls))
                    && n["id"].as_str().is_some_and(|id| id.starts_with(prefix))
            })
            .cloned()
            .unwrap_or_else(|| panic!("no {cls} node {prefix}*: {nodes:?}\n{}", ctx()))
    };
    let versions = strings(&node("service", "catalog.")["versions"]);
    assert!(
        versions.contains(&"v1".to_owned()) && versions.contains(&"v2".to_owned()),
        "catalog's versions: {versions:?}"
    );
    let frontend_versions = strings(&node("workload", "shop/frontend")["versions"]);
    assert_eq!(
        frontend_versions,
        ["v1"],
        "the frontend workload's version sub-nodes"
    );
    let edges = r["graph_edges"].as_array().expect("graph edges");
    let to_catalog = |version: &str| -> Vec<&Value> {
        edges
            .iter()
            .filter(|e| {
                e["source"]
                    .as_str()
                    .is_some_and(|s| s.starts_with("shop/frontend"))
                    && e["service"]
                        .as_str()
                        .is_some_and(|s| s.starts_with("catalog."))
                    && e["version"] == version
            })
            .collect()
    };
    let requests = |version: &str| -> u64 {
        to_catalog(version)
            .iter()
            .filter_map(|e| e["requests"].as_u64())
            .sum()
    };
    let (v1, v2) = (requests("v1"), requests("v2"));
    assert!(
        v1 > 0 && v2 > 0,
        "frontend → catalog requests: v1 {v1}, v2 {v2}; edges: {edges:?}\n{}",
        ctx()
    );
    // The page sums an edge over the identities that pushed it; the calls
    // are its count over their number.
    let senders = r["frontend_catalog_senders"]
        .as_array()
        .map_or(1, Vec::len)
        .max(1) as u64;
    let calls = (v1 + v2) / senders;
    // Of the calls an endpoint answered: the chaos checkouts' injected
    // aborts and overflows end before one does (version `unknown`).
    let v2_share = v2 as f64 / (v1 + v2) as f64;
    let sigma = (CATALOG_V2_SHARE * (1.0 - CATALOG_V2_SHARE) / calls as f64).sqrt();
    let tolerance = SIGMAS * sigma + CHAOS_BIAS;
    println!(
        "frontend → catalog: {calls} answered calls ({senders} sender(s) of the edge); \
         v2's observed share {v2_share:.4}, configured {CATALOG_V2_SHARE}, σ {sigma:.4}, \
         tolerance {SIGMAS} σ + {CHAOS_BIAS} = {tolerance:.4}"
    );
    assert!(
        calls >= MIN_CALLS,
        "the page was read after {calls} answered calls, fewer than {MIN_CALLS}\n{}",
        ctx()
    );
    assert!(
        (v2_share - CATALOG_V2_SHARE).abs() <= tolerance,
        "v2's observed share of frontend → catalog (answered calls) is {v2_share:.4}, \
         configured {CATALOG_V2_SHARE} ± {tolerance:.4}"
    );
    // The page's own figure is the same share.
    let shown = to_catalog("v2")
        .first()
        .and_then(|e| e["answered_share"].as_f64())
        .unwrap_or(-1.0);
    assert!(
        (shown - v2_share).abs() < 1e-3,
        "the v2 edge's answered share {shown} vs {v2_share}"
    );
    // Configured vs observed on each label.
    for (version, configured) in [("v1", "90%"), ("v2", "10%")] {
        for e in to_catalog(version) {
            let label = e["label"].as_str().unwrap_or_default();
            for part in [
                "rps",
                "% err",
                "p50",
                "p99",
                "% of answered calls",
                &format!("(configured {configured})"),
            ] {
                assert!(
                    label.contains(part),
                    "frontend → catalog {version}: label {label:?} lacks {part:?}"
                );
            }
        }
    }

    // Clicking catalog: its rules in order, each destination with its
    // version's live traffic.
    let routes = r["routes_text"].as_str().unwrap_or_default();
    for part in [
        "|v1|catalog.shop.svc.cluster.local 90% configured",
        "|v2|catalog.shop.svc.cluster.local 10% configured",
        "x-user",
        "beta",
        "Live traffic is per destination version",
        "no route name",
    ] {
        assert!(
            routes.contains(part),
            "catalog's routes lack {part:?}:\n{routes}"
        );
    }
    let rules = r["routes"].as_array().cloned().unwrap_or_default();
    let names: Vec<&str> = rules.iter().filter_map(|r| r["name"].as_str()).collect();
    let beta = names.iter().position(|n| *n == "beta-users");
    let split = rules
        .iter()
        .position(|r| r["destinations"].as_array().is_some_and(|d| d.len() == 2));
    assert!(
        beta.is_some() && split.is_some() && beta < split,
        "catalog's rules in order: beta users before the split: {names:?}"
    );
    let split = &rules[split.unwrap_or_default()];
    for (version, percent) in [("v1", 90.0), ("v2", 10.0)] {
        let dest = split["destinations"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|d| d["version"] == version)
            .unwrap_or_else(|| panic!("the split has no {version} destination: {split}"));
        assert_eq!(dest["percent"].as_f64(), Some(percent), "{dest}");
        let live = dest["live_rps"].as_f64().unwrap_or_default();
        let text = dest["text"].as_str().unwrap_or_default();
        assert!(
            live > 0.0 && text.contains(&format!("live {version}: ")) && text.contains(" rps"),
            "the split's {version} shows no live rps: {dest}"
        );
    }

    // Refresh in place; logout.
    assert_eq!(
        r["refreshed_in_place"], true,
        "the page did not refresh in place"
    );
    assert_eq!(r["error_banner"], "", "the page showed an error");
    assert_eq!(r["after_logout_api"], 401, "/status after logging out");
    assert_eq!(
        r["old_cookie_replayed"], 401,
        "the old session cookie after logout"
    );
    assert!(
        r["errors"].as_array().is_none_or(Vec::is_empty),
        "{}",
        ctx()
    );

    // Last, as they depend on data other parts of the mesh report: the
    // padlock (EdgeKey.mtls, from the workloads' pushes) and the denials
    // (from `mesh_authz_denied_total`).
    let mut missing = Vec::new();
    for version in ["v1", "v2"] {
        for e in to_catalog(version) {
            if e["mtls"] != "true" {
                missing.push(format!(
                    "frontend → catalog {version} is not shown as mutual TLS (data-mtls {}), \
                     though the shop runs STRICT mTLS: {e}",
                    e["mtls"]
                ));
            }
        }
    }
    if r["graph_locks"].as_u64().unwrap_or_default() == 0 {
        missing.push("the graph draws no padlock".to_owned());
    }
    let denials = r["denials"].as_array().cloned().unwrap_or_default();
    let intruder: Vec<&Value> = denials
        .iter()
        .filter(|d| {
            d["text"]
                .as_str()
                .is_some_and(|t| t.contains("/sa/intruder"))
        })
        .collect();
    if intruder.is_empty() {
        missing.push(format!(
            "the denials table lists none of the intruder's denials: {denials:?}"
        ));
    }
    let cells = strings(&r["denials_policy_cells"]);
    for d in &intruder {
        let policy = d["policy"].as_str().unwrap_or_default();
        let named = if policy.is_empty() {
            "(default deny: no ALLOW policy matched)"
        } else {
            policy
        };
        if d["count"].as_u64().unwrap_or_default() == 0
            || !cells
                .iter()
                .any(|c| c.starts_with(named) && c.contains(" denied"))
        {
            missing.push(format!(
                "an intruder denial without its policy {named:?} or a count: {d}; policy cells {cells:?}"
            ));
        }
    }
    assert!(missing.is_empty(), "{}", missing.join("\n"));
}
