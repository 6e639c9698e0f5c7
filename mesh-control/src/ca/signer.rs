//! A signing CA: key, certificate and the chain up to its root; generated,
//! parsed from PEM, and persisted to a directory.

use std::fs;
use std::io::Write;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, PublicKeyData, SerialNumber,
};
use time::OffsetDateTime;
use x509_parser::pem::Pem;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::error::Error;

/// Backdating of `notBefore`, for peers whose clocks are a little behind.
pub(crate) const BACKDATE: Duration = Duration::from_secs(10);

/// The key and certificate that sign workload certificates.
pub(crate) struct Signer {
    pub(crate) issuer: Issuer<'static, KeyPair>,
    /// The signing key (PKCS#8 PEM), for persistence.
    pub(crate) key_pem: String,
    /// The signing certificate followed by its issuers, root last (PEM).
    pub(crate) chain_pem: String,
    /// What follows a leaf in an issued chain: the signing certificate and
    /// intermediates, without the root (empty when the signer is the root).
    pub(crate) intermediates_pem: String,
    /// The trust anchor (PEM).
    pub(crate) root_pem: String,
    /// When the signing certificate expires; no leaf outlives it.
    pub(crate) not_after: SystemTime,
    /// The latest `notAfter` of a certificate this signer issued: its root
    /// stays in the trust bundle until then after a rotation.
    pub(crate) last_issued_expiry: SystemTime,
}

impl Signer {
    /// A new self-signed root for `trust_domain` (ECDSA P-256).
    pub(crate) fn generate(
        trust_domain: &str,
        lifetime: Duration,
        now: SystemTime,
    ) -> Result<Signer, Error> {
        let key = KeyPair::generate().map_err(|e| crypto("cannot generate a root key", e))?;
        let mut params = CertificateParams::default();
        let mut dn = DistinguishedName::new();
        dn.push(DnType::OrganizationName, trust_domain);
        dn.push(DnType::CommonName, "proxyless mesh root CA");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        params.not_before = to_offset(now.checked_sub(BACKDATE).unwrap_or(now));
        let not_after = now.checked_add(lifetime).unwrap_or(now);
        params.not_after = to_offset(not_after);
        params.serial_number = Some(random_serial());
        let cert = params
            .self_signed(&key)
            .map_err(|e| crypto("cannot sign the root certificate", e))?;
        let key_pem = key.serialize_pem();
        let root_pem = cert.pem();
        Ok(Signer {
            issuer: Issuer::new(params, key),
            key_pem,
            chain_pem: root_pem.clone(),
            intermediates_pem: String::new(),
            root_pem,
            not_after: truncate_to_seconds(not_after),
            last_issued_expiry: now,
        })
    }

    /// An operator-supplied CA: `chain_pem` holds the signing certificate
    /// (a root or an intermediate) first and its issuers after it, ending
    /// with the self-signed root; `key_pem` is the signing key (PKCS#8).
    /// Certificates it issued before are assumed valid for up to
    /// `max_lifetime` from `now`.
    pub(crate) fn from_pem(
        chain_pem: &str,
        key_pem: &str,
        now: SystemTime,
        max_lifetime: Duration,
    ) -> Result<Signer, Error> {
        let pems = parse_pems(chain_pem, "CERTIFICATE")?;
        let (Some(signing), Some(root)) = (pems.first(), pems.last()) else {
            return Err(Error::config("the CA certificate file has no certificate"));
        };
        let signing_cert = parse_cert(&signing.contents)?;
        if !signing_cert.is_ca() {
            return Err(Error::config(
                "the CA certificate is not a CA (basicConstraints CA:TRUE is missing)",
            ));
        }
        if let Ok(Some(ku)) = signing_cert.key_usage()
            && !ku.value.key_cert_sign()
        {
            return Err(Error::config(
                "the CA certificate's key usage does not allow signing certificates",
            ));
        }
        let root_cert = parse_cert(&root.contents)?;
        if root_cert.subject() != root_cert.issuer() {
            return Err(Error::config(
                "the CA certificate file must end with the self-signed root certificate",
            ));
        }
        let key = KeyPair::from_pem(key_pem).map_err(|e| {
            Error::config(format!("the CA key is not a PKCS#8 PEM private key: {e}"))
        })?;
        if key.subject_public_key_info() != signing_cert.public_key().raw {
            return Err(Error::config(
                "the CA key does not belong to the CA certificate",
            ));
        }
        let not_after = asn1_time(signing_cert.validity().not_after.timestamp());
        let issuer = Issuer::from_ca_cert_der(&signing.contents.clone().into(), key)
            .map_err(|e| Error::config(format!("cannot use the CA certificate: {e}")))?;
        let intermediates: Vec<&Pem> = pems.iter().take(pems.len().saturating_sub(1)).collect();
        Ok(Signer {
            issuer,
            key_pem: key_pem.to_owned(),
            chain_pem: pems.iter().map(to_pem).collect(),
            intermediates_pem: intermediates.into_iter().map(to_pem).collect(),
            root_pem: to_pem(root),
            not_after,
            last_issued_expiry: now.checked_add(max_lifetime).unwrap_or(now),
        })
    }

