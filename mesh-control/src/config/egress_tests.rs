//! Tests of egress ServiceEntries (issue 16): `resolution: DNS`,
//! `DNS_ROUND_ROBIN` and `NONE`, `location: MESH_EXTERNAL`, `addresses`,
//! `targetPort` and HTTPS / TLS ports: what the clients' model says, and
//! where `check` points when a value is wrong.

use mesh_core::Snapshot;
use mesh_core::model::{Cluster, Discovery, DnsHost, TlsOrigination};

use super::tests::{assert_one, check, store};

/// A ServiceEntry for api.example.com whose spec continues with `rest`
/// (indented 2).
fn se(rest: &str) -> String {
    format!(
        "\
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: api, namespace: shop}}
spec:
  hosts: [api.example.com]
{rest}"
    )
}

fn snapshot(files: &[(&str, &str)]) -> Snapshot {
    let (s, _d) = store(files);
    let (snap, diags) = s.snapshot(&[]);
    assert!(diags.is_empty(), "{diags:#?}");
    snap
}

fn cluster(snap: &Snapshot, port: u16) -> &Cluster {
    &snap.clusters[&*format!("outbound|{port}||api.example.com")]
}

#[test]
fn dns_resolution_makes_a_dns_cluster_on_the_target_port() {
    let yaml = se(
        "  ports: [{number: 80, name: http, protocol: HTTP, targetPort: 8080}]
  resolution: DNS
  location: MESH_EXTERNAL
",
    );
    assert_eq!(check(&yaml), []);
    let snap = snapshot(&[("a.yaml", &yaml)]);
    let c = cluster(&snap, 80);
    let dns = c.discovery.dns().expect("a DNS cluster");
    assert!(!dns.logical);
    assert_eq!(
        &*dns.hosts,
        [DnsHost {
            name: "api.example.com".into(),
            port: 8080
        }]
    );
    // Resolved by each client: no assignment from the translation, and
    // no EDS subscription for it.
    assert!(!snap.endpoints.contains_key(&c.eds_service_name));
    assert!(snap.referenced_endpoints().is_empty());
    assert!(
        c.tls.is_none(),
        "MESH_EXTERNAL: plaintext unless a rule says TLS"
    );
}

