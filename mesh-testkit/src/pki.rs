//! The test PKI: rcgen CAs made in the test, leaf certificates (SPIFFE SVIDs, DNS or
//! IP names; current, expired or short-lived), CSRs, PEM files, and the rustls
//! configs of the test peers that use them.
//!
//! One definition, so every TLS test builds certificates the way mesh-control's CA
//! does (a SPIFFE URI SAN, server and client auth, an authority key identifier), and
//! a "foreign CA" is just another [`TestCa`].

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, RootCertStore, ServerConfig, SignatureScheme};
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The SPIFFE ID of the demo's `catalog` workload.
pub const CATALOG: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
/// The SPIFFE ID of the demo's `frontend` workload.
pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
/// The SPIFFE ID of the demo's `payment` workload.
pub const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";

/// A test CA (a self-signed root, or an intermediate of another [`TestCa`]).
pub struct TestCa {
    /// What signs: its parameters and key.
    pub issuer: Issuer<'static, KeyPair>,
    /// Its certificate (PEM): the trust bundle of its leaves.
    pub pem: String,
}

/// A PEM certificate chain and its key.
#[derive(Debug, Clone)]
pub struct Leaf {
    /// The certificate (PEM), then any intermediates.
    pub chain: String,
    /// The private key (PEM, PKCS#8).
    pub key: String,
}

/// When a leaf is valid.
#[derive(Debug, Clone, Copy)]
pub enum Validity {
    /// rcgen's default validity (decades).
    Current,
    /// 2020 to 2021.
    Expired,
    /// From a minute ago until this long from now.
    For(Duration),
}

