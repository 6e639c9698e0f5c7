//! `mesh-control`: serve Istio YAML as xDS, check it offline, show client status;
//! with the feature `etcd`, run as one of several replicas sharing an etcd
//! (`serve --etcd`) and apply config to it (`apply`).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::process::ExitCode;
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use mesh_control::ca::CertificateAuthority;
use mesh_control::config::{MeshOptions, check_dirs, check_notes};
use serde_json::Value;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The control server of the proxyless in-process service mesh.
#[derive(Parser)]
#[command(name = "mesh-control", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// `mesh-control serve`.
#[derive(clap::Args)]
struct ServeArgs {
    /// Directories of Istio YAML, read as one config and watched for
    /// changes: `--config A B` or `--config A --config B`. Only the *.yaml /
    /// *.yml files directly in each directory are read, not subdirectories.
    /// VirtualServices apply in directory order (as given), then file name;
    /// a resource defined in two directories is an error at its second
    /// definition. Not with --etcd: replicas read the config from etcd.
    #[arg(
        long,
        value_name = "DIR",
        required_unless_present = "etcd",
        conflicts_with = "etcd",
        num_args = 1..
    )]
    config: Vec<PathBuf>,
    /// ADS (gRPC) listen address.
    #[arg(long, default_value = "127.0.0.1:15010")]
    xds: SocketAddr,
    /// Admin HTTP API listen address (/status, /v1/endpoints, /v1/services).
    #[arg(long, default_value = "127.0.0.1:15000")]
    admin: SocketAddr,
    /// Serve the admin API on an address beyond loopback without a CA:
    /// anyone who can reach it may then register endpoints and read the
    /// mesh. Without it, such an --admin address is refused unless a CA is
    /// configured.
    #[arg(long)]
    insecure_admin: bool,
    /// The config watcher's debounce window in milliseconds: a finished save
    /// is read at once; what changes after it is read once more when the
    /// directory has been quiet this long.
    #[arg(long, default_value_t = 10)]
    debounce_ms: u64,
    /// Least milliseconds between two full translations asked for by
    /// registrations: a storm of registrations shares translations.
    #[arg(long, default_value_t = 20)]
    registration_debounce_ms: u64,
    /// The DNS server (ip:port) through which the hosts of DNS
    /// ServiceEntries (`resolution: DNS`) are resolved for gRPC clients,
    /// which are served them as EDS. Default: the system's resolv.conf.
    #[arg(long, value_name = "IP:PORT")]
    dns_server: Option<std::net::SocketAddr>,
    /// Domain suffix of short service names.
    #[arg(long, default_value = "svc.cluster.local")]
    domain_suffix: String,
    /// Namespace whose policies apply mesh-wide.
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// Run the mesh CA with its root persisted in this directory
    /// (generated on first start; or put root-cert.pem and
    /// root-key.pem there). Turns on TLS for ADS and the admin API and
    /// authenticated registration.
    #[arg(
        long,
        requires = "join_tokens",
        conflicts_with_all = ["ca_cert_chain", "etcd"]
    )]
    ca_dir: Option<PathBuf>,
    /// Run the mesh CA with an operator-supplied signing certificate (a root,
    /// or an intermediate followed by its chain up to the root; PEM), as
    /// Istio's plugged-in CA certificates. Needs --ca-key.
    #[arg(long, requires_all = ["join_tokens", "ca_key"])]
    ca_cert_chain: Option<PathBuf>,
    /// The PKCS#8 private key (PEM) of --ca-cert-chain's first certificate.
    #[arg(long, requires = "ca_cert_chain")]
    ca_key: Option<PathBuf>,
    /// JSON file of join tokens: {"tokens": [{"token", "namespace", "service_account"}]}.
    /// Read again whenever it changes (its modification time, size or
    /// inode), so a token is revoked by removing it from the file, without
    /// a restart; write the file atomically (a copy renamed over it). A
    /// file that does not parse keeps the tokens in force, with a warning.
    #[arg(long)]
    join_tokens: Option<PathBuf>,
    /// With a CA: a file of read-only operator tokens, one per line (`#`
    /// comments; at least 16 bytes each). `/status`, `/v1/services` and
    /// `/metrics` need credentials when the CA is on (a client certificate
    /// from the mesh CA, a join token, or one of these as `Authorization:
    /// Bearer`); an operator token can read them and do nothing else.
    /// `mesh-control status --token-file FILE` sends one. Reloaded like
    /// --join-tokens.
    #[arg(long, value_name = "FILE", requires = "join_tokens")]
    operator_token_file: Option<PathBuf>,
    /// Accept registrations of link-local addresses (169.254.0.0/16,
    /// fe80::/10). Off by default: link-local is where cloud metadata
    /// services answer (169.254.169.254), and such an endpoint would send
    /// mesh traffic to whatever answers on each client's own host.
    #[arg(long)]
    allow_link_local_endpoints: bool,
    /// How many leases one identity may hold at once (with a CA, where
    /// registrations are authenticated); beyond it a registration gets 429.
    #[arg(long, value_name = "N", default_value_t = mesh_control::config::DEFAULT_MAX_LEASES_PER_IDENTITY)]
    max_leases_per_identity: usize,
    /// SPIFFE trust domain of workload identities.
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
    /// Default lifetime of workload certificates (`24h`, `30m`, `90s`).
    #[arg(long, default_value = "24h", value_parser = parse_duration)]
    cert_lifetime: Duration,
    /// Where to write the trust bundle for bootstraps' ca_certificate_file
    /// (default: trust-bundle.pem in --ca-dir, or next to --ca-cert-chain).
    #[arg(long)]
    trust_bundle_file: Option<PathBuf>,
    /// Another DNS name for mesh-control's serving certificate (repeatable);
    /// `localhost` and the listen IPs are always in it.
    #[arg(long = "tls-dns-name")]
    tls_dns_names: Vec<String>,
    /// Keep what must survive a restart here (created, mode 0700): the last
    /// good version of every resource, the registrations with their leases,
    /// and the xDS version counter. A restarted mesh-control then serves
    /// the config that was in force (not an edit still on disk that was
    /// rejected) and every registered endpoint at once, and never reuses a
    /// version. Without it all of that lives in memory only: after a
    /// restart the YAML on disk is served as it is and every server
    /// registers again on its next heartbeat. Put it on persistent storage,
    /// e.g. /var/lib/mesh-control/data. Not with --etcd: etcd keeps all of it.
    #[arg(long, value_name = "DIR", conflicts_with = "etcd")]
    data_dir: Option<PathBuf>,
    /// Read the service graph (`GET /v1/graph`, the `/ui` page) from this
    /// Prometheus (`http://host:9090`), as Kiali does: Istio's metrics,
    /// `reporter="source"`, scraped from the workloads. Without it the
    /// graph is the window of the summaries workloads push (still answered
    /// by `GET /v1/graph?source=window`). Checked at start: http:// only.
    #[arg(long, value_name = "URL", value_parser = parse_prometheus_url)]
    prometheus: Option<String>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// With --etcd and --join-tokens: the replicas share one CA root, kept
    /// in etcd with its private key sealed (AES-256-GCM) under the key in
    /// this file: 32 bytes, raw or as 64 hex digits (make one with `openssl
    /// rand -hex 32`). The first replica generates the root; the others
    /// read it. Give every replica the same file, and keep it out of etcd.
    #[cfg(feature = "etcd")]
    #[arg(
        long,
        value_name = "FILE",
        requires_all = ["etcd", "join_tokens"],
        conflicts_with_all = ["ca_dir", "ca_cert_chain"]
    )]
    ca_key_encryption_key: Option<PathBuf>,
}

