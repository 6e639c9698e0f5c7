//! rustls client and server configs over a [`CertStore`].

use std::sync::Arc;

use rustls::client::Resumption;
use rustls::pki_types::ServerName;
use rustls::server::NoServerSessionStorage;
use rustls::{ClientConfig, ServerConfig};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::identity::{PeerIdentity, ServerIdentities, spiffe_id_of};
use super::store::{CertStore, tls};
use super::verify::{MeshClientVerifier, MeshServerVerifier};
use crate::error::Error;

/// A client config presenting the store's certificate and accepting servers
/// whose identity `identities` allows (see the [module docs](super)).
/// Stays valid across rotations: it reads the store on every handshake.
pub fn client_config(
    store: &CertStore,
    identities: ServerIdentities,
    alpn: &[&[u8]],
) -> Result<Arc<ClientConfig>, Error> {
    let verifier = MeshServerVerifier {
        store: store.clone(),
        identities,
    };
    let mut config = ClientConfig::builder_with_provider(store.crypto().clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(format!("TLS client config: {e}")))?
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(verifier))
        .with_client_cert_resolver(Arc::new(store.clone()));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.resumption = Resumption::disabled();
    Ok(Arc::new(config))
}

/// A server config presenting the store's certificate and verifying client
/// certificates against its bundle: required when `require_client_cert`
/// (STRICT), optional otherwise (PERMISSIVE over TLS). Prefer
/// [`MeshAcceptor`](super::MeshAcceptor), which builds this.
pub fn server_config(
    store: &CertStore,
    require_client_cert: bool,
    alpn: &[&[u8]],
) -> Result<Arc<ServerConfig>, Error> {
    let verifier = MeshClientVerifier {
        store: store.clone(),
        mandatory: require_client_cert,
    };
    let mut config = ServerConfig::builder_with_provider(store.crypto().clone())
        .with_safe_default_protocol_versions()
        .map_err(|e| tls(format!("TLS server config: {e}")))?
        .with_client_cert_verifier(Arc::new(verifier))
        .with_cert_resolver(Arc::new(store.clone()));
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    config.session_storage = Arc::new(NoServerSessionStorage {});
    config.send_tls13_tickets = 0;
    Ok(Arc::new(config))
}

/// Opens mTLS connections to the servers of one cluster: the piece the
/// connection pool holds per (cluster identities, protocol).
#[derive(Clone)]
pub struct MeshConnector {
    connector: TlsConnector,
}

impl MeshConnector {
    /// A connector for servers `identities` allows.
    pub fn new(
        store: &CertStore,
        identities: ServerIdentities,
        alpn: &[&[u8]],
    ) -> Result<Self, Error> {
        Ok(MeshConnector {
            connector: TlsConnector::from(client_config(store, identities, alpn)?),
        })
    }

    /// Runs the TLS handshake over `io`. `server_name` goes into SNI (a DNS
    /// name; an IP address sends none); it is not what is verified: the
    /// server's SPIFFE ID is. Returns the stream and the server's identity.
    pub async fn connect<IO>(
        &self,
        server_name: &str,
        io: IO,
    ) -> Result<(TlsStream<IO>, PeerIdentity), Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = ServerName::try_from(server_name.to_owned()).map_err(|e| {
            tls(format!(
                "{server_name:?} is not a DNS name or IP address: {e}"
            ))
        })?;
        let stream =
            self.connector.connect(name, io).await.map_err(|e| {
                tls(format!("TLS handshake with {server_name} failed")).with_source(e)
            })?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .ok_or_else(|| tls(format!("{server_name} sent no certificate")))
            .and_then(|leaf| {
                spiffe_id_of(leaf)
                    .map(|id| PeerIdentity::of_certificate(id, leaf))
                    .map_err(|e| tls(format!("{server_name}: {e}")))
            })?;
        Ok((stream, peer))
    }
}

impl std::fmt::Debug for MeshConnector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MeshConnector").finish_non_exhaustive()
    }
}
