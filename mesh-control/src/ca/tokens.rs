//! Join tokens: how a workload proves which service account it runs as.
//!
//! Without Kubernetes there is no projected service-account token to
//! present, so the operator hands each workload a secret bound to one
//! service account (SPIRE's join tokens play the same role for node
//! attestation). The CA issues certificates only for the identity a token
//! is bound to, whatever the CSR says.

use std::fmt;
use std::path::Path;

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

/// Equality whose time depends only on the lengths.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
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