/// etcd, for replicas sharing their state (`serve --etcd`, `apply`).
#[cfg(feature = "etcd")]
#[derive(clap::Args)]
struct EtcdArgs {
    /// etcd's client URLs (`http://10.0.0.1:2379,http://10.0.0.2:2379`, or
    /// the flag repeated): this replica shares the config, the
    /// registrations and the CA root with every other one started with the
    /// same etcd and prefix, and serves the config applied there with
    /// `mesh-control apply` (not config directories).
    #[arg(long = "etcd", value_name = "URL", value_delimiter = ',', num_args = 1..)]
    etcd: Vec<String>,
    /// The CA certificate (PEM) that verifies etcd's, for `https://` URLs.
    #[arg(long, value_name = "FILE", requires = "etcd")]
    etcd_ca: Option<PathBuf>,
    /// A client certificate (PEM) for an etcd run with --client-cert-auth.
    #[arg(long, value_name = "FILE", requires_all = ["etcd_ca", "etcd_key"])]
    etcd_cert: Option<PathBuf>,
    /// The private key (PEM) of --etcd-cert.
    #[arg(long, value_name = "FILE", requires = "etcd_cert")]
    etcd_key: Option<PathBuf>,
    /// The prefix of the mesh's keys in etcd (meshes sharing an etcd use
    /// different ones).
    #[arg(long, value_name = "PREFIX", default_value = mesh_control::replica::DEFAULT_PREFIX)]
    etcd_prefix: String,
}

/// Without the feature `etcd`, `--etcd` is only recognized to say how to
/// get a build with it.
#[cfg(not(feature = "etcd"))]
#[derive(clap::Args)]
struct EtcdArgs {
    #[arg(long = "etcd", hide = true, value_name = "URL")]
    etcd: Vec<String>,
}

/// What a build without etcd says to `--etcd` and `apply`.
#[cfg(not(feature = "etcd"))]
const NO_ETCD: &str = "this mesh-control was built without the `etcd` feature: install it with \
                       `cargo install --path mesh-control --features etcd` (or run it with \
                       `cargo run -p mesh-control --features etcd -- ...`)";

#[cfg(feature = "etcd")]
impl EtcdArgs {
    /// A client of the etcd named, checked to answer; `None` without --etcd.
    async fn client(&self) -> Result<Option<mesh_control::etcd::Etcd>, String> {
        if self.etcd.is_empty() {
            return Ok(None);
        }
        let tls = self.etcd_ca.as_ref().map(|ca| mesh_control::etcd::EtcdTls {
            ca: ca.clone(),
            cert: self.etcd_cert.clone(),
            key: self.etcd_key.clone(),
        });
        mesh_control::etcd::Etcd::connect(&self.etcd, tls)
            .await
            .map(Some)
            .map_err(|e| format!("etcd: {e}"))
    }
}

