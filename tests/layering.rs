//! Crate shape (issue 14): no two modules of a crate import each other, and
//! the lower layers of mesh-tower do not import the higher ones.
//!
//! Reads the source of mesh-core, mesh-tower, mesh-control and
//! mesh-xds-client with `mesh_testkit::layering` (the rules of what counts
//! are in its docs). A cycle not in [`ALLOWED`] fails the test, naming a
//! reference each way; so does an entry of [`ALLOWED`] that no longer
//! happens, so the list only shrinks.

use std::path::Path;

use mesh_testkit::layering::{self, Cycle};

/// The crates checked, by directory.
const CRATES: [&str; 4] = ["mesh-core", "mesh-tower", "mesh-control", "mesh-xds-client"];

/// Cycles known when the checker came, not yet broken: `(crate, "a <-> b",
/// why)`. Each entry is a fix to make (move the shared item below both),
/// never a place to add a new cycle.
const ALLOWED: &[(&str, &str, &str)] = &[
    // mesh-core: the route model holds each policy's compiled form, and the
    // policies are built from the model's matchers and names. Fix: the
    // matchers (`RouteMatch`, `ValueMatch`, `PathMatch`, `Fraction`, `Name`)
    // in a module below `model`.
    (
        "mesh-core",
        "cors <-> model",
        "model holds cors::CorsRoute; cors matches with model::RouteMatch",
    ),
    (
        "mesh-core",
        "model <-> ratelimit",
        "model holds ratelimit::RateLimitConfig; ratelimit uses model::Fraction",
    ),
    (
        "mesh-core",
        "model <-> traffic",
        "model holds traffic::Traffic; traffic uses model::{Name, PathMatch}",
    ),
    // mesh-tower: files edited by the request-path work at the same time.
    (
        "mesh-tower",
        "mesh <-> mirror",
        "mesh re-exports mirror; mirror calls mesh::outcome_of (move it below both)",
    ),
    (
        "mesh-tower",
        "mesh::future <-> mesh::service",
        "the service's future and the service share Config and helpers",
    ),
    (
        "mesh-tower",
        "telemetry::exchange <-> telemetry::record",
        "the record stores exchange::Start; exchange writes the record",
    ),
    (
        "mesh-tower",
        "telemetry::incoming <-> telemetry::propagation",
        "incoming extracts trace context; propagation reads incoming's",
    ),
    (
        "mesh-tower",
        "telemetry::incoming <-> telemetry::record",
        "the record stores incoming::Incoming; incoming writes the record",
    ),
    // mesh-control.
    (
        "mesh-control",
        "admin::graph <-> state",
        "Shared holds graph::GraphStore; the endpoints read Shared",
    ),
    (
        "mesh-control",
        "admin::ui <-> state",
        "Shared holds ui::Sessions; the endpoints read Shared",
    ),
    (
        "mesh-control",
        "compat <-> config",
        "ConfigStore::grpc_security_gaps calls compat; compat reads config",
    ),
    (
        "mesh-control",
        "dialect::envoy <-> dialect::gateway",
        "envoy dispatches to gateway; gateway reuses envoy's encoders",
    ),
    (
        "mesh-control",
        "dialect::envoy <-> state",
        "state reads dialect::envoy::OUTBOUND_PORT_KEY (move it into state)",
    ),
    (
        "mesh-control",
        "dns <-> state",
        "state calls dns::carry_over; dns reads Shared",
    ),
    (
        "mesh-control",
        "etcd::client <-> etcd::txn",
        "txn uses client::prefix_end (move it below both)",
    ),
    (
        "mesh-control",
        "etcd::client <-> etcd::watch",
        "watch uses client::{Etcd, Retry}; client starts watches",
    ),
    (
        "mesh-control",
        "persist <-> registry",
        "persist stores registry::Lease; registry uses persist::StoredLease",
    ),
    // mesh-xds-client.
    (
        "mesh-xds-client",
        "bootstrap <-> client",
        "bootstrap calls client::check_settings (move it into bootstrap)",
    ),
    (
        "mesh-xds-client",
        "client <-> dns",
        "client reads dns::DNS_SERVER_ENV_VAR; dns holds Weak<client::Published>",
    ),
    (
        "mesh-xds-client",
        "client <-> dump",
        "client uses dump::rfc3339; dump uses client::human_duration",
    ),
];

/// Imports a lower layer of mesh-tower must not make: `(from, to)`,
/// each naming a module and its children.
const TOWER_LAYERS: [(&str, &str); 3] = [
    ("pool", "mesh"),
    ("server", "serve"),
    ("telemetry", "serve"),
];

fn src(krate: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join(krate)
        .join("src")
}

#[test]
fn no_two_modules_import_each_other() {
    let mut failures = Vec::new();
    for krate in CRATES {
        let cycles: Vec<Cycle> =
            layering::check_dir(&src(krate)).unwrap_or_else(|e| panic!("reading {krate}/src: {e}"));
        for cycle in &cycles {
            if !ALLOWED
                .iter()
                .any(|(k, pair, _)| *k == krate && *pair == cycle.pair())
            {
                failures.push(format!("{krate}: new cycle {cycle}"));
            }
        }
        for (_, pair, _) in ALLOWED.iter().filter(|(k, _, _)| *k == krate) {
            if !cycles.iter().any(|c| c.pair() == *pair) {
                failures.push(format!(
                    "{krate}: {pair} is no longer a cycle: remove it from ALLOWED"
                ));
            }
        }
    }
    assert!(
        failures.is_empty(),
        "two-module import cycles (move the shared item into a module below both):\n{}",
        failures.join("\n")
    );
}

#[test]
fn lower_tower_layers_do_not_import_higher_ones() {
    let within = |module: &str, layer: &str| {
        module == layer
            || module
                .strip_prefix(layer)
                .is_some_and(|r| r.starts_with("::"))
    };
    let references = layering::references_dir(&src("mesh-tower"))
        .unwrap_or_else(|e| panic!("reading mesh-tower/src: {e}"));
    let broken: Vec<String> = references
        .iter()
        .filter(|r| {
            TOWER_LAYERS
                .iter()
                .any(|(low, high)| within(&r.from, low) && within(&r.to, high))
        })
        .map(|r| format!("{} imports {} at {}", r.from, r.to, r.site))
        .collect();
    assert!(
        broken.is_empty(),
        "a lower layer imports a higher one (move the shared item below both):\n{}",
        broken.join("\n")
    );
}

/// The checker must see the crates' modules at all: an empty graph would
/// pass the tests above without checking anything.
#[test]
fn the_checker_sees_known_references() {
    let references = layering::references_dir(&src("mesh-control"))
        .unwrap_or_else(|e| panic!("reading mesh-control/src: {e}"));
    assert!(
        references
            .iter()
            .any(|r| r.from == "ads" && r.to == "state"),
        "ads -> state not found among {} references",
        references.len()
    );
}
