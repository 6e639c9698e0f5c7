//! One CA root for every replica (feature `etcd`): its key kept in etcd,
//! sealed with a key only the replicas have.
//!
//! Replicas must issue certificates from one root, or a workload whose
//! certificate came from one replica would not be trusted by workloads that
//! learned their trust bundle from another. The root's certificate and key
//! are kept in etcd (`replica.rs` reads and writes them); whoever can read
//! etcd's keys must not learn the key, so it is sealed with AES-256-GCM
//! (ring, already in the build for rustls) under a 32-byte key read from a
//! file every replica is given (`--ca-key-encryption-key FILE`), with a
//! random nonce per sealing and the trust domain as associated data (a
//! sealed key copied into another mesh's entry does not open). The
//! certificate stays readable: it is public.
//!
//! What is stored is [`SealedRoot`]'s JSON. Everything here is pure but
//! for the random nonce and key generation.

use std::fmt;
use std::path::Path;
use std::time::{Duration, SystemTime};

use ring::aead::{AES_256_GCM, Aad, LessSafeKey, NONCE_LEN, Nonce, UnboundKey};
use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

use super::signer::Signer;
use crate::error::Error;

/// The length of the encryption key: AES-256.
pub const ENCRYPTION_KEY_LEN: usize = 32;

/// The format of [`SealedRoot`]; another is refused rather than misread.
const FORMAT: u32 = 1;

/// What the nonce and the sealed key are, so a later format can say
/// otherwise.
const ALGORITHM: &str = "AES-256-GCM";

/// The key that seals the shared CA root's private key: 32 bytes from a
/// file every replica is given. `Debug` never prints it.
#[derive(Clone, PartialEq, Eq)]
pub struct CaKeyEncryptionKey([u8; ENCRYPTION_KEY_LEN]);

impl fmt::Debug for CaKeyEncryptionKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CaKeyEncryptionKey(..)")
    }
}

impl CaKeyEncryptionKey {
    /// Reads the key from `path`: 32 bytes, either as they are (made with
    /// `head -c 32 /dev/urandom`) or as 64 hex digits (made with `openssl
    /// rand -hex 32`), surrounding whitespace ignored. The error names the
    /// file and says how to make one. A file others may read is accepted
    /// with a warning.
    pub fn from_file(path: &Path) -> Result<CaKeyEncryptionKey, Error> {
        let bytes = std::fs::read(path).map_err(|e| {
            Error::io(
                format!("cannot read the CA key encryption key {}", path.display()),
                e,
            )
        })?;
        #[cfg(unix)]
        if let Ok(meta) = std::fs::metadata(path) {
            use std::os::unix::fs::PermissionsExt;
            if meta.permissions().mode() & 0o077 != 0 {
                tracing::warn!(
                    file = %path.display(),
                    "the CA key encryption key can be read by other users: chmod 600 it"
                );
            }
        }
        CaKeyEncryptionKey::from_bytes(&bytes).map_err(|e| {
            Error::config(format!(
                "{}: {e}; make one with `openssl rand -hex 32 > {}` and give the same file to \
                 every replica",
                path.display(),
                path.display()
            ))
        })
    }

    /// The key from what a key file holds (see [`Self::from_file`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<CaKeyEncryptionKey, String> {
        if let Ok(raw) = <[u8; ENCRYPTION_KEY_LEN]>::try_from(bytes) {
            return Ok(CaKeyEncryptionKey(raw));
        }
        let text = std::str::from_utf8(bytes).map(str::trim).unwrap_or("");
        match hex_decode(text) {
            Some(decoded) => <[u8; ENCRYPTION_KEY_LEN]>::try_from(decoded.as_slice())
                .map(CaKeyEncryptionKey)
                .map_err(|_| {
                    format!(
                        "holds {} hex-encoded bytes; the key is {ENCRYPTION_KEY_LEN} bytes (64 \
                         hex digits)",
                        decoded.len()
                    )
                }),
            None => Err(format!(
                "is neither {ENCRYPTION_KEY_LEN} bytes nor {} hex digits",
                2 * ENCRYPTION_KEY_LEN
            )),
        }
    }

    fn aead(&self) -> Result<LessSafeKey, Error> {
        UnboundKey::new(&AES_256_GCM, &self.0)
            .map(LessSafeKey::new)
            .map_err(|_| Error::config("the CA key encryption key cannot be used for AES-256-GCM"))
    }
}