/// A CA's parameters: `name` as the common name, certificate and CRL signing.
fn ca_params(name: &str) -> CertificateParams {
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    params.distinguished_name.push(DnType::CommonName, name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
    params
}

fn new_key() -> KeyPair {
    match KeyPair::generate() {
        Ok(key) => key,
        Err(e) => panic!("generating a key: {e}"),
    }
}

impl TestCa {
    /// A new root named `name`.
    pub fn new(name: &str) -> TestCa {
        let key = new_key();
        let params = ca_params(name);
        let cert = match params.self_signed(&key) {
            Ok(cert) => cert,
            Err(e) => panic!("self-signing the test CA {name}: {e}"),
        };
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// A new intermediate CA named `name`, signed by this one. Its [`TestCa::pem`] is
    /// its own certificate only: a chain is `intermediate.pem + root.pem`.
    pub fn intermediate(&self, name: &str) -> TestCa {
        let key = new_key();
        let params = ca_params(name);
        let cert = match params.signed_by(&key, &self.issuer) {
            Ok(cert) => cert,
            Err(e) => panic!("signing the intermediate CA {name}: {e}"),
        };
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// The CA's private key (PEM), for a signer that takes one from a file.
    pub fn key_pem(&self) -> String {
        self.issuer.key().serialize_pem()
    }

    /// Leaf parameters: `sans` (a SPIFFE ID, or DNS/IP names), server and client
    /// auth, valid as `validity` says.
    pub fn params(&self, sans: Vec<SanType>, validity: Validity) -> CertificateParams {
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.subject_alt_names = sans;
        params.is_ca = IsCa::ExplicitNoCa;
        params.extended_key_usages = vec![
            ExtendedKeyUsagePurpose::ServerAuth,
            ExtendedKeyUsagePurpose::ClientAuth,
        ];
        params.use_authority_key_identifier_extension = true;
        match validity {
            Validity::Current => {}
            Validity::Expired => {
                params.not_before = date_time_ymd(2020, 1, 1);
                params.not_after = date_time_ymd(2021, 1, 1);
            }
            Validity::For(lifetime) => {
                let now = time::OffsetDateTime::now_utc();
                let millis = i64::try_from(lifetime.as_millis()).unwrap_or(i64::MAX);
                params.not_before = now - time::Duration::minutes(1);
                params.not_after = now + time::Duration::milliseconds(millis);
            }
        }
        params
    }

    /// A leaf for `sans`, with a new key.
    pub fn issue(&self, sans: Vec<SanType>, validity: Validity) -> Leaf {
        let key = new_key();
        let cert = match self.params(sans, validity).signed_by(&key, &self.issuer) {
            Ok(cert) => cert,
            Err(e) => panic!("signing a test leaf: {e}"),
        };
        Leaf {
            chain: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    /// An SVID: a leaf for the SPIFFE ID (or any URI) `uri`, with a new key.
    pub fn leaf_with(&self, uri: &str, validity: Validity) -> Leaf {
        self.issue(vec![uri_san(uri)], validity)
    }

    /// A current SVID for `uri`.
    pub fn leaf(&self, uri: &str) -> Leaf {
        self.leaf_with(uri, Validity::Current)
    }

    /// A current leaf for the host `names`: IP addresses become IP SANs, anything
    /// else a DNS SAN (a non-mesh server, or a control server dialled by address).
    pub fn leaf_for(&self, names: &[&str]) -> Leaf {
        self.issue(
            names.iter().map(|n| host_san(n)).collect(),
            Validity::Current,
        )
    }
}

/// A URI SAN (a SPIFFE ID); panics when `uri` is not one rcgen takes.
pub fn uri_san(uri: &str) -> SanType {
    match uri.try_into() {
        Ok(uri) => SanType::URI(uri),
        Err(e) => panic!("{uri:?} as a URI SAN: {e}"),
    }
}

/// An IP SAN for an IP address, else a DNS SAN.
pub fn host_san(name: &str) -> SanType {
    if let Ok(ip) = name.parse::<IpAddr>() {
        return SanType::IpAddress(ip);
    }
    match name.try_into() {
        Ok(dns) => SanType::DnsName(dns),
        Err(e) => panic!("{name:?} as a DNS SAN: {e}"),
    }
}

impl Leaf {
    /// Writes the chain and the key into `dir` as `cert.pem` and `key.pem`; returns
    /// their paths (for a `file_watcher` provider or a DestinationRule's files).
    pub fn write(&self, dir: &Path) -> (PathBuf, PathBuf) {
        (
            write_pem(dir, "cert.pem", &self.chain),
            write_pem(dir, "key.pem", &self.key),
        )
    }
}

/// Writes `pem` to `dir/name` and returns the path; panics when it cannot.
pub fn write_pem(dir: &Path, name: &str, pem: &str) -> PathBuf {
    let path = dir.join(name);
    if let Err(e) = std::fs::write(&path, pem) {
        panic!("writing {}: {e}", path.display());
    }
    path
}

/// A CSR (PEM) with a new key (PEM), asking for the URI SAN `san` when given, as a
/// workload asks mesh-control's CA.
pub fn csr(san: Option<&str>) -> (String, String) {
    let key = new_key();
    let mut params = CertificateParams::default();
    params.distinguished_name = DistinguishedName::new();
    if let Some(san) = san {
        params.subject_alt_names = vec![uri_san(san)];
    }
    let csr = match params.serialize_request(&key).and_then(|csr| csr.pem()) {
        Ok(csr) => csr,
        Err(e) => panic!("a CSR: {e}"),
    };
    (csr, key.serialize_pem())
}

/// The certificates of a PEM chain; panics when it holds none.
pub fn certificates(pem: &str) -> Vec<CertificateDer<'static>> {
    let certs = match CertificateDer::pem_slice_iter(pem.as_bytes()).collect::<Result<Vec<_>, _>>()
    {
        Ok(certs) => certs,
        Err(e) => panic!("a PEM certificate chain: {e}"),
    };
    assert!(!certs.is_empty(), "no certificate in {pem:?}");
    certs
}

/// The URI SANs of the first certificate of a PEM chain (its SPIFFE ID).
pub fn uri_sans(pem: &str) -> Vec<String> {
    let der = certificates(pem).swap_remove(0);
    let cert = match X509Certificate::from_der(der.as_ref()) {
        Ok((_, cert)) => cert,
        Err(e) => panic!("parsing a certificate: {e}"),
    };
    let Ok(Some(san)) = cert.subject_alternative_name() else {
        return Vec::new();
    };
    san.value
        .general_names
        .iter()
        .filter_map(|n| match n {
            GeneralName::URI(u) => Some((*u).to_owned()),
            _ => None,
        })
        .collect()
}

/// ring, the provider of every test peer (as of the code under test).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The roots of a PEM bundle (one or several CAs); panics when it holds none.
pub fn roots(bundle: &str) -> RootCertStore {
    let mut roots = RootCertStore::empty();
    for cert in certificates(bundle) {
        if let Err(e) = roots.add(cert) {
            panic!("a bad root in the bundle: {e}");
        }
    }
    roots
}

fn key(leaf: &Leaf) -> PrivateKeyDer<'static> {
    match PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()) {
        Ok(key) => key,
        Err(e) => panic!("a leaf's key: {e}"),
    }
}

/// A server config presenting `leaf`; with `client_ca` (PEM), it requires a client
/// certificate of that CA. No ALPN: callers set it.
pub fn server_config(leaf: &Leaf, client_ca: Option<&str>) -> ServerConfig {
    let provider = provider();
    let builder = match ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder,
        Err(e) => panic!("rustls server config: {e}"),
    };
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(
                Arc::new(roots(ca)),
                provider,
            )
            .build();
            match verifier {
                Ok(verifier) => builder.with_client_cert_verifier(verifier),
                Err(e) => panic!("a client verifier: {e}"),
            }
        }
    };
    match builder.with_single_cert(certificates(&leaf.chain), key(leaf)) {
        Ok(config) => config,
        Err(e) => panic!("rustls server config with a test leaf: {e}"),
    }
}

