//! gRPC's `file_watcher` certificate provider (gRFC A29): certificates from
//! files, re-read periodically.
//!
//! The bootstrap names provider instances; the xDS security config refers to
//! them by instance name (`tls_certificate_provider_instance`):
//!
//! ```json
//! "certificate_providers": {"mesh": {"plugin_name": "file_watcher", "config": {
//!   "certificate_file": "cert.pem", "private_key_file": "key.pem",
//!   "ca_certificate_file": "ca.pem", "refresh_interval": "60s"}}}
//! ```
//!
//! Like gRPC's, the watcher re-reads the files every `refresh_interval`
//! (default 10 minutes) and applies them when they changed and belong
//! together; a half-written update (a new certificate with the old key) is
//! skipped until the next read, keeping the last good credentials.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::Value;
use tokio::task::JoinHandle;

use super::store::{CertStore, Credentials, tls};
use crate::error::{Error, ErrorKind};

/// gRPC's default `refresh_interval`.
pub const DEFAULT_REFRESH_INTERVAL: Duration = Duration::from_secs(600);

/// The `config` of a `file_watcher` provider instance.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileWatcherConfig {
    /// The certificate chain (PEM, leaf first).
    pub certificate_file: PathBuf,
    /// The private key (PEM).
    pub private_key_file: PathBuf,
    /// The trust bundle (PEM roots).
    pub ca_certificate_file: PathBuf,
    /// How often the files are re-read.
    pub refresh_interval: Duration,
}

impl FileWatcherConfig {
    /// The plugin name in the bootstrap.
    pub const PLUGIN_NAME: &'static str = "file_watcher";

    /// Reads a provider's `config` object. All three files are required:
    /// a mesh workload needs an identity and a trust bundle.
    pub fn from_json(config: &Value) -> Result<Self, Error> {
        let file = |field: &str| -> Result<PathBuf, Error> {
            match config.get(field) {
                Some(Value::String(s)) if !s.is_empty() => Ok(PathBuf::from(s)),
                Some(_) => Err(tls(format!("file_watcher: {field} must be a file path"))),
                None => Err(tls(format!(
                    "file_watcher: {field} is missing (certificate_file, private_key_file and \
                     ca_certificate_file are all needed for mTLS)"
                ))),
            }
        };
        let refresh_interval = match config.get("refresh_interval") {
            None => DEFAULT_REFRESH_INTERVAL,
            Some(Value::String(s)) => parse_duration(s).ok_or_else(|| {
                tls(format!(
                    "file_watcher: refresh_interval {s:?} is not a duration like \"60s\" or \"0.5s\""
                ))
            })?,
            Some(_) => {
                return Err(tls(
                    "file_watcher: refresh_interval must be a string like \"60s\"",
                ));
            }
        };
        Ok(FileWatcherConfig {
            certificate_file: file("certificate_file")?,
            private_key_file: file("private_key_file")?,
            ca_certificate_file: file("ca_certificate_file")?,
            refresh_interval,
        })
    }

    /// The config of provider instance `instance` in a gRPC bootstrap
    /// (`certificate_providers.<instance>`), which must be a `file_watcher`.
    pub fn from_bootstrap(bootstrap: &Value, instance: &str) -> Result<Self, Error> {
        let provider = bootstrap
            .get("certificate_providers")
            .and_then(|p| p.get(instance))
            .ok_or_else(|| {
                tls(format!(
                    "the bootstrap has no certificate_providers.{instance}"
                ))
            })?;
        Self::from_provider(provider, instance)
    }

    /// The config of one `certificate_providers` entry
    /// (`{"plugin_name": "file_watcher", "config": {...}}`), named
    /// `instance` in errors; mesh-xds-client's `Bootstrap::certificate_providers()`
    /// gives these entries.
    pub fn from_provider(provider: &Value, instance: &str) -> Result<Self, Error> {
        match provider.get("plugin_name").and_then(Value::as_str) {
            Some(Self::PLUGIN_NAME) => {}
            other => {
                return Err(tls(format!(
                    "certificate provider {instance:?}: plugin {other:?} is not supported \
                     (only \"file_watcher\")"
                )));
            }
        }
        let config = provider.get("config").cloned().unwrap_or(Value::Null);
        Self::from_json(&config).map_err(|e| {
            tls(format!(
                "certificate provider {instance:?}: {}",
                e.message()
            ))
        })
    }

    /// Reads the three files.
    pub fn load(&self) -> Result<Credentials, Error> {
        self.read()?.credentials()
    }

    fn read(&self) -> Result<Files, Error> {
        Ok(Files {
            chain: read(&self.certificate_file)?,
            key: read(&self.private_key_file)?,
            bundle: read(&self.ca_certificate_file)?,
        })
    }
}