#[test]
fn dns_round_robin_is_logical() {
    let yaml = se("  ports: [{number: 80, name: http}]
  resolution: DNS_ROUND_ROBIN
");
    let snap = snapshot(&[("a.yaml", &yaml)]);
    let dns = cluster(&snap, 80).discovery.dns().cloned().expect("DNS");
    assert!(dns.logical);
    assert_eq!(dns.hosts[0].port, 80);
}

#[test]
fn mesh_external_never_gets_auto_mtls() {
    // A STRICT mesh: auto mTLS applies to internal hosts, not external ones.
    let strict = "\
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: istio-system}
spec:
  mtls: {mode: STRICT}
";
    let external = se("  ports: [{number: 80, name: http}]
  resolution: DNS
  location: MESH_EXTERNAL
");
    let internal = external.replace("MESH_EXTERNAL", "MESH_INTERNAL");
    let snap = snapshot(&[("a.yaml", &external), ("b.yaml", strict)]);
    assert!(cluster(&snap, 80).tls.is_none());
    let snap = snapshot(&[("a.yaml", &internal), ("b.yaml", strict)]);
    assert!(
        cluster(&snap, 80).tls.is_some(),
        "MESH_INTERNAL in a STRICT mesh"
    );
}

#[test]
fn an_https_port_originates_tls_with_the_host_as_sni() {
    let yaml = se("  ports: [{number: 443, name: https, protocol: HTTPS}]
  resolution: DNS
  location: MESH_EXTERNAL
");
    let snap = snapshot(&[("a.yaml", &yaml)]);
    let tls = cluster(&snap, 443).tls.clone().expect("TLS");
    assert_eq!(&*tls.sni, "api.example.com");
    let TlsOrigination::Files(files) = tls.origination else {
        panic!("not SIMPLE: {tls:?}");
    };
    assert_eq!(files.ca_certificates, None, "system roots");
    assert!(files.client_certificate.is_none());
}

#[test]
fn none_with_addresses_calls_them() {
    let yaml = se("  ports: [{number: 80, name: http, targetPort: 9000}]
  resolution: NONE
  addresses: [10.1.2.3, 10.1.2.4]
");
    assert_eq!(check(&yaml), []);
    let snap = snapshot(&[("a.yaml", &yaml)]);
    let c = cluster(&snap, 80);
    assert_eq!(c.discovery, Discovery::Eds);
    let cla = &snap.endpoints[&c.eds_service_name];
    let mut got: Vec<String> = cla
        .localities
        .iter()
        .flat_map(|l| l.endpoints.iter().map(|e| e.address.to_string()))
        .collect();
    got.sort();
    assert_eq!(got, ["10.1.2.3:9000", "10.1.2.4:9000"]);
}

#[test]
fn static_accepts_addresses_as_virtual_ips() {
    let yaml = se("  ports: [{number: 80, name: http}]
  addresses: [240.240.0.1, 10.0.0.0/16]
  resolution: STATIC
  endpoints: [{address: 10.0.0.7}]
");
    assert_eq!(check(&yaml), []);
}

#[test]
fn none_without_addresses_is_refused_at_its_line() {
    let yaml = se("  ports: [{number: 80, name: http}]
  resolution: NONE
");
    assert_one(&check(&yaml), 7, "dialed by name");
}

#[test]
fn none_with_a_cidr_is_refused_at_the_address() {
    let yaml = se("  ports: [{number: 80, name: http}]
  resolution: NONE
  addresses:
  - 10.0.0.0/8
");
    assert_one(&check(&yaml), 9, "'10.0.0.0/8' is a CIDR block");
}

#[test]
fn bad_values_are_reported_at_their_line() {
    let yaml = se("  ports: [{number: 80, name: http}]
  addresses: [not-an-ip]
");
    assert_one(
        &check(&yaml),
        7,
        "'not-an-ip' is not an IP address or CIDR block",
    );

    let yaml = se("  ports: [{number: 80, name: http}]
  resolution: DNS_SOMETIMES
");
    assert_one(&check(&yaml), 7, "unknown resolution 'DNS_SOMETIMES'");

    let yaml = se("  ports: [{number: 80, name: http}]
  location: MESH_ELSEWHERE
");
    assert_one(&check(&yaml), 7, "unknown location 'MESH_ELSEWHERE'");

    let yaml = se("  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints:
  - {address: us_foo.bar.com}
");
    assert_one(
        &check(&yaml),
        9,
        "'us_foo.bar.com' is not a DNS name or an IP address",
    );

    let yaml = se("  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints:
  - address: us.foo.bar.com
    locality: us-east
");
    assert_one(&check(&yaml), 10, "locality");

    let yaml = se("  ports: [{number: 80, name: http}]
  resolution: DNS
  endpoints:
  - address: us.foo.bar.com
    ports: {https: 8443}
");
    assert_one(&check(&yaml), 10, "no port named 'https'");

    let yaml = se("  ports:
  - {number: 80, name: tcp, protocol: TCP}
  resolution: DNS
");
    assert_one(
        &check(&yaml),
        7,
        "'ports[0].protocol: TCP' is not supported yet",
    );
}

#[test]
fn dns_endpoints_are_resolved_instead_of_the_host_on_their_ports() {
    // Istio's ServiceEntry reference ("external-svc-dns").
    let yaml = se("  location: MESH_EXTERNAL
  ports:
  - number: 443
    name: https
    protocol: HTTPS
  resolution: DNS
  endpoints:
  - address: us.foo.bar.com
    ports:
      https: 8080
  - address: uk.foo.bar.com
    ports:
      https: 9080
  - address: 10.0.0.9
");
    assert_eq!(check(&yaml), []);
    let snap = snapshot(&[("a.yaml", &yaml)]);
    let dns = cluster(&snap, 443).discovery.dns().cloned().expect("DNS");
    let hosts: Vec<(String, u16)> = dns
        .hosts
        .iter()
        .map(|h| (h.name.to_string(), h.port))
        .collect();
    assert_eq!(
        hosts,
        [
            ("us.foo.bar.com".to_string(), 8080),
            ("uk.foo.bar.com".to_string(), 9080),
            ("10.0.0.9".to_string(), 443),
        ]
    );
    // DNS_ROUND_ROBIN: one endpoint (LOGICAL_DNS), the first.
    let snap = snapshot(&[(
        "a.yaml",
        &yaml.replace("resolution: DNS", "resolution: DNS_ROUND_ROBIN"),
    )]);
    let dns = cluster(&snap, 443).discovery.dns().cloned().expect("DNS");
    assert!(dns.logical);
    assert_eq!(dns.hosts.len(), 1);
    assert_eq!(&*dns.hosts[0].name, "us.foo.bar.com");
}