/// `mesh-control apply`.
#[cfg(feature = "etcd")]
#[derive(clap::Args)]
struct ApplyArgs {
    /// Directories of *.yaml / *.yml files, read as one config as `serve
    /// --config` reads them.
    #[arg(value_name = "DIR", required = true)]
    dirs: Vec<PathBuf>,
    #[command(flatten)]
    etcd: EtcdArgs,
    /// Domain suffix of short service names (as the replicas are run with).
    #[arg(long, default_value = "svc.cluster.local")]
    domain_suffix: String,
    /// Namespace whose policies apply mesh-wide (as the replicas are run with).
    #[arg(long, default_value = "istio-system")]
    root_namespace: String,
    /// SPIFFE trust domain (as the replicas are run with).
    #[arg(long, default_value = "cluster.local")]
    trust_domain: String,
}

#[derive(Subcommand)]
enum Command {
    /// Serve directories of Istio YAML over xDS (ADS) and run the admin API.
    /// SIGTERM or SIGINT stops it gracefully: no new connections, every ADS
    /// stream ends with UNAVAILABLE after a GOAWAY, admin requests in
    /// flight finish, the state is written to --data-dir, exit status 0.
    Serve(Box<ServeArgs>),
    /// Validate directories of Istio YAML and make them the config of the
    /// replicas sharing an etcd, in one transaction: every problem is
    /// printed as `file:line: message` and nothing is written; otherwise the
    /// changed resources are written and the ones gone deleted, at once.
    /// Fails without writing when another apply wrote meanwhile, or etcd
    /// cannot be reached.
    #[cfg(feature = "etcd")]
    Apply(Box<ApplyArgs>),
    /// (Needs a build with the `etcd` feature.)
    #[cfg(not(feature = "etcd"))]
    #[command(hide = true)]
    Apply {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// Validate directories of Istio YAML; prints `file:line: message` per problem.
    Check {
        /// Directories of *.yaml / *.yml files, read as one config as `serve
        /// --config` reads them (not their subdirectories).
        #[arg(value_name = "DIR", required = true)]
        dirs: Vec<PathBuf>,
        /// Also report what a kind of client ignores (`grpc`): of what the
        /// YAML says, at `file:line`; then, separately, the mesh's defaults
        /// that such clients handle differently. `envoy`: what an Envoy
        /// sidecar (envoy-bootstrap) would not honor, one line each.
        #[arg(long = "for", value_name = "CLIENT")]
        for_client: Option<String>,
        /// Domain suffix of short service names.
        #[arg(long, default_value = "svc.cluster.local")]
        domain_suffix: String,
    },
    /// Show every connected client's node id and per-type ACK/NACK state.
    Status {
        /// Admin address of the control server.
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Print the raw JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Connect over https, trusting the roots in this PEM file (the
        /// control server's trust bundle).
        #[arg(long)]
        ca_file: Option<PathBuf>,
        /// Send the token in this file as `Authorization: Bearer`: a
        /// read-only operator token (serve's --operator-token-file; the
        /// first token in the file) or a join token. Needed when
        /// mesh-control runs a CA (so it needs --ca-file: the token never
        /// travels in plaintext).
        #[arg(long, value_name = "FILE", requires = "ca_file")]
        token_file: Option<PathBuf>,
    },
    /// Print a stock Envoy's bootstrap (JSON; run `envoy -c FILE.json`)
    /// that makes it a sidecar of this mesh: its node (id, namespace,
    /// labels, outbound port) and an ADS stream to mesh-control. The app
    /// then sends plain HTTP to 127.0.0.1:<outbound-port>; the Host header
    /// picks the service.
    EnvoyBootstrap {
        /// `node.id`: the name of this Envoy (unique per instance).
        node_id: String,
        /// The workload's namespace (`node.metadata.NAMESPACE`).
        #[arg(long, default_value = "default")]
        namespace: String,
        /// A workload label, `key=value` (repeatable; `node.metadata.LABELS`).
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// `node.cluster` (default: the `app` label, else the node id).
        #[arg(long)]
        cluster: Option<String>,
        /// The port of the outbound listener on 127.0.0.1.
        #[arg(long, default_value_t = 15001)]
        outbound_port: u16,
        /// mesh-control's ADS address (host:port).
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds: String,
        /// A token sent as `authorization: Bearer` on the ADS stream (the
        /// first token in the file; the bootstrap then holds it).
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Verify mesh-control's certificate against these PEM roots (TLS);
        /// without it, plaintext.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Envoy's admin port on 127.0.0.1 (0: any).
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
        /// `node.locality`: `region/zone/sub_zone` (for locality-aware
        /// balancing and failover).
        #[arg(long)]
        locality: Option<String>,
    },
    /// Print a stock Envoy's bootstrap (JSON; run `envoy -c FILE.json`)
    /// that makes it an ingress gateway: the Istio `Gateway`s whose
    /// selector matches its labels (`istio=ingressgateway` by default) give
    /// it listeners, and the VirtualServices bound to them its routes. With
    /// a CA, pass the gateway's join token: it gets its mesh certificate
    /// over SDS and speaks mTLS to the services.
    GatewayBootstrap {
        /// `node.id`: the name of this gateway instance.
        name: String,
        /// The gateway's namespace (`node.metadata.NAMESPACE`).
        #[arg(long, default_value = "istio-system")]
        namespace: String,
        /// A label, `key=value` (repeatable); default `istio=ingressgateway`.
        #[arg(long = "label", value_name = "KEY=VALUE")]
        labels: Vec<String>,
        /// mesh-control's ADS address (host:port).
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds: String,
        /// The gateway's join token (the first token in the file), sent as
        /// `authorization: Bearer` on the ADS stream: the bootstrap then
        /// holds it.
        #[arg(long, value_name = "FILE")]
        token_file: Option<PathBuf>,
        /// Verify mesh-control's certificate against these PEM roots (TLS);
        /// without it, plaintext.
        #[arg(long, value_name = "FILE")]
        ca_file: Option<PathBuf>,
        /// Envoy's admin port on 127.0.0.1 (0: any).
        #[arg(long, default_value_t = 15000)]
        admin_port: u16,
    },
}

/// `mesh-control gateway-bootstrap`: ENVOY's bootstrap with a gateway's
/// node (no outbound listener port; `istio=ingressgateway` unless told).
fn gateway_bootstrap(
    name: String,
    namespace: String,
    labels: Vec<String>,
    xds: String,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    admin_port: u16,
) -> ExitCode {
    use mesh_control::envoy_bootstrap::{EnvoyBootstrapOptions, envoy_bootstrap};
    let mut options = EnvoyBootstrapOptions::new(name.clone(), namespace);
    for label in &labels {
        let Some((key, value)) = label.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            eprintln!("mesh-control: --label {label:?}: expected key=value");
            return ExitCode::FAILURE;
        };
        options.labels.insert(key.to_string(), value.to_string());
    }
    if options.labels.is_empty() {
        options
            .labels
            .insert("istio".to_string(), "ingressgateway".to_string());
    }
    options.cluster = Some(name);
    options.xds = xds;
    options.ca_file = ca_file;
    options.admin_port = admin_port;
    if let Some(file) = &token_file {
        match read_token_file(file) {
            Ok(token) => options.token = Some(token),
            Err(e) => {
                eprintln!("mesh-control: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match envoy_bootstrap(&options) {
        Ok(json) => {
            use std::io::Write as _;
            let text = serde_json::to_string_pretty(&json).unwrap_or_else(|_| json.to_string());
            // A closed stdout (`| head`) is no error of the bootstrap's.
            let _ = writeln!(std::io::stdout(), "{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-control: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `mesh-control envoy-bootstrap`: the bootstrap on stdout, or why not.
#[allow(clippy::too_many_arguments)] // the subcommand's flags, one by one
fn envoy_bootstrap(
    node_id: String,
    namespace: String,
    labels: Vec<String>,
    cluster: Option<String>,
    outbound_port: u16,
    xds: String,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
    admin_port: u16,
    locality: Option<String>,
) -> ExitCode {
    use mesh_control::envoy_bootstrap::{EnvoyBootstrapOptions, envoy_bootstrap};
    let mut options = EnvoyBootstrapOptions::new(node_id, namespace);
    for label in &labels {
        let Some((key, value)) = label.split_once('=').filter(|(k, _)| !k.is_empty()) else {
            eprintln!("mesh-control: --label {label:?}: expected key=value");
            return ExitCode::FAILURE;
        };
        options.labels.insert(key.to_string(), value.to_string());
    }
    options.cluster = cluster;
    options.outbound_port = Some(outbound_port);
    options.xds = xds;
    options.ca_file = ca_file;
    options.admin_port = admin_port;
    options.locality = locality;
    if let Some(file) = &token_file {
        match read_token_file(file) {
            Ok(token) => options.token = Some(token),
            Err(e) => {
                eprintln!("mesh-control: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    match envoy_bootstrap(&options) {
        Ok(json) => {
            use std::io::Write as _;
            let text = serde_json::to_string_pretty(&json).unwrap_or_else(|_| json.to_string());
            // A closed stdout (`| head`) is no error of the bootstrap's.
            let _ = writeln!(std::io::stdout(), "{text}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("mesh-control: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `24h`, `30m`, `90s`, `2d` or plain seconds.
/// `--prometheus`: an http:// URL (the server checks it again at start).
fn parse_prometheus_url(s: &str) -> Result<String, String> {
    let uri: http::Uri = s
        .parse()
        .map_err(|e| format!("not a URL ({e}); expected http://host:port"))?;
    match uri.scheme_str() {
        Some("http") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(s.to_owned()),
        Some("http") => Err("no host; expected http://host:port".to_owned()),
        Some("https") => Err(
            "https is not supported (no trust store to verify Prometheus' certificate); \
             give its plain http:// address"
                .to_owned(),
        ),
        _ => Err("expected an http:// URL, e.g. http://127.0.0.1:9090".to_owned()),
    }
}

fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (number, unit) = match s.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => s.split_at(i),
        None => (s, "s"),
    };
    let n: u64 = number
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 24h, 30m or 90s"))?;
    let scale = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => return Err(format!("{s:?}: the unit must be s, m, h or d")),
    };
    n.checked_mul(scale)
        .map(Duration::from_secs)
        .ok_or_else(|| format!("{s:?} is too long"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            dirs,
            for_client,
            domain_suffix,
        } => check(&dirs, for_client.as_deref(), domain_suffix),
        Command::Serve(args) => {
            let ServeArgs {
                config,
                xds,
                admin,
                insecure_admin,
                debounce_ms,
                registration_debounce_ms,
                dns_server,
                domain_suffix,
                root_namespace,
                ca_dir,
                ca_cert_chain,
                ca_key,
                join_tokens,
                operator_token_file,
                allow_link_local_endpoints,
                max_leases_per_identity,
                trust_domain,
                cert_lifetime,
                trust_bundle_file,
                tls_dns_names,
                data_dir,
                prometheus,
                etcd,
                #[cfg(feature = "etcd")]
                ca_key_encryption_key,
            } = *args;
            #[cfg(not(feature = "etcd"))]
            if !etcd.etcd.is_empty() {
                eprintln!("mesh-control: --etcd: {NO_ETCD}");
                return ExitCode::FAILURE;
            }
            init_logging();
            let options = MeshOptions {
                domain_suffix,
                root_namespace,
                trust_domain: trust_domain.clone(),
                allow_link_local_endpoints,
                max_leases_per_identity,
            };
            run(async move {
                // Listening before anything else: a SIGTERM during the start
                // is a graceful stop too, not the default (an abrupt exit).
                let mut stop = StopSignals::new()?;
                let mut builder = mesh_control::Server::builder()
                    .config_dirs(config)
                    .xds_addr(xds)
                    .admin_addr(admin)
                    .insecure_admin(insecure_admin)
                    .debounce(Duration::from_millis(debounce_ms))
                    .registration_debounce(Duration::from_millis(registration_debounce_ms))
                    .options(options);
                if let Some(server) = dns_server {
                    builder = builder.dns_server(server);
                }
                if let Some(url) = prometheus {
                    builder = builder.prometheus(url);
                }
                #[cfg(feature = "etcd")]
                let replica = etcd.client().await?;
                #[cfg(feature = "etcd")]
                if let Some(client) = &replica {
                    builder = builder.etcd(client.clone()).etcd_prefix(&etcd.etcd_prefix);
                }
                #[cfg(not(feature = "etcd"))]
                let replica: Option<()> = {
                    let _ = etcd;
                    None
                };
                match data_dir {
                    Some(dir) => builder = builder.data_dir(dir),
                    None if replica.is_some() => {}
                    None => tracing::warn!(
                        "serving without --data-dir: the last good config and the \
                         registrations live in memory only; after a restart the YAML on \
                         disk is served as it is (a rejected edit included) and every server \
                         registers again on its next heartbeat"
                    ),
                }
                if let Some(tokens) = join_tokens {
                    let ca = CertificateAuthority::builder(&trust_domain);
                    #[cfg(feature = "etcd")]
                    let shared_root = match (&replica, ca_key_encryption_key) {
                        (Some(client), Some(file)) => {
                            let key = mesh_control::ca::CaKeyEncryptionKey::from_file(&file)
                                .map_err(|e| format!("CA: {e}"))?;
                            let (cert, key) = mesh_control::replica::shared_ca_root(
                                client,
                                &etcd.etcd_prefix,
                                &trust_domain,
                                &key,
                            )
                            .await
                            .map_err(|e| format!("CA: {e}"))?;
                            Some((cert, key))
                        }
                        _ => None,
                    };
                    #[cfg(not(feature = "etcd"))]
                    let shared_root: Option<(String, String)> = None;
                    let (ca, bundle_dir) = match (ca_dir, ca_cert_chain, ca_key, shared_root) {
                        (Some(dir), _, _, _) => (ca.directory(&dir), Some(dir)),
                        (None, Some(chain), Some(key), _) => {
                            let read = |path: &PathBuf| {
                                std::fs::read_to_string(path)
                                    .map_err(|e| format!("CA: cannot read {}: {e}", path.display()))
                            };
                            let bundle_dir = chain
                                .parent()
                                .map(PathBuf::from)
                                .unwrap_or_else(|| PathBuf::from("."));
                            (ca.signing_pem(read(&chain)?, read(&key)?), Some(bundle_dir))
                        }
                        (None, None, None, Some((cert, key))) => (ca.signing_pem(cert, key), None),
                        _ if replica.is_some() => {
                            return Err(
                                "--join-tokens with --etcd needs the CA root every replica \
                                 shares: --ca-key-encryption-key FILE (a root the first replica \
                                 generates, kept in etcd with its key sealed), or --ca-cert-chain \
                                 FILE with --ca-key FILE (the same files on every replica)"
                                    .to_string(),
                            );
                        }
                        _ => {
                            return Err(
                                "--join-tokens needs the CA: --ca-dir DIR, or --ca-cert-chain \
                                 FILE with --ca-key FILE"
                                    .to_string(),
                            );
                        }
                    };
                    let ca = ca
                        .join_tokens_file(&tokens)
                        .and_then(|b| match &operator_token_file {
                            Some(file) => b.operator_tokens_file(file),
                            None => Ok(b),
                        })
                        .and_then(|b| {
                            b.default_lifetime(cert_lifetime)
                                .max_lifetime(
                                    cert_lifetime.max(mesh_control::ca::DEFAULT_MAX_LIFETIME),
                                )
                                .build()
                        })
                        .map_err(|e| format!("CA: {e}"))?;
                    builder = builder.ca(ca).tls_dns_names(tls_dns_names);
                    // Without a CA directory (a root shared through etcd), the
                    // bundle goes to a temporary file unless one is named.
                    let bundle = trust_bundle_file
                        .or_else(|| bundle_dir.map(|dir| dir.join("trust-bundle.pem")));
                    if let Some(bundle) = bundle {
                        builder = builder.trust_bundle_file(bundle);
                    }
                }
                let handle = builder.start().await.map_err(|e| e.to_string())?;
                tracing::info!(
                    xds = %handle.xds_addr(),
                    admin = %handle.admin_addr(),
                    tls = handle.ca().is_some(),
                    trust_bundle = ?handle.trust_bundle_file(),
                    "mesh-control serving"
                );
                let signal = stop.recv().await;
                tracing::info!(
                    "{signal}: stopping (no new connections, ADS streams told to go, admin \
                     requests in flight finished, state written)"
                );
                let started = std::time::Instant::now();
                handle.shutdown().await;
                tracing::info!(took = ?started.elapsed(), "mesh-control stopped");
                Ok(())
            })
        }
        #[cfg(feature = "etcd")]
        Command::Apply(args) => apply(*args),
        #[cfg(not(feature = "etcd"))]
        Command::Apply { .. } => {
            eprintln!("mesh-control: apply: {NO_ETCD}");
            ExitCode::FAILURE
        }
        Command::EnvoyBootstrap {
            node_id,
            namespace,
            labels,
            cluster,
            outbound_port,
            xds,
            token_file,
            ca_file,
            admin_port,
            locality,
        } => envoy_bootstrap(
            node_id,
            namespace,
            labels,
            cluster,
            outbound_port,
            xds,
            token_file,
            ca_file,
            admin_port,
            locality,
        ),
        Command::GatewayBootstrap {
            name,
            namespace,
            labels,
            xds,
            token_file,
            ca_file,
            admin_port,
        } => gateway_bootstrap(
            name, namespace, labels, xds, token_file, ca_file, admin_port,
        ),
        Command::Status {
            admin,
            json,
            ca_file,
            token_file,
        } => run(async move {
            let token = match &token_file {
                Some(file) => Some(read_token_file(file)?),
                None => None,
            };
            let status = fetch_status(admin, ca_file.as_deref(), token.as_deref()).await?;
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&status).unwrap_or_default()
                );
            } else {
                print!("{}", status_table(&status));
            }
            Ok(())
        }),
    }
}

/// SIGTERM (what service managers and Kubernetes send) and SIGINT
/// (Ctrl-C): either stops `serve` gracefully.
struct StopSignals {
    #[cfg(unix)]
    terminate: tokio::signal::unix::Signal,
    #[cfg(unix)]
    interrupt: tokio::signal::unix::Signal,
}

impl StopSignals {
    fn new() -> Result<StopSignals, String> {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            let listen = |kind: SignalKind, name: &str| {
                signal(kind).map_err(|e| format!("cannot listen for {name}: {e}"))
            };
            Ok(StopSignals {
                terminate: listen(SignalKind::terminate(), "SIGTERM")?,
                interrupt: listen(SignalKind::interrupt(), "SIGINT")?,
            })
        }
        #[cfg(not(unix))]
        Ok(StopSignals {})
    }

    /// The name of the first stop signal received.
    async fn recv(&mut self) -> &'static str {
        #[cfg(unix)]
        {
            tokio::select! {
                _ = self.terminate.recv() => "SIGTERM",
                _ = self.interrupt.recv() => "SIGINT",
            }
        }
        #[cfg(not(unix))]
        {
            let _ = tokio::signal::ctrl_c().await;
            "Ctrl-C"
        }
    }
}

fn init_logging() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt().with_env_filter(filter).init();
}

fn run(fut: impl Future<Output = Result<(), String>>) -> ExitCode {
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mesh-control: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(fut) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mesh-control: {e}");
            ExitCode::FAILURE
        }
    }
}

/// `mesh-control check [--for grpc] DIR...`: problems on stderr
/// (`file:line: message`), exit status 1 if any; with `--for grpc`, first on
/// stdout what gRPC would ignore of what the YAML says (`file:line: grpc:
/// ...`), then, under their own heading, the mesh's defaults that gRPC
/// clients handle differently.
fn check(dirs: &[PathBuf], for_client: Option<&str>, domain_suffix: String) -> ExitCode {
    if let Some(dir) = dirs.iter().find(|d| !d.is_dir()) {
        eprintln!("{}: not a directory", dir.display());
        return ExitCode::FAILURE;
    }
    let options = MeshOptions {
        domain_suffix,
        ..MeshOptions::default()
    };
    match for_client {
        None => {}
        Some("grpc") => {
            let report = mesh_control::grpc_report(dirs, &options);
            for finding in &report.written {
                println!(
                    "{}:{}: grpc: {}",
                    finding.file.display(),
                    finding.line,
                    finding.message
                );
            }
            if !report.defaults.is_empty() {
                println!(
                    "grpc defaults (what the mesh applies where the YAML says nothing; not \
                     problems in it, but gRPC clients handle them differently):"
                );
                for default in &report.defaults {
                    println!("  {default}");
                }
            }
        }
        Some("envoy") => {
            for finding in mesh_control::envoy_report(dirs, &options) {
                println!("envoy: {finding}");
            }
        }
        Some(other) => {
            eprintln!("--for {other:?}: the client kinds with known gaps are `grpc` and `envoy`");
            return ExitCode::FAILURE;
        }
    }
    for note in check_notes(dirs) {
        println!(
            "{}:{}: note: {}",
            note.file.display(),
            note.line,
            note.message
        );
    }
    let diagnostics = check_dirs(dirs, &options);
    for d in &diagnostics {
        eprintln!("{d}");
    }
    let names: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    if diagnostics.is_empty() {
        println!("{}: ok", names.join(", "));
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s)", diagnostics.len());
        ExitCode::FAILURE
    }
}

/// `mesh-control apply DIR... --etcd URL...`: what was applied on stdout;
/// each problem of an invalid config on stderr (`file:line: message`),
/// exit status 1 when nothing was written.
#[cfg(feature = "etcd")]
fn apply(args: ApplyArgs) -> ExitCode {
    let ApplyArgs {
        dirs,
        etcd,
        domain_suffix,
        root_namespace,
        trust_domain,
    } = args;
    if etcd.etcd.is_empty() {
        eprintln!(
            "mesh-control: apply: --etcd URL is required: the etcd the replicas share \
             (`mesh-control serve --etcd URL`)"
        );
        return ExitCode::FAILURE;
    }
    let options = MeshOptions {
        domain_suffix,
        root_namespace,
        trust_domain,
        ..MeshOptions::default()
    };
    run(async move {
        let client = etcd
            .client()
            .await
            .map_err(|e| format!("apply: {e}; nothing was written"))?
            .ok_or("apply: --etcd URL is required")?;
        match mesh_control::replica::apply(&client, &etcd.etcd_prefix, &dirs, &options).await {
            Ok(applied) => {
                println!("{applied}");
                Ok(())
            }
            Err(e) if e.kind() == mesh_control::replica::ApplyErrorKind::Invalid => {
                for d in e.diagnostics() {
                    eprintln!("{d}");
                }
                Err(format!(
                    "apply: {} problem(s); nothing was written to etcd",
                    e.diagnostics().len()
                ))
            }
            Err(e) => Err(format!("apply: {e}")),
        }
    })
}

/// An HTTP/1.1 client on `io`, a connection to the admin API at `admin`
/// (plaintext or TLS), driven in the background.
async fn http1<IO>(
    io: IO,
    admin: SocketAddr,
) -> Result<hyper::client::conn::http1::SendRequest<Empty<Bytes>>, String>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(io))
        .await
        .map_err(|e| format!("admin API at {admin}: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

/// The first token of a token file: its first line that is neither blank
/// nor a `#` comment, trimmed.
fn read_token_file(file: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| format!("--token-file {}: {e}", file.display()))?;
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty() && !l.starts_with('#'))
        .map(str::to_string)
        .ok_or_else(|| format!("--token-file {}: no token in it", file.display()))
}

async fn fetch_status(
    admin: SocketAddr,
    ca_file: Option<&Path>,
    token: Option<&str>,
) -> Result<Value, String> {
    let stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| {
        format!("cannot reach the admin API at {admin}: {e} (is `mesh-control serve` running?)")
    })?;
    let (stream, first_byte) = Sniff::new(stream);
    let result = request_status(stream, admin, ca_file, token).await;
    result.map_err(|e| match (ca_file, first_byte.get().copied()) {
        // The server answered with a TLS record (an alert, or a handshake
        // message) to plaintext HTTP.
        (None, Some(TLS_ALERT | TLS_HANDSHAKE)) => format!(
            "the admin API at {admin} speaks TLS (mesh-control runs with a CA): pass --ca-file \
             with its trust bundle, e.g. `mesh-control status --admin {admin} --ca-file \
             DIR/trust-bundle.pem`, DIR being serve's --ca-dir or the directory of its \
             --ca-cert-chain (or pass the file given to serve's --trust-bundle-file)"
        ),
        // The server answered the TLS handshake with something else: plaintext.
        (Some(_), Some(byte))
            if !(TLS_CHANGE_CIPHER_SPEC..=TLS_APPLICATION_DATA).contains(&byte) =>
        {
            format!(
                "the admin API at {admin} does not speak TLS (mesh-control runs without a CA): \
                 drop --ca-file"
            )
        }
        _ => e,
    })
}

/// The first byte of the TLS record types: what a TLS server sends first
/// (a handshake record, or an alert when what it got was not TLS).
const TLS_CHANGE_CIPHER_SPEC: u8 = 0x14;
const TLS_ALERT: u8 = 0x15;
const TLS_HANDSHAKE: u8 = 0x16;
const TLS_APPLICATION_DATA: u8 = 0x17;

async fn request_status(
    stream: Sniff<tokio::net::TcpStream>,
    admin: SocketAddr,
    ca_file: Option<&Path>,
    token: Option<&str>,
) -> Result<Value, String> {
    let mut sender = match ca_file {
        None => http1(stream, admin).await?,
        Some(ca_file) => http1(tls_connect(stream, admin, ca_file).await?, admin).await?,
    };
    let mut req = http::Request::get("/status").header("host", admin.to_string());
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    let req = req
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("--token-file: the token is not a valid header value: {e}"))?;
    let resp = sender
        .send_request(req)
        .await
        .map_err(|e| format!("admin API at {admin}: {e}"))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| format!("admin API at {admin}: {e}"))?
        .to_bytes();
    if status == http::StatusCode::UNAUTHORIZED {
        let hint = if token.is_some() {
            "the token in --token-file is not an operator token nor a join token of this \
             mesh-control"
        } else {
            "mesh-control runs a CA and its /status needs credentials: pass --token-file with \
             a read-only operator token (serve's --operator-token-file)"
        };
        return Err(format!("admin API at {admin} answered {status}: {hint}"));
    }
    if !status.is_success() {
        return Err(format!("admin API at {admin} answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("admin API at {admin}: bad JSON: {e}"))
}

/// A connection that remembers the first byte the server sent: a client
/// speaking the wrong protocol gets only a parse error from hyper
/// ("invalid HTTP version parsed") or rustls, while this byte tells a TLS
/// server (a TLS record type) from an HTTP one (a letter).
struct Sniff<IO> {
    io: IO,
    first: Arc<OnceLock<u8>>,
}

impl<IO> Sniff<IO> {
    fn new(io: IO) -> (Self, Arc<OnceLock<u8>>) {
        let first = Arc::new(OnceLock::new());
        (
            Sniff {
                io,
                first: first.clone(),
            },
            first,
        )
    }
}

impl<IO: AsyncRead + Unpin> AsyncRead for Sniff<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if let Some(byte) = buf.filled().get(before) {
            let _ = this.first.set(*byte);
        }
        polled
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Sniff<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// TLS to the admin API, verifying its certificate against `ca_file` for
/// the IP dialled (mesh-control's certificate holds its listen IPs).
async fn tls_connect<IO>(
    stream: IO,
    admin: SocketAddr,
    ca_file: &Path,
) -> Result<tokio_rustls::client::TlsStream<IO>, String>
where
    IO: AsyncRead + AsyncWrite + Unpin,
{
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, ServerName};

    let mut roots = rustls::RootCertStore::empty();
    let certs = CertificateDer::pem_file_iter(ca_file)
        .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
    for cert in certs {
        let cert = cert.map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
        roots
            .add(cert)
            .map_err(|e| format!("--ca-file {}: {e}", ca_file.display()))?;
    }
    let provider = std::sync::Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    connector
        .connect(ServerName::IpAddress(admin.ip().into()), stream)
        .await
        .map_err(|e| format!("admin API at {admin}: TLS: {e}"))
}

fn status_table(status: &Value) -> String {
    let mut out = format!(
        "config version {}  (LDS {}, RDS {}, CDS {}, EDS {} resources)\n",
        status["version"],
        status["resources"]["LDS"],
        status["resources"]["RDS"],
        status["resources"]["CDS"],
        status["resources"]["EDS"]
    );
    out.push_str(&format!(
        "{:<28} {:<12} {:<10} {:<5} {:<9} {:<9} {:<6} {}\n",
        "NODE", "NAMESPACE", "KIND", "TYPE", "SENT", "ACKED", "STALE", "LAST NACK"
    ));
    let empty = Vec::new();
    for c in status["clients"].as_array().unwrap_or(&empty) {
        let types = c["types"].as_object();
        for (t, s) in types.into_iter().flatten() {
            let nack = s["last_nack"]["message"].as_str().unwrap_or("-");
            out.push_str(&format!(
                "{:<28} {:<12} {:<10} {:<5} {:<9} {:<9} {:<6} {}\n",
                c["node_id"].as_str().unwrap_or(""),
                c["namespace"].as_str().unwrap_or(""),
                c["kind"].as_str().unwrap_or(""),
                t,
                s["sent_version"].as_str().unwrap_or(""),
                s["acked_version"].as_str().unwrap_or(""),
                if c["stale"] == true { "yes" } else { "no" },
                nack
            ));
        }
        for ignored in c["ignored"].as_array().unwrap_or(&empty) {
            out.push_str(&format!(
                "  {} ({}) ignores: {}\n",
                c["node_id"].as_str().unwrap_or(""),
                c["user_agent"].as_str().unwrap_or(""),
                ignored.as_str().unwrap_or("")
            ));
        }
    }
    for d in status["diagnostics"].as_array().unwrap_or(&empty) {
        out.push_str(&format!("problem: {}\n", d.as_str().unwrap_or("")));
    }
    out
}
