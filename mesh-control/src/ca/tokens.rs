//! Join tokens: how a workload proves which service account it runs as.
//!
//! Without Kubernetes there is no projected service-account token to
//! present, so the operator hands each workload a secret bound to one
//! service account (SPIRE's join tokens play the same role for node
//! attestation). The CA issues certificates only for the identity a token
//! is bound to, whatever the CSR says.
//!
//! # Reloading
//!
//! A token is revoked by editing its file: [`Credentials`] looks at the
//! file's modification time, size and inode each time a token is checked
//! (a `stat`, microseconds; token checks are rare: a registration, a
//! heartbeat, a certificate) and reads it again when any changed, so a
//! revoked token stops working at its next use, without a restart and
//! without a watcher task to keep alive. A file that cannot be read or
//! parsed any more (an editor's half-written save, a typo) keeps the
//! tokens loaded before, with a warning: failing closed there would lock
//! every workload out at once. Write the file atomically (write a copy,
//! rename it over) to revoke reliably.
//!
//! # Operator tokens
//!
//! `mesh-control status` (and a Prometheus scraping `/metrics`) is no
//! workload and has no join token. With the CA on, the admin API's reads
//! (`/status`, `/v1/services`, `/metrics`) accept a read-only operator
//! token (`serve --operator-token-file FILE`: one token per line, `#`
//! comments; at least [`MIN_TOKEN_LEN`] bytes each), sent as
//! `Authorization: Bearer <token>`. It can read, nothing else: registration
//! and certificates refuse it with 403. It is reloaded like the join
//! tokens.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use arc_swap::ArcSwap;

use mesh_core::model::Name;
use mesh_core::spiffe::SpiffeId;
use serde::Deserialize;

use crate::error::Error;

/// The shortest token accepted: 16 bytes (128 bits if random hex or base64).
pub const MIN_TOKEN_LEN: usize = 16;

/// A namespace and service account: what a join token is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceAccount {
    /// The namespace (`shop`).
    pub namespace: Name,
    /// The service account (`catalog`).
    pub name: Name,
}

impl ServiceAccount {
    /// The SPIFFE ID of this service account in `trust_domain`.
    pub fn spiffe_id(&self, trust_domain: &str) -> Result<SpiffeId, Error> {
        SpiffeId::new(trust_domain, &self.namespace, &self.name)
            .map_err(|e| Error::config(e.to_string()))
    }
}

impl fmt::Display for ServiceAccount {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// The join tokens the control server accepts: token → service account.
///
/// Configure them with [`JoinTokens::insert`] or from a JSON file
/// ([`JoinTokens::from_json`]):
///
/// ```json
/// {"tokens": [
///   {"token": "3f9c0d8e6b1a47c2a5e4", "namespace": "shop", "service_account": "catalog"}
/// ]}
/// ```
///
/// Lookups compare against every token in constant time per byte, so the
/// time a lookup takes does not tell how much of a guess was right.
#[derive(Clone, Default)]
pub struct JoinTokens {
    entries: Vec<(Box<[u8]>, ServiceAccount)>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokensFile {
    tokens: Vec<TokenEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    token: String,
    namespace: String,
    service_account: String,
}

impl JoinTokens {
    /// No tokens: every request is denied.
    pub fn new() -> Self {
        JoinTokens::default()
    }

    /// Binds `token` to `namespace`/`service_account`. Fails on a token
    /// shorter than [`MIN_TOKEN_LEN`], a token given twice, or a name a
    /// SPIFFE ID cannot hold.
    pub fn insert(
        &mut self,
        token: impl Into<String>,
        namespace: &str,
        service_account: &str,
    ) -> Result<&mut Self, Error> {
        let token = token.into();
        if token.len() < MIN_TOKEN_LEN {
            return Err(Error::config(format!(
                "the join token for {namespace}/{service_account} is shorter than \
                 {MIN_TOKEN_LEN} bytes; use a long random secret"
            )));
        }
        // Validates both names with the SPIFFE ID rules.
        SpiffeId::new("validate", namespace, service_account)
            .map_err(|e| Error::config(format!("join token: {e}")))?;
        if self.lookup(&token).is_some() {
            return Err(Error::config(format!(
                "the join token for {namespace}/{service_account} is given twice"
            )));
        }
        self.entries.push((
            token.into_bytes().into_boxed_slice(),
            ServiceAccount {
                namespace: Name::from(namespace),
                name: Name::from(service_account),
            },
        ));
        Ok(self)
    }

    /// Reads `{"tokens": [{"token", "namespace", "service_account"}, ...]}`.
    pub fn from_json(json: &str) -> Result<Self, Error> {
        let file: TokensFile =
            serde_json::from_str(json).map_err(|e| Error::config(format!("join tokens: {e}")))?;
        let mut tokens = JoinTokens::new();
        for entry in file.tokens {
            tokens.insert(entry.token, &entry.namespace, &entry.service_account)?;
        }
        Ok(tokens)
    }

