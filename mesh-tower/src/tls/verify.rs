//! Certificate verifiers that check the chain against the store's current
//! trust bundle and the SPIFFE ID in the leaf.

use std::fmt;
use std::sync::Arc;

use mesh_core::spiffe::SpiffeId;
use rustls::client::danger::{ServerCertVerified, ServerCertVerifier};
use rustls::client::verify_server_cert_signed_by_trust_anchor;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::server::ParsedCertificate;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DistinguishedName, OtherError};

use super::identity::{ServerIdentities, spiffe_id_of};
use super::store::CertStore;

/// The handshake-signature methods of a rustls `ServerCertVerifier` or
/// `ClientCertVerifier` (`verify_tls12_signature`, `verify_tls13_signature`,
/// `supported_verify_schemes`), checked with the signature algorithms of
/// the `CryptoProvider` that `$provider` gives (an expression in `$self`,
/// written `self` by the caller).
macro_rules! signature_checks_by {
    ($self:ident => $provider:expr) => {
        // rustls's functions have the names of the trait's methods.
        signature_checks_by!(
            @verify $self => $provider; verify_tls12_signature verify_tls13_signature
        );

        fn supported_verify_schemes(&$self) -> Vec<::rustls::SignatureScheme> {
            $provider.signature_verification_algorithms.supported_schemes()
        }
    };
    (@verify $self:ident => $provider:expr; $($verify:ident)*) => {$(
        fn $verify(
            &$self,
            message: &[u8],
            cert: &::rustls::pki_types::CertificateDer<'_>,
            dss: &::rustls::DigitallySignedStruct,
        ) -> Result<::rustls::client::danger::HandshakeSignatureValid, ::rustls::Error> {
            ::rustls::crypto::$verify(
                message,
                cert,
                dss,
                &$provider.signature_verification_algorithms,
            )
        }
    )*};
}
pub(super) use signature_checks_by;

/// A certificate error carrying our message (shown in handshake errors).
pub(super) fn rejected(message: String) -> rustls::Error {
    struct Rejected(String);
    // rustls prints the error with `Debug`: keep the message readable.
    impl fmt::Debug for Rejected {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl fmt::Display for Rejected {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }
    impl std::error::Error for Rejected {}
    rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Rejected(
        message,
    )))))
}

/// The peer's SPIFFE ID, which must be of `trust_domain`.
fn mesh_identity(
    cert: &CertificateDer<'_>,
    own: &SpiffeId,
    who: &str,
) -> Result<SpiffeId, rustls::Error> {
    let id = spiffe_id_of(cert).map_err(|e| rejected(format!("{who} certificate: {e}")))?;
    if id.trust_domain() != own.trust_domain() {
        return Err(rejected(format!(
            "{who} identity {id} is not in the trust domain {}",
            own.trust_domain()
        )));
    }
    Ok(id)
}

/// The client's check of a server: chain, `serverAuth`, trust domain, and
/// the identities the cluster may have.
pub(crate) struct MeshServerVerifier {
    pub(crate) store: CertStore,
    pub(crate) identities: ServerIdentities,
}

impl ServerCertVerifier for MeshServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let material = self.store.material();
        let parsed = ParsedCertificate::try_from(end_entity)?;
        verify_server_cert_signed_by_trust_anchor(
            &parsed,
            &material.roots,
            intermediates,
            now,
            self.store.crypto().signature_verification_algorithms.all,
        )?;
        let id = mesh_identity(end_entity, &material.identity, "the server")?;
        if !self.identities.allows(&id) {
            return Err(rejected(format!(
                "the server identity {id} is not one of the cluster's: {:?}",
                self.identities
            )));
        }
        Ok(ServerCertVerified::assertion())
    }

    signature_checks_by!(self => self.store.crypto());
}

impl fmt::Debug for MeshServerVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshServerVerifier")
            .field("identities", &self.identities)
            .finish()
    }
}

/// The server's check of a client: chain, `clientAuth`, trust domain.
/// `mandatory`: STRICT (a certificate is required) or PERMISSIVE (asked
/// for, but a TLS client without one is let through, unauthenticated).
pub(crate) struct MeshClientVerifier {
    pub(crate) store: CertStore,
    pub(crate) mandatory: bool,
}

impl ClientCertVerifier for MeshClientVerifier {
    fn offer_client_auth(&self) -> bool {
        true
    }

    fn client_auth_mandatory(&self) -> bool {
        self.mandatory
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        // No hints: the bundle changes at runtime, and mesh clients have
        // one certificate to offer anyway.
        &[]
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        let material = self.store.material();
        material
            .client_chain_verifier
            .verify_client_cert(end_entity, intermediates, now)?;
        mesh_identity(end_entity, &material.identity, "the client")?;
        Ok(ClientCertVerified::assertion())
    }

    signature_checks_by!(self => self.store.crypto());
}

impl fmt::Debug for MeshClientVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshClientVerifier")
            .field("mandatory", &self.mandatory)
            .finish()
    }
}