    /// Writes the chain and the key (mode 0600) as `<stem>-cert.pem` and
    /// `<stem>-key.pem` in `dir`.
    pub(crate) fn save(&self, dir: &Path, stem: &str) -> Result<(), Error> {
        write_file(&dir.join(format!("{stem}-key.pem")), &self.key_pem, true)?;
        write_file(
            &dir.join(format!("{stem}-cert.pem")),
            &self.chain_pem,
            false,
        )
    }

    /// Reads what [`Signer::save`] wrote; `None` when neither file exists.
    pub(crate) fn load(
        dir: &Path,
        stem: &str,
        now: SystemTime,
        max_lifetime: Duration,
    ) -> Result<Option<Signer>, Error> {
        let cert_path = dir.join(format!("{stem}-cert.pem"));
        let key_path = dir.join(format!("{stem}-key.pem"));
        match (cert_path.exists(), key_path.exists()) {
            (false, false) => Ok(None),
            (true, true) => {
                let read = |p: &Path| {
                    fs::read_to_string(p)
                        .map_err(|e| Error::io(format!("cannot read {}", p.display()), e))
                };
                Signer::from_pem(&read(&cert_path)?, &read(&key_path)?, now, max_lifetime)
                    .map(Some)
                    .map_err(|e| Error::config(format!("{}: {e}", cert_path.display())))
            }
            (cert, _) => Err(Error::config(format!(
                "{} exists but {} does not: restore it or remove both to generate a new root",
                if cert {
                    cert_path.display()
                } else {
                    key_path.display()
                },
                if cert {
                    key_path.display()
                } else {
                    cert_path.display()
                },
            ))),
        }
    }
}

/// Every PEM block of `pem` with the given label.
pub(crate) fn parse_pems(pem: &str, label: &str) -> Result<Vec<Pem>, Error> {
    let mut out = Vec::new();
    for block in Pem::iter_from_buffer(pem.as_bytes()) {
        let block = block.map_err(|e| Error::config(format!("bad PEM: {e}")))?;
        if block.label == label {
            out.push(block);
        }
    }
    Ok(out)
}

fn parse_cert(der: &[u8]) -> Result<X509Certificate<'_>, Error> {
    X509Certificate::from_der(der)
        .map(|(_, cert)| cert)
        .map_err(|e| Error::config(format!("bad certificate: {e}")))
}

fn to_pem(block: &Pem) -> String {
    pem_encode("CERTIFICATE", &block.contents)
}

/// PEM with 64-column base64 lines.
pub(crate) fn pem_encode(label: &str, der: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut b64 = Vec::with_capacity(der.len().div_ceil(3) * 4);
    for chunk in der.chunks(3) {
        let b = [
            chunk.first().copied().unwrap_or(0),
            chunk.get(1).copied().unwrap_or(0),
            chunk.get(2).copied().unwrap_or(0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            if i <= chunk.len() {
                let index = ((n >> (18 - 6 * i)) & 63) as usize;
                b64.push(TABLE.get(index).copied().unwrap_or(b'='));
            } else {
                b64.push(b'=');
            }
        }
    }
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.chunks(64) {
        out.push_str(&String::from_utf8_lossy(line));
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// A positive 128-bit serial number, random.
pub(crate) fn random_serial() -> SerialNumber {
    let mut bytes: [u8; 16] = rand::random();
    // Positive and without a leading zero byte.
    bytes[0] = (bytes[0] & 0x7f) | 0x40;
    SerialNumber::from_slice(&bytes)
}

fn crypto(what: &str, e: rcgen::Error) -> Error {
    Error::config(format!("{what}: {e}"))
}

pub(crate) fn to_offset(t: SystemTime) -> OffsetDateTime {
    OffsetDateTime::from(t)
}

/// A certificate time (seconds since the epoch) as a `SystemTime`.
pub(crate) fn asn1_time(unix_seconds: i64) -> SystemTime {
    u64::try_from(unix_seconds)
        .ok()
        .and_then(|s| UNIX_EPOCH.checked_add(Duration::from_secs(s)))
        .unwrap_or(UNIX_EPOCH)
}

/// X.509 times have a resolution of one second.
pub(crate) fn truncate_to_seconds(t: SystemTime) -> SystemTime {
    let secs = t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    UNIX_EPOCH + Duration::from_secs(secs)
}

/// Writes `contents` to `path` through a temporary file and a rename, so a
/// crash leaves the old or the new file, never half of one. A private file
/// gets mode 0600 on Unix.
pub(crate) fn write_file(path: &Path, contents: &str, private: bool) -> Result<(), Error> {
    let tmp = path.with_extension("tmp");
    let io = |what: &str, e| Error::io(format!("cannot {what} {}", path.display()), e);
    let mut options = fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    if private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(&tmp).map_err(|e| io("write", e))?;
    file.write_all(contents.as_bytes())
        .and_then(|()| file.sync_all())
        .map_err(|e| io("write", e))?;
    fs::rename(&tmp, path).map_err(|e| io("replace", e))
}
