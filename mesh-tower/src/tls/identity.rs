//! Identities in certificates: the SPIFFE ID of an X.509-SVID, the
//! identities a cluster may have, the identity of a connection's peer.

use std::collections::BTreeSet;
use std::fmt;
use std::sync::Arc;

use mesh_core::spiffe::SpiffeId;
use rustls::pki_types::CertificateDer;
use x509_parser::extensions::{GeneralName, ParsedExtension};
use x509_parser::prelude::{FromDer, X509Certificate};

/// The SPIFFE ID of an X.509-SVID: its one URI subject alternative name
/// (the X509-SVID standard allows exactly one). The message says what is
/// wrong otherwise.
pub fn spiffe_id_of(cert: &CertificateDer<'_>) -> Result<SpiffeId, String> {
    let (_, cert) = X509Certificate::from_der(cert)
        .map_err(|e| format!("the certificate does not parse: {e}"))?;
    let mut uris = Vec::new();
    for ext in cert.extensions() {
        if let ParsedExtension::SubjectAlternativeName(san) = ext.parsed_extension() {
            for name in &san.general_names {
                if let GeneralName::URI(uri) = name {
                    uris.push(*uri);
                }
            }
        }
    }
    match uris.as_slice() {
        [uri] => SpiffeId::parse(uri).map_err(|e| e.to_string()),
        [] => Err("the certificate has no URI SAN (no SPIFFE ID)".into()),
        _ => Err(format!(
            "the certificate has {} URI SANs; an X.509-SVID has exactly one",
            uris.len()
        )),
    }
}

/// The identity a peer proved with its certificate on this connection: a
/// request extension set by `serve` on mTLS connections (absent on
/// plaintext ones and on TLS connections without a client certificate).
/// One shared allocation per connection: every request's extension is a
/// pointer copy.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct PeerIdentity(Arc<(SpiffeId, Option<Arc<str>>)>);

impl PeerIdentity {
    /// Wraps a verified identity.
    pub fn new(id: SpiffeId) -> Self {
        PeerIdentity(Arc::new((id, None)))
    }

    /// The identity of a verified leaf certificate, with its serial number:
    /// what a handshake yields.
    pub fn of_certificate(id: SpiffeId, leaf: &CertificateDer<'_>) -> Self {
        PeerIdentity(Arc::new((id, serial_of(leaf).map(Arc::from))))
    }

    /// The peer's SPIFFE ID.
    pub fn spiffe_id(&self) -> &SpiffeId {
        &self.0.0
    }

    /// The serial number (lowercase hex, as [`CertStore::serial`]
    /// (super::CertStore::serial) prints it) of the certificate the peer
    /// presented on this connection: which of its rotating certificates
    /// it used. `None` when built with [`PeerIdentity::new`].
    pub fn serial(&self) -> Option<&str> {
        self.0.1.as_deref()
    }
}

/// The serial number of a certificate, lowercase hex.
pub(crate) fn serial_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = X509Certificate::from_der(cert).ok()?;
    Some(
        parsed
            .raw_serial()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect(),
    )
}

impl fmt::Debug for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PeerIdentity({})", self.0.0)
    }
}

impl fmt::Display for PeerIdentity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(&self.0.0, f)
    }
}

/// The identities a server of a cluster may present (from CDS: the
/// UpstreamTlsContext's SAN matchers, Istio's service accounts of the
/// service). Empty means any identity of the mesh's trust domain.
#[derive(Clone, Default, PartialEq, Eq, Hash)]
pub struct ServerIdentities(Arc<BTreeSet<SpiffeId>>);

impl ServerIdentities {
    /// Any identity of the trust domain.
    pub fn any() -> Self {
        ServerIdentities::default()
    }

    /// Exactly these identities (none given: any identity of the trust domain).
    pub fn new(ids: impl IntoIterator<Item = SpiffeId>) -> Self {
        ServerIdentities(Arc::new(ids.into_iter().collect()))
    }

    /// Whether `id` may serve (the trust domain is checked separately).
    pub fn allows(&self, id: &SpiffeId) -> bool {
        self.0.is_empty() || self.0.contains(id)
    }

    /// The identities, empty for "any".
    pub fn iter(&self) -> impl Iterator<Item = &SpiffeId> {
        self.0.iter()
    }

    /// How many identities (0 for "any").
    pub(crate) fn len(&self) -> usize {
        self.0.len()
    }
}

impl fmt::Debug for ServerIdentities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("ServerIdentities(any)");
        }
        f.debug_set()
            .entries(self.0.iter().map(|id| id.as_str()))
            .finish()
    }
}
