//! Writes the seed corpora of the fuzz targets (fuzz/seeds/<target>/) from
//! real encodings: the demo's config (examples/mesh), the security example
//! and the two configs in fuzz/seeds-src, translated by mesh-control and
//! encoded as its ADS server serves them; bootstraps as the project writes
//! them; registration bodies as the README sends them; CSRs from rcgen.
//!
//! Not a fuzz target: built with them by `cargo fuzz build` (so it reuses
//! their build) and run by hand when the encodings change:
//!
//!   RUSTC_BOOTSTRAP=1 cargo fuzz build -s none && fuzz/target/x86_64-unknown-linux-gnu/release/seeds
//!
//! Seeds are named by content, so writing them twice changes nothing.

use std::path::{Path, PathBuf};

use mesh_core::xds::ResourceType;
use prost::Message;

fn write(dir: &Path, target: &str, bytes: &[u8]) {
    let dir = dir.join(target);
    std::fs::create_dir_all(&dir).expect("create the seed directory");
    // FNV-1a: stable names without a hashing dependency.
    let hash = bytes.iter().fold(0xcbf2_9ce4_8422_2325_u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3)
    });
    std::fs::write(dir.join(format!("{hash:016x}")), bytes).expect("write a seed");
}

fn main() {
    // The instrumented code calls into libFuzzer's runtime; a reference to
    // it links it into this binary, which has a main of its own.
    std::hint::black_box(libfuzzer_sys::fuzzer_mutate as fn(&mut [u8], usize, usize) -> usize);
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let out = root.join("seeds");
    let read = |p: &str| std::fs::read_to_string(root.join(p)).expect("read a seed source");
    let configs = [
        vec![("shop.yaml".to_string(), read("../examples/mesh/shop.yaml"))],
        vec![
            ("shop.yaml".to_string(), read("../examples/mesh/shop.yaml")),
            (
                "security.yaml".to_string(),
                read("../examples/mesh-security/security.yaml"),
            ),
        ],
        vec![(
            "resilience.yaml".to_string(),
            read("seeds-src/resilience.yaml"),
        )],
        vec![
            (
                "resilience.yaml".to_string(),
                read("seeds-src/resilience.yaml"),
            ),
            ("authz.yaml".to_string(), read("seeds-src/authz.yaml")),
        ],
    ];
    let registrations = proxyless_fuzz::registrations();
    assert_eq!(registrations.len(), 3, "the seed registrations validate");
    for files in &configs {
        // istio_yaml: the files joined as the target splits them.
        let joined: Vec<&str> = files.iter().map(|(_, t)| t.as_str()).collect();
        write(&out, "istio_yaml", joined.join("#@file\n").as_bytes());
        for (_, text) in files {
            for doc in text.split("\n---\n") {
                write(&out, "istio_yaml", doc.as_bytes());
            }
        }
        let (store, problems) = mesh_control::fuzzing::load_config(files, &registrations);
        if problems > 0 {
            // Still a seed: the problem's path is worth fuzzing too.
            eprintln!(
                "{problems} problem(s) in the seed config {:?}",
                files.iter().map(|f| &f.0).collect::<Vec<_>>()
            );
        }
        let (snapshot, _) = store.snapshot(&registrations);
        let mut stream = vec![0b011_u8];
        for (kind, resources) in proxyless_fuzz::encode_snapshot(&snapshot) {
            let target = match kind {
                ResourceType::Listener => "xds_listener",
                ResourceType::RouteConfig => "xds_route_config",
                ResourceType::Cluster => "xds_cluster",
                ResourceType::Endpoints => "xds_endpoints",
            };
            for any in &resources {
                write(&out, target, &any.value);
            }
            proxyless_fuzz::response(kind, "1", resources)
                .encode_length_delimited(&mut stream)
                .expect("encode into a Vec");
        }
        write(&out, "ads_state", &stream);
        // The same cascade, then every type again empty (deletions).
        for kind in ResourceType::ALL {
            proxyless_fuzz::response(kind, "2", Vec::new())
                .encode_length_delimited(&mut stream)
                .expect("encode into a Vec");
        }
        stream[0] = 0b100;
        write(&out, "ads_state", &stream);
        for any in proxyless_fuzz::server_listeners(&store, &registrations) {
            write(&out, "xds_server_listener", &any.value);
            write(&out, "xds_listener", &any.value);
        }
    }

    for body in [
        r#"{"service":"catalog","namespace":"shop","address":"127.0.0.1","port":8081,"labels":{"version":"v1"},"ttl_seconds":30}"#,
        r#"{"service":"payment","namespace":"shop","address":"::1","port":50051,"service_port":50051,"protocol":"GRPC","labels":{"version":"v2","app":"payment"},"locality":"us-east/a/rack1","ttl_seconds":10,"node_id":"payment-1"}"#,
        r#"{"service":"payments.example.com","namespace":"evil","address":"127.0.0.9","port":80,"ttl_seconds":300}"#,
        r#"{"service":"catalog.shop.svc.cluster.local","address":"169.254.169.254","port":80,"ttl_seconds":30}"#,
    ] {
        write(&out, "admin_json", body.as_bytes());
    }

    for bootstrap in [
        mesh_control::bootstrap_json(
            "127.0.0.1:15010".parse().expect("an address"),
            "127.0.0.1:15011".parse().expect("an address"),
            "catalog-1",
            "shop",
        ),
        r#"{"xds_servers":[{"server_uri":"localhost:15010","channel_creds":[{"type":"tls","config":{"ca_certificate_file":"/etc/mesh/ca.pem","certificate_file":"/etc/mesh/cert.pem","private_key_file":"/etc/mesh/key.pem"}}],"server_features":["xds_v3","ignore_resource_deletion"]}],"node":{"id":"n1","cluster":"c","locality":{"region":"us-east","zone":"a","sub_zone":"r1"},"metadata":{"NAMESPACE":"shop","LABELS":{"app":"catalog","version":"v1"},"SERVICE_ACCOUNT":"catalog"}},"server_listener_resource_name_template":"grpc/server?xds.resource.listening_address=%s","certificate_providers":{"mesh":{"plugin_name":"file_watcher","config":{"certificate_file":"c.pem","private_key_file":"k.pem","ca_certificate_file":"ca.pem","refresh_interval":"600s"}}},"proxyless":{"cache_file":"/tmp/x.cache","admin_address":"127.0.0.1:15000"}}"#.to_string(),
    ] {
        write(&out, "bootstrap", bootstrap.as_bytes());
    }

    for san in [
        "spiffe://cluster.local/ns/shop/sa/catalog",
        "spiffe://cluster.local/ns/shop/sa/payment",
    ] {
        let key = rcgen::KeyPair::generate().expect("generate a key");
        let mut params = rcgen::CertificateParams::default();
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "workload");
        params.subject_alt_names = vec![rcgen::SanType::URI(san.try_into().expect("a URI"))];
        let csr = params.serialize_request(&key).expect("a CSR");
        let mut pem = vec![0u8];
        pem.extend_from_slice(csr.pem().expect("PEM").as_bytes());
        write(&out, "csr", &pem);
        let mut der = vec![1u8];
        der.extend_from_slice(csr.der());
        write(&out, "csr", &der);
    }
    println!("seeds written to {}", out.display());
}
