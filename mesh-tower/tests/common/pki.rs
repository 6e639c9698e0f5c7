//! The test PKI of the TLS tests: rcgen CAs made in the test, SPIFFE leaf
//! certificates, and a client that trusts any server (to test a server's
//! checks alone). One definition, so every TLS test builds certificates the
//! way mesh-control's CA does (SPIFFE URI SAN, server+client auth).

use std::sync::Arc;
use std::time::Duration;

use mesh_tower::tls::{CertStore, Credentials};
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType, date_time_ymd,
};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};

pub const CATALOG: &str = "spiffe://cluster.local/ns/shop/sa/catalog";
pub const FRONTEND: &str = "spiffe://cluster.local/ns/shop/sa/frontend";
pub const PAYMENT: &str = "spiffe://cluster.local/ns/shop/sa/payment";

/// A test CA (a self-signed root).
pub struct TestCa {
    pub issuer: Issuer<'static, KeyPair>,
    pub pem: String,
}

/// A PEM certificate chain and key.
#[derive(Clone)]
pub struct Leaf {
    pub chain: String,
    pub key: String,
}

/// When a leaf is valid.
#[derive(Clone, Copy)]
pub enum Validity {
    /// rcgen's default validity (decades).
    Current,
    /// 2020 to 2021.
    Expired,
    /// From a minute ago until this long from now.
    For(Duration),
}

impl TestCa {
    pub fn new(name: &str) -> TestCa {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.distinguished_name = DistinguishedName::new();
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let cert = params.self_signed(&key).unwrap();
        TestCa {
            issuer: Issuer::new(params, key),
            pem: cert.pem(),
        }
    }

    /// Leaf parameters: `sans` (a SPIFFE ID, or DNS/IP names), server and
    /// client auth, valid as `validity` says.
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
                params.not_before = now - time::Duration::minutes(1);
                params.not_after = now
                    + time::Duration::milliseconds(i64::try_from(lifetime.as_millis()).unwrap());
            }
        }
        params
    }

    /// A leaf for the SPIFFE ID (or any URI) `uri`, with a new key.
    pub fn leaf_with(&self, uri: &str, validity: Validity) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let cert = self
            .params(vec![SanType::URI(uri.try_into().unwrap())], validity)
            .signed_by(&key, &self.issuer)
            .unwrap();
        Leaf {
            chain: cert.pem(),
            key: key.serialize_pem(),
        }
    }

    pub fn leaf(&self, uri: &str) -> Leaf {
        self.leaf_with(uri, Validity::Current)
    }

    /// `leaf` with this CA's root as the trust bundle.
    pub fn credentials(&self, leaf: &Leaf) -> Credentials {
        leaf.credentials(&self.pem)
    }

    /// A store holding a current leaf for `uri`.
    pub fn store(&self, uri: &str) -> CertStore {
        CertStore::new(self.credentials(&self.leaf(uri))).unwrap()
    }
}

impl Leaf {
    /// This leaf with the PEM trust bundle `bundle` (one root or several).
    pub fn credentials(&self, bundle: &str) -> Credentials {
        Credentials::from_pem(
            self.chain.as_bytes(),
            self.key.as_bytes(),
            bundle.as_bytes(),
        )
        .unwrap()
    }
}

/// The name test clients send (SNI): the servers under test do not check it.
pub fn server_name() -> ServerName<'static> {
    ServerName::try_from("catalog.shop.svc.cluster.local").unwrap()
}

/// A client TLS config that trusts any server (the tests using it check the
/// server) and presents `cert`, if any. No ALPN: callers set it.
pub fn trust_any_server(cert: Option<&Leaf>) -> ClientConfig {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .unwrap()
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyServer(provider)));
    match cert {
        Some(leaf) => builder
            .with_client_auth_cert(
                CertificateDer::pem_slice_iter(leaf.chain.as_bytes())
                    .collect::<Result<_, _>>()
                    .unwrap(),
                PrivateKeyDer::from_pem_slice(leaf.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    }
}

/// Accepts every server certificate; still checks handshake signatures.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

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