    /// Reads a JSON tokens file (see [`JoinTokens::from_json`]).
    pub fn load(path: &Path) -> Result<Self, Error> {
        let json = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        JoinTokens::from_json(&json).map_err(|e| Error::config(format!("{}: {e}", path.display())))
    }

    /// The service account `token` is bound to, if any.
    pub fn lookup(&self, token: &str) -> Option<&ServiceAccount> {
        let mut found = None;
        for (known, account) in &self.entries {
            // No early exit: every entry is compared.
            if constant_time_eq(known, token.as_bytes()) {
                found = Some(account);
            }
        }
        found
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for JoinTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print the secrets.
        f.debug_list()
            .entries(self.entries.iter().map(|(_, account)| account))
            .finish()
    }
}

/// Read-only operator tokens (see the module docs).
#[derive(Clone, Default)]
pub struct OperatorTokens {
    entries: Vec<Box<[u8]>>,
}

impl OperatorTokens {
    /// Reads one token per line (blank lines and `#` comments skipped).
    pub fn from_text(text: &str) -> Result<Self, Error> {
        let mut entries = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let token = line.trim();
            if token.is_empty() || token.starts_with('#') {
                continue;
            }
            if token.len() < MIN_TOKEN_LEN {
                return Err(Error::config(format!(
                    "operator token on line {} is shorter than {MIN_TOKEN_LEN} bytes; use a long \
                     random secret",
                    i + 1
                )));
            }
            entries.push(token.as_bytes().into());
        }
        Ok(OperatorTokens { entries })
    }

    /// Reads a file of operator tokens.
    pub fn load(path: &Path) -> Result<Self, Error> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Error::io(format!("cannot read {}", path.display()), e))?;
        OperatorTokens::from_text(&text)
            .map_err(|e| Error::config(format!("{}: {e}", path.display())))
    }

    /// Whether `token` is one of them (every entry compared, in constant
    /// time per entry).
    pub fn contains(&self, token: &str) -> bool {
        let mut found = false;
        for known in &self.entries {
            found |= constant_time_eq(known, token.as_bytes());
        }
        found
    }

    /// How many there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there are none.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

impl fmt::Debug for OperatorTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "OperatorTokens({} redacted)", self.entries.len())
    }
}

/// What identifies one version of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp {
    modified: Option<SystemTime>,
    len: u64,
    #[cfg(unix)]
    inode: u64,
}

impl Stamp {
    fn of(path: &Path) -> Option<Stamp> {
        let meta = std::fs::metadata(path).ok()?;
        Some(Stamp {
            modified: meta.modified().ok(),
            len: meta.len(),
            #[cfg(unix)]
            inode: std::os::unix::fs::MetadataExt::ino(&meta),
        })
    }
}

/// A file tokens are reloaded from, and the version last read.
#[derive(Debug)]
struct Watched {
    path: PathBuf,
    stamp: Mutex<Option<Stamp>>,
}

impl Watched {
    fn new(path: PathBuf) -> Self {
        let stamp = Mutex::new(Stamp::of(&path));
        Watched { path, stamp }
    }

    /// Whether the file changed since it was last looked at (and marks
    /// this version as seen).
    fn changed(&self) -> bool {
        let now = Stamp::of(&self.path);
        let mut seen = self.stamp.lock().unwrap_or_else(|e| e.into_inner());
        if *seen == now {
            return false;
        }
        *seen = now;
        true
    }
}

/// The join and operator tokens in force, reloaded from their files when
/// these change (see the module docs).
pub(crate) struct Credentials {
    join: ArcSwap<JoinTokens>,
    join_file: Option<Watched>,
    operators: ArcSwap<OperatorTokens>,
    operator_file: Option<Watched>,
}

impl Credentials {
    pub(crate) fn new(
        join: JoinTokens,
        join_file: Option<PathBuf>,
        operators: OperatorTokens,
        operator_file: Option<PathBuf>,
    ) -> Self {
        Credentials {
            join: ArcSwap::from_pointee(join),
            join_file: join_file.map(Watched::new),
            operators: ArcSwap::from_pointee(operators),
            operator_file: operator_file.map(Watched::new),
        }
    }

    /// The join tokens, read again first if their file changed.
    pub(crate) fn join(&self) -> Arc<JoinTokens> {
        if let Some(file) = &self.join_file
            && file.changed()
        {
            match JoinTokens::load(&file.path) {
                Ok(tokens) => {
                    tracing::info!(
                        file = %file.path.display(),
                        tokens = tokens.len(),
                        "join tokens reloaded"
                    );
                    self.join.store(Arc::new(tokens));
                }
                Err(e) => tracing::warn!(
                    "join tokens not reloaded, the ones loaded before stay in force: {e}"
                ),
            }
        }
        self.join.load_full()
    }

    /// The operator tokens, read again first if their file changed.
    pub(crate) fn operators(&self) -> Arc<OperatorTokens> {
        if let Some(file) = &self.operator_file
            && file.changed()
        {
            match OperatorTokens::load(&file.path) {
                Ok(tokens) => {
                    tracing::info!(
                        file = %file.path.display(),
                        tokens = tokens.len(),
                        "operator tokens reloaded"
                    );
                    self.operators.store(Arc::new(tokens));
                }
                Err(e) => tracing::warn!(
                    "operator tokens not reloaded, the ones loaded before stay in force: {e}"
                ),
            }
        }
        self.operators.load_full()
    }
}