/// A client config trusting the CAs of the PEM `bundle` and presenting `cert`, if
/// any. No ALPN: callers set it.
pub fn client_config(bundle: &str, cert: Option<&Leaf>) -> ClientConfig {
    let builder = match ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder.with_root_certificates(roots(bundle)),
        Err(e) => panic!("rustls client config: {e}"),
    };
    with_client_cert(builder, cert)
}

fn with_client_cert(
    builder: rustls::ConfigBuilder<ClientConfig, rustls::client::WantsClientCert>,
    cert: Option<&Leaf>,
) -> ClientConfig {
    match cert {
        Some(leaf) => match builder.with_client_auth_cert(certificates(&leaf.chain), key(leaf)) {
            Ok(config) => config,
            Err(e) => panic!("a client certificate: {e}"),
        },
        None => builder.with_no_client_auth(),
    }
}

/// The name test clients send (SNI) to servers that do not check it.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("catalog.shop.svc.cluster.local").expect("a DNS name")
}

/// A client config that trusts any server (the tests using it check the server's
/// own checks of the client) and presents `cert`, if any. No ALPN: callers set it.
pub fn trust_any_server(cert: Option<&Leaf>) -> ClientConfig {
    let provider = provider();
    let builder = match ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
    {
        Ok(builder) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider))),
        Err(e) => panic!("rustls client config: {e}"),
    };
    with_client_cert(builder, cert)
}

/// Accepts every server certificate; still checks handshake signatures.
#[derive(Debug)]
struct AnyServer(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use x509_parser::prelude::parse_x509_pem;

    use super::*;

    fn not_after(pem: &str) -> i64 {
        let (_, pem) = parse_x509_pem(pem.as_bytes()).unwrap();
        let cert = pem.parse_x509().unwrap();
        cert.validity().not_after.timestamp()
    }

    #[test]
    fn leaves_carry_their_names_and_validity() {
        let ca = TestCa::new("mesh root");
        assert_eq!(uri_sans(&ca.leaf(CATALOG).chain), [CATALOG]);
        assert_eq!(
            not_after(&ca.leaf_with(FRONTEND, Validity::Expired).chain),
            1_609_459_200, // 2021-01-01T00:00:00Z
        );
        let now = time::OffsetDateTime::now_utc().unix_timestamp();
        let short = not_after(
            &ca.leaf_with(PAYMENT, Validity::For(Duration::from_secs(60)))
                .chain,
        );
        assert!((now + 55..=now + 65).contains(&short), "{short} vs {now}");
        assert!(uri_sans(&ca.leaf_for(&["127.0.0.1", "api.example.com"]).chain).is_empty());
        let (request, _key) = csr(Some(PAYMENT));
        assert!(request.starts_with("-----BEGIN CERTIFICATE REQUEST-----"));
    }

    /// A handshake of `client` with a server presenting `leaf` (requiring a client
    /// certificate of `client_ca` when given) over an in-memory pipe.
    async fn handshake(
        leaf: &Leaf,
        client_ca: Option<&str>,
        client: ClientConfig,
    ) -> Result<(), String> {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(server_config(leaf, client_ca)));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(client));
        // Both ends stay open until both are done: the server still writes (session
        // tickets) after the client's side of the handshake completes.
        let (client, server) =
            tokio::join!(connector.connect(server_name(), a), acceptor.accept(b));
        match (client, server) {
            (Ok(_), Ok(_)) => Ok(()),
            (Err(e), _) | (_, Err(e)) => Err(e.to_string()),
        }
    }

    #[tokio::test]
    async fn configs_trust_their_ca_and_refuse_a_foreign_one() {
        let ca = TestCa::new("mesh root");
        let foreign = TestCa::new("another root");
        let server = ca.leaf_for(&["catalog.shop.svc.cluster.local"]);
        handshake(&server, None, client_config(&ca.pem, None))
            .await
            .unwrap();
        assert!(
            handshake(&server, None, client_config(&foreign.pem, None))
                .await
                .is_err()
        );
        // mTLS: a client certificate of the right CA, then of a foreign one.
        let trusting = trust_any_server(Some(&ca.leaf(FRONTEND)));
        handshake(&server, Some(&ca.pem), trusting).await.unwrap();
        let foreign_client = trust_any_server(Some(&foreign.leaf(FRONTEND)));
        assert!(
            handshake(&server, Some(&ca.pem), foreign_client)
                .await
                .is_err()
        );
        // An intermediate's leaves verify against the root with the chain sent.
        let intermediate = ca.intermediate("issuing");
        let mut leaf = intermediate.leaf_for(&["catalog.shop.svc.cluster.local"]);
        leaf.chain.push_str(&intermediate.pem);
        handshake(&leaf, None, client_config(&ca.pem, None))
            .await
            .unwrap();
        assert!(intermediate.key_pem().contains("PRIVATE KEY"));
    }
}
