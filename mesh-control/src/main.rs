//! `mesh-control`: serve Istio YAML as xDS, check it offline, show client status.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use http_body_util::{BodyExt, Empty};
use hyper::body::Bytes;
use mesh_control::config::{MeshOptions, check_dir};
use serde_json::Value;

/// The control server of the proxyless in-process service mesh.
#[derive(Parser)]
#[command(name = "mesh-control", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a directory of Istio YAML over xDS (ADS) and run the admin API.
    Serve {
        /// Directory of *.yaml / *.yml files (watched for changes).
        #[arg(long)]
        config: PathBuf,
        /// ADS (gRPC) listen address.
        #[arg(long, default_value = "127.0.0.1:15010")]
        xds: SocketAddr,
        /// Admin HTTP API listen address (/status, /v1/endpoints, /v1/services).
        #[arg(long, default_value = "127.0.0.1:15000")]
        admin: SocketAddr,
        /// Milliseconds to wait for more file changes before reloading.
        #[arg(long, default_value_t = 10)]
        debounce_ms: u64,
        /// Domain suffix of short service names.
        #[arg(long, default_value = "svc.cluster.local")]
        domain_suffix: String,
        /// Namespace whose policies apply mesh-wide.
        #[arg(long, default_value = "istio-system")]
        root_namespace: String,
    },
    /// Validate a directory of Istio YAML; prints `file:line: message` per problem.
    Check {
        /// Directory of *.yaml / *.yml files.
        dir: PathBuf,
        /// Also report what a kind of client ignores of this config (`grpc`).
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
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Check {
            dir,
            for_client,
            domain_suffix,
        } => check(&dir, for_client.as_deref(), domain_suffix),
        Command::Serve {
            config,
            xds,
            admin,
            debounce_ms,
            domain_suffix,
            root_namespace,
        } => {
            init_logging();
            let options = MeshOptions {
                domain_suffix,
                root_namespace,
                ..MeshOptions::default()
            };
            run(async move {
                let handle = mesh_control::Server::builder()
                    .config_dir(config)
                    .xds_addr(xds)
                    .admin_addr(admin)
                    .debounce(Duration::from_millis(debounce_ms))
                    .options(options)
                    .start()
                    .await
                    .map_err(|e| e.to_string())?;
                tracing::info!(
                    xds = %handle.xds_addr(),
                    admin = %handle.admin_addr(),
                    "mesh-control serving"
                );
                tokio::signal::ctrl_c()
                    .await
                    .map_err(|e| format!("waiting for Ctrl-C: {e}"))?;
                handle.shutdown().await;
                Ok(())
            })
        }
        Command::Status { admin, json } => run(async move {
            let status = fetch_status(admin).await?;
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

fn check(dir: &std::path::Path, for_client: Option<&str>, domain_suffix: String) -> ExitCode {
    if !dir.is_dir() {
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
            for finding in mesh_control::grpc_compatibility(dir, &options) {
                println!("grpc: {finding}");
            }
        }
        Some(other) => {
            eprintln!("--for {other:?}: the only client kind with known gaps is `grpc`");
            return ExitCode::FAILURE;
        }
    }
    let diagnostics = check_dir(dir, &options);
    for d in &diagnostics {
        eprintln!("{d}");
    }
    if diagnostics.is_empty() {
        println!("{}: ok", dir.display());
        ExitCode::SUCCESS
    } else {
        eprintln!("{} problem(s)", diagnostics.len());
        ExitCode::FAILURE
    }
}

async fn fetch_status(admin: SocketAddr) -> Result<Value, String> {
    let stream = tokio::net::TcpStream::connect(admin).await.map_err(|e| {
        format!("cannot reach the admin API at {admin}: {e} (is `mesh-control serve` running?)")
    })?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| format!("admin API at {admin}: {e}"))?;
    tokio::spawn(conn);
    let req = http::Request::get("/status")
        .header("host", admin.to_string())
        .body(Empty::<Bytes>::new())
        .map_err(|e| e.to_string())?;
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
    if !status.is_success() {
        return Err(format!("admin API at {admin} answered {status}"));
    }
    serde_json::from_slice(&body).map_err(|e| format!("admin API at {admin}: bad JSON: {e}"))
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