/// The token of an `Authorization: Bearer <token>` value (an HTTP header
/// of the admin API, or gRPC metadata on ADS and CSDS): `None` for another
/// scheme or an empty token. One parser, so both ports accept exactly the
/// same credentials.
pub(crate) fn bearer_token(value: &str) -> Option<&str> {
    match value.split_once(' ') {
        Some((scheme, token))
            if scheme.eq_ignore_ascii_case("bearer") && !token.trim().is_empty() =>
        {
            Some(token.trim())
        }
        _ => None,
    }
}

/// Equality whose time depends only on the lengths.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ErrorKind;

    #[test]
    fn tokens_map_to_their_service_account_only() {
        let mut tokens = JoinTokens::new();
        tokens
            .insert("token-for-catalog-0001", "shop", "catalog")
            .unwrap()
            .insert("token-for-payment-0001", "shop", "payment")
            .unwrap();
        assert_eq!(
            tokens
                .lookup("token-for-catalog-0001")
                .map(|a| a.to_string()),
            Some("shop/catalog".into())
        );
        assert_eq!(
            tokens
                .lookup("token-for-payment-0001")
                .map(|a| a.to_string()),
            Some("shop/payment".into())
        );
        assert_eq!(tokens.lookup("token-for-catalog-0002"), None);
        assert_eq!(tokens.lookup(""), None);
        assert_eq!(tokens.len(), 2);
        let debug = format!("{tokens:?}");
        assert!(!debug.contains("token-for"), "{debug}");
    }

    #[test]
    fn bad_tokens_are_refused() {
        let mut tokens = JoinTokens::new();
        let short = tokens.insert("short", "shop", "catalog").unwrap_err();
        assert_eq!(short.kind(), ErrorKind::Config);
        assert!(short.to_string().contains("shorter than 16"), "{short}");
        assert!(tokens.insert("0123456789abcdef", "shop", "a/b").is_err());
        tokens.insert("0123456789abcdef", "shop", "a").unwrap();
        let twice = tokens.insert("0123456789abcdef", "shop", "b").unwrap_err();
        assert!(twice.to_string().contains("twice"), "{twice}");
    }

    #[test]
    fn an_edited_tokens_file_is_read_again_and_a_broken_one_keeps_the_last() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        let write = |json: &str| {
            // Atomically, as the docs advise: a new inode each time.
            let tmp = dir.path().join("tokens.tmp");
            std::fs::write(&tmp, json).unwrap();
            std::fs::rename(&tmp, &path).unwrap();
        };
        let entry = |token: &str, sa: &str| {
            format!(r#"{{"token": "{token}", "namespace": "shop", "service_account": "{sa}"}}"#)
        };
        write(&format!(
            r#"{{"tokens": [{}]}}"#,
            entry("token-for-catalog-0001", "catalog")
        ));
        let credentials = Credentials::new(
            JoinTokens::load(&path).unwrap(),
            Some(path.clone()),
            OperatorTokens::default(),
            None,
        );
        assert!(
            credentials
                .join()
                .lookup("token-for-catalog-0001")
                .is_some()
        );
        write(&format!(
            r#"{{"tokens": [{}]}}"#,
            entry("token-for-payment-0001", "payment")
        ));
        let now = credentials.join();
        assert!(now.lookup("token-for-catalog-0001").is_none(), "revoked");
        assert!(now.lookup("token-for-payment-0001").is_some(), "added");
        write("{not json");
        assert!(
            credentials
                .join()
                .lookup("token-for-payment-0001")
                .is_some(),
            "a broken file keeps the tokens in force"
        );
    }

    #[test]
    fn operator_tokens_are_one_per_line() {
        let tokens =
            OperatorTokens::from_text("# ops\n\n  operator-token-0001  \nsecond-operator-token\n")
                .unwrap();
        assert_eq!(tokens.len(), 2);
        assert!(tokens.contains("operator-token-0001"));
        assert!(!tokens.contains("operator-token-000"));
        assert!(!format!("{tokens:?}").contains("operator"), "redacted");
        let e = OperatorTokens::from_text("short\n").unwrap_err();
        assert!(e.to_string().contains("line 1"), "{e}");
    }

    #[test]
    fn json_file() {
        let tokens = JoinTokens::from_json(
            r#"{"tokens": [{"token": "0123456789abcdef", "namespace": "shop", "service_account": "catalog"}]}"#,
        )
        .unwrap();
        assert_eq!(
            tokens.lookup("0123456789abcdef").map(|a| a.to_string()),
            Some("shop/catalog".into())
        );
        let e = JoinTokens::from_json(r#"{"tokens": [{"token": "x"}]}"#).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Config);
        let e = JoinTokens::from_json(r#"{"tokenz": []}"#).unwrap_err();
        assert!(e.to_string().contains("tokenz"), "{e}");
    }
}
