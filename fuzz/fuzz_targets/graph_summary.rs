//! The JSON body of `POST /v1/graph/summaries` (a workload's per-edge
//! summary, issue 17), as mesh-control reads it: `Summary` from JSON, then
//! its validation (whose error is the 400 message); an accepted summary is
//! recorded into a small window twice (the second time past its slots, so
//! rings wrap and edges and denials are evicted) and the graph is computed from it, as
//! `GET /v1/graph` does: none of it may panic, overflow or divide by zero.
#![no_main]

use libfuzzer_sys::fuzz_target;
use mesh_core::graph::{GraphWindow, Summary, SummaryLimits, WindowConfig};

fuzz_target!(|data: &[u8]| {
    let Ok(summary) = serde_json::from_slice::<Summary>(data) else {
        return;
    };
    if summary.validate(&SummaryLimits::default()).is_err() {
        return;
    }
    let mut window = GraphWindow::new(WindowConfig {
        max_edges: 4,
        max_denials: 2,
        ..WindowConfig::default()
    });
    // A workload's own denials: the attribution check must not panic either.
    let _ = summary.foreign_denial("shop");
    window.record(&summary, 1_000);
    let _ = window.graph(1_000);
    let later = window.config().window_ms().saturating_add(2_000);
    window.record(&summary, later);
    let _ = window.graph(later);
    let _ = window.bytes();
    window.expire(u64::MAX);
    let _ = window.graph(u64::MAX);
});