/// The contents of the three files, to tell whether they changed.
#[derive(PartialEq, Eq)]
struct Files {
    chain: Vec<u8>,
    key: Vec<u8>,
    bundle: Vec<u8>,
}

impl Files {
    fn credentials(&self) -> Result<Credentials, Error> {
        Credentials::from_pem(&self.chain, &self.key, &self.bundle)
    }
}

fn read(path: &Path) -> Result<Vec<u8>, Error> {
    std::fs::read(path).map_err(|e| {
        Error::new(ErrorKind::Tls, format!("cannot read {}", path.display())).with_source(e)
    })
}

/// A protobuf JSON duration: seconds with an `s` suffix (`"60s"`, `"1.5s"`).
fn parse_duration(s: &str) -> Option<Duration> {
    let secs: f64 = s.strip_suffix('s')?.parse().ok()?;
    (secs.is_finite() && secs > 0.0).then(|| Duration::from_secs_f64(secs))
}

/// A running `file_watcher`: re-reads the files into a [`CertStore`] every
/// refresh interval. Stops when dropped.
#[derive(Debug)]
pub struct FileWatcher {
    task: JoinHandle<()>,
}

impl FileWatcher {
    /// Loads the files into a new store and starts watching them. Needs a
    /// tokio runtime. Fails when the files cannot be used now.
    pub fn start(config: FileWatcherConfig) -> Result<(CertStore, FileWatcher), Error> {
        let files = config.read()?;
        let store = CertStore::new(files.credentials()?)?;
        let watcher = FileWatcher::watch(config, store.clone(), Some(files));
        Ok((store, watcher))
    }

    /// Watches the files into an existing `store` (the first read happens
    /// after one refresh interval).
    pub fn start_with(config: FileWatcherConfig, store: CertStore) -> FileWatcher {
        FileWatcher::watch(config, store, None)
    }

    fn watch(config: FileWatcherConfig, store: CertStore, mut last: Option<Files>) -> FileWatcher {
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(config.refresh_interval);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                let files = match config.read() {
                    Ok(files) => files,
                    Err(e) => {
                        tracing::warn!(error = %e, "file_watcher: keeping the current certificate");
                        continue;
                    }
                };
                if last.as_ref() == Some(&files) {
                    continue;
                }
                let applied = files
                    .credentials()
                    .and_then(|credentials| store.update(credentials));
                match applied {
                    Ok(()) => last = Some(files),
                    Err(e) => tracing::warn!(
                        error = %e,
                        "file_watcher: the files changed but cannot be used (yet); keeping the \
                         current certificate"
                    ),
                }
            }
        });
        FileWatcher { task }
    }
}

impl Drop for FileWatcher {
    fn drop(&mut self) {
        self.task.abort();
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn bootstrap_config() {
        let bootstrap = json!({"certificate_providers": {"mesh": {"plugin_name": "file_watcher",
            "config": {"certificate_file": "c.pem", "private_key_file": "k.pem",
                       "ca_certificate_file": "ca.pem", "refresh_interval": "0.25s"}}}});
        let config = FileWatcherConfig::from_bootstrap(&bootstrap, "mesh").unwrap();
        assert_eq!(config.certificate_file, PathBuf::from("c.pem"));
        assert_eq!(config.private_key_file, PathBuf::from("k.pem"));
        assert_eq!(config.ca_certificate_file, PathBuf::from("ca.pem"));
        assert_eq!(config.refresh_interval, Duration::from_millis(250));

        let e = FileWatcherConfig::from_bootstrap(&bootstrap, "other").unwrap_err();
        assert!(e.to_string().contains("certificate_providers.other"), "{e}");
        let spire = json!({"certificate_providers": {"mesh": {"plugin_name": "spiffe"}}});
        let e = FileWatcherConfig::from_bootstrap(&spire, "mesh").unwrap_err();
        assert!(e.to_string().contains("only \"file_watcher\""), "{e}");
        let no_ca = json!({"certificate_file": "c", "private_key_file": "k"});
        let e = FileWatcherConfig::from_json(&no_ca).unwrap_err();
        assert!(
            e.to_string().contains("ca_certificate_file is missing"),
            "{e}"
        );
        let defaults = json!({"certificate_file": "c", "private_key_file": "k",
                              "ca_certificate_file": "ca"});
        assert_eq!(
            FileWatcherConfig::from_json(&defaults)
                .unwrap()
                .refresh_interval,
            DEFAULT_REFRESH_INTERVAL
        );
        for bad in ["60", "-1s", "xs", "0s"] {
            let config = json!({"certificate_file": "c", "private_key_file": "k",
                                "ca_certificate_file": "ca", "refresh_interval": bad});
            assert!(FileWatcherConfig::from_json(&config).is_err(), "{bad}");
        }
    }
}
