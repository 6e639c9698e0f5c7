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
//!   share near the configured split, and clicking catalog shows its
//!   routes (the 90/10 weights and the beta-user header match);
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

/// The shop's canary for frontend → catalog in `--serve` mode: 90/10, and
/// every 10th checkout a beta user, whom the config sends to v2 only; so
/// v2 takes 0.1 + 0.9 × 0.1 of frontend's calls to catalog.
const CATALOG_V2_SHARE: f64 = 0.19;
/// How far the observed share may be from it. The page is read once
/// frontend → catalog v1 + v2 holds 600 calls (drive_ui.py waits for
/// them): one standard deviation is then 0.016, so this is 5 σ, with
/// room for the chaos checkouts' few extra calls to v1 (about 1 in 50).
const SHARE_TOLERANCE: f64 = 0.08;

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

    // The graph: frontend → catalog v1 and v2, v2's share near the split.
    let catalog = r["graph_nodes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| {
            n["id"]
                .as_str()
                .is_some_and(|id| id.starts_with("catalog."))
        })
        .unwrap_or_else(|| panic!("no catalog service node: {}\n{}", r["graph_nodes"], ctx()));
    let versions = strings(&catalog["versions"]);
    assert!(
        versions.contains(&"v1".to_owned()) && versions.contains(&"v2".to_owned()),
        "catalog's versions: {versions:?}"
    );
    let edges = r["graph_edges"].as_array().expect("graph edges");
    let share = |version: &str| {
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
            .filter_map(|e| e["share"].as_f64())
            .sum::<f64>()
    };
    let (v1, v2) = (share("v1"), share("v2"));
    assert!(
        v1 > 0.0 && v2 > 0.0,
        "frontend → catalog edges: v1 {v1}, v2 {v2}; edges: {edges:?}\n{}",
        ctx()
    );
    // Of the calls an endpoint answered: the chaos checkouts' injected
    // faults and timeouts end before one does (version `unknown`).
    let v2_of_answered = v2 / (v1 + v2);
    println!(
        "frontend → catalog observed shares: v1 {v1:.3}, v2 {v2:.3} ({v2_of_answered:.3} of answered)"
    );
    assert!(
        (v2_of_answered - CATALOG_V2_SHARE).abs() <= SHARE_TOLERANCE,
        "v2's observed share of frontend → catalog (answered calls) is {v2_of_answered:.3}, \
         configured {CATALOG_V2_SHARE} ± {SHARE_TOLERANCE}"
    );
    let label = edges
        .iter()
        .filter_map(|e| e["label"].as_str())
        .find(|l| l.contains("rps"))
        .unwrap_or_default();
    for part in ["rps", "% err", "p50", "p99", "% of calls"] {
        assert!(label.contains(part), "edge label {label:?} lacks {part}");
    }

    // Clicking catalog: its routing rules.
    let routes = r["routes_text"].as_str().unwrap_or_default();
    for part in [
        "|v1|catalog.shop.svc.cluster.local 90%",
        "|v2|catalog.shop.svc.cluster.local 10%",
        "x-user",
        "beta",
    ] {
        assert!(
            routes.contains(part),
            "catalog's routes lack {part:?}:\n{routes}"
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
}