/// A CA root: its certificate and its PKCS#8 private key (PEM).
#[derive(Clone, PartialEq, Eq)]
pub(crate) struct RootPem {
    pub(crate) cert_pem: String,
    pub(crate) key_pem: String,
}

impl fmt::Debug for RootPem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RootPem")
            .field("cert_pem", &self.cert_pem)
            .finish_non_exhaustive()
    }
}

/// A new self-signed root for `trust_domain`, as a CA directory's first
/// start would make.
pub(crate) fn generate_root(trust_domain: &str, lifetime: Duration) -> Result<RootPem, Error> {
    let signer = Signer::generate(trust_domain, lifetime, SystemTime::now())?;
    Ok(RootPem {
        cert_pem: signer.chain_pem,
        key_pem: signer.key_pem,
    })
}

/// The root as it is stored: the certificate in the clear, the key sealed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SealedRoot {
    format: u32,
    /// The trust domain the root is for (also the associated data).
    trust_domain: String,
    cert_pem: String,
    /// [`ALGORITHM`].
    algorithm: String,
    /// The nonce, hex.
    nonce: String,
    /// The PKCS#8 PEM key sealed, with its tag, hex.
    sealed_key: String,
}

/// What the sealing of a root binds it to: the trust domain.
fn associated_data(trust_domain: &str) -> Vec<u8> {
    let mut aad = b"proxyless mesh-control CA root key\0".to_vec();
    aad.extend_from_slice(trust_domain.as_bytes());
    aad
}

/// Seals `root` of `trust_domain` under `key`: the JSON to store.
pub(crate) fn seal(
    root: &RootPem,
    trust_domain: &str,
    key: &CaKeyEncryptionKey,
) -> Result<Vec<u8>, Error> {
    let mut nonce = [0u8; NONCE_LEN];
    SystemRandom::new()
        .fill(&mut nonce)
        .map_err(|_| Error::config("no randomness for a nonce"))?;
    let mut sealed = root.key_pem.as_bytes().to_vec();
    key.aead()?
        .seal_in_place_append_tag(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated_data(trust_domain)),
            &mut sealed,
        )
        .map_err(|_| Error::config("cannot seal the CA key"))?;
    let stored = SealedRoot {
        format: FORMAT,
        trust_domain: trust_domain.to_string(),
        cert_pem: root.cert_pem.clone(),
        algorithm: ALGORITHM.to_string(),
        nonce: hex_encode(&nonce),
        sealed_key: hex_encode(&sealed),
    };
    serde_json::to_vec(&stored)
        .map_err(|e| Error::config(format!("cannot encode the CA root: {e}")))
}

/// Opens what [`seal`] stored, for `trust_domain`, with `key`. `place`
/// names where it was read (etcd's key) in errors.
pub(crate) fn open(
    stored: &[u8],
    trust_domain: &str,
    key: &CaKeyEncryptionKey,
    place: &str,
) -> Result<RootPem, Error> {
    let sealed: SealedRoot = serde_json::from_slice(stored).map_err(|e| {
        Error::config(format!(
            "{place} does not hold a CA root written by mesh-control ({e})"
        ))
    })?;
    if sealed.format != FORMAT || sealed.algorithm != ALGORITHM {
        return Err(Error::config(format!(
            "{place} holds a CA root of format {} sealed with {}; this mesh-control reads format \
             {FORMAT} sealed with {ALGORITHM}",
            sealed.format, sealed.algorithm
        )));
    }
    if sealed.trust_domain != trust_domain {
        return Err(Error::config(format!(
            "{place} holds the CA root of trust domain {:?}, not {trust_domain:?}: every replica \
             must run with the same --trust-domain",
            sealed.trust_domain
        )));
    }
    let nonce = hex_decode(&sealed.nonce)
        .and_then(|n| <[u8; NONCE_LEN]>::try_from(n.as_slice()).ok())
        .ok_or_else(|| Error::config(format!("{place}: the nonce is not {NONCE_LEN} hex bytes")))?;
    let mut sealed_key = hex_decode(&sealed.sealed_key)
        .ok_or_else(|| Error::config(format!("{place}: the sealed key is not hex")))?;
    let opened = key
        .aead()?
        .open_in_place(
            Nonce::assume_unique_for_key(nonce),
            Aad::from(associated_data(trust_domain)),
            &mut sealed_key,
        )
        .map_err(|_| {
            Error::config(format!(
                "cannot decrypt the CA key in {place}: it was sealed with another key than the \
                 one given (every replica needs the same --ca-key-encryption-key file), or it was \
                 altered"
            ))
        })?;
    let key_pem = String::from_utf8(opened.to_vec())
        .map_err(|_| Error::config(format!("{place}: the CA key is not PEM text")))?;
    Ok(RootPem {
        cert_pem: sealed.cert_pem,
        key_pem,
    })
}

fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn hex_decode(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) || !text.is_ascii() {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|i| {
            text.get(i..i + 2)
                .and_then(|pair| u8::from_str_radix(pair, 16).ok())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> CaKeyEncryptionKey {
        CaKeyEncryptionKey([byte; ENCRYPTION_KEY_LEN])
    }

    #[test]
    fn a_sealed_root_opens_with_its_key_and_domain_only() {
        let root = generate_root("cluster.local", Duration::from_secs(3600)).unwrap();
        let stored = seal(&root, "cluster.local", &key(1)).unwrap();
        let text = String::from_utf8(stored.clone()).unwrap();
        assert!(!text.contains("PRIVATE KEY"), "the key is not in the clear");
        assert!(text.contains("BEGIN CERTIFICATE"), "the certificate is");
        let opened = open(&stored, "cluster.local", &key(1), "etcd").unwrap();
        assert_eq!(opened, root);

        let wrong = open(&stored, "cluster.local", &key(2), "etcd key /x").unwrap_err();
        assert!(
            wrong.to_string().contains("--ca-key-encryption-key"),
            "{wrong}"
        );
        let other = open(&stored, "example.org", &key(1), "etcd").unwrap_err();
        assert!(other.to_string().contains("--trust-domain"), "{other}");

        // Another domain's sealed key copied in does not open either.
        let mut forged: SealedRoot = serde_json::from_slice(&stored).unwrap();
        forged.trust_domain = "example.org".into();
        let forged = serde_json::to_vec(&forged).unwrap();
        assert!(open(&forged, "example.org", &key(1), "etcd").is_err());
        assert!(open(b"{not json", "cluster.local", &key(1), "etcd").is_err());
    }

    #[test]
    fn key_files_hold_raw_or_hex_bytes() {
        assert_eq!(CaKeyEncryptionKey::from_bytes(&[7; 32]).unwrap(), key(7));
        let hex = format!("{}\n", "0a".repeat(32));
        assert_eq!(
            CaKeyEncryptionKey::from_bytes(hex.as_bytes()).unwrap(),
            key(10)
        );
        let short = CaKeyEncryptionKey::from_bytes(b"abcd").unwrap_err();
        assert!(short.contains("2 hex-encoded bytes"), "{short}");
        assert!(CaKeyEncryptionKey::from_bytes(b"not a key").is_err());
        assert!(CaKeyEncryptionKey::from_bytes("é".repeat(20).as_bytes()).is_err());
        assert_eq!(format!("{:?}", key(1)), "CaKeyEncryptionKey(..)");

        let dir = tempfile::tempdir().unwrap();
        let e = CaKeyEncryptionKey::from_file(&dir.path().join("missing")).unwrap_err();
        assert!(e.to_string().contains("cannot read"), "{e}");
        std::fs::write(dir.path().join("bad"), "xyz").unwrap();
        let e = CaKeyEncryptionKey::from_file(&dir.path().join("bad")).unwrap_err();
        assert!(e.to_string().contains("openssl rand -hex 32"), "{e}");
    }
}
