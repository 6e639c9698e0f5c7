//! Accepting connections under a PeerAuthentication mode.

use std::fmt;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;

use super::config::server_config;
use super::identity::{PeerIdentity, spiffe_id_of};
use super::store::{CertStore, tls};
use crate::error::{Error, ErrorKind};
pub use mesh_core::model::MtlsMode;

/// The first byte of a TLS handshake record (content type 22).
const TLS_HANDSHAKE: u8 = 0x16;

/// Accepts connections under an [`MtlsMode`]: TLS handshake, plaintext, or
/// (PERMISSIVE) whichever the client's first byte says. Cheap to clone.
///
/// Run [`MeshAcceptor::accept`] under a handshake timeout: a client that
/// sends nothing keeps it waiting.
#[derive(Clone)]
pub struct MeshAcceptor {
    mode: MtlsMode,
    tls: Option<TlsAcceptor>,
}

impl MeshAcceptor {
    /// STRICT: mTLS with a client certificate of the trust domain.
    pub fn strict(store: &CertStore, alpn: &[&[u8]]) -> Result<Self, Error> {
        Ok(MeshAcceptor {
            mode: MtlsMode::Strict,
            tls: Some(TlsAcceptor::from(server_config(store, true, alpn)?)),
        })
    }

    /// PERMISSIVE: mTLS or plaintext on one port.
    pub fn permissive(store: &CertStore, alpn: &[&[u8]]) -> Result<Self, Error> {
        Ok(MeshAcceptor {
            mode: MtlsMode::Permissive,
            tls: Some(TlsAcceptor::from(server_config(store, false, alpn)?)),
        })
    }

    /// DISABLE: plaintext only (a TLS client fails).
    pub fn disable() -> Self {
        MeshAcceptor {
            mode: MtlsMode::Disable,
            tls: None,
        }
    }

    /// An acceptor for `mode`; `store` is needed unless the mode is DISABLE.
    pub fn new(mode: MtlsMode, store: Option<&CertStore>, alpn: &[&[u8]]) -> Result<Self, Error> {
        match (mode, store) {
            (MtlsMode::Disable, _) => Ok(MeshAcceptor::disable()),
            (MtlsMode::Strict, Some(store)) => MeshAcceptor::strict(store, alpn),
            (MtlsMode::Permissive, Some(store)) => MeshAcceptor::permissive(store, alpn),
            (mode, None) => Err(tls(format!(
                "mTLS mode {mode} needs a workload certificate: configure a certificate \
                 provider (the bootstrap's certificate_providers, or the mesh CA)"
            ))),
        }
    }

    /// The mode.
    pub fn mode(&self) -> MtlsMode {
        self.mode
    }

    /// Accepts one connection: after a TLS handshake, the stream and the
    /// client's verified identity (if it sent a certificate). Errors name
    /// why (a failed handshake, plaintext under STRICT, a client gone).
    pub async fn accept<IO>(&self, mut io: IO) -> Result<MeshStream<IO>, Error>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let (tls, first) = match (&self.tls, self.mode) {
            (Some(tls), MtlsMode::Strict) => (Some(tls), None),
            (Some(tls), MtlsMode::Permissive) => {
                let first = io.read_u8().await.map_err(|e| {
                    Error::new(
                        ErrorKind::Io,
                        "the client closed the connection before sending",
                    )
                    .with_source(e)
                })?;
                ((first == TLS_HANDSHAKE).then_some(tls), Some(first))
            }
            _ => (None, None),
        };
        let io = Rewind { first, inner: io };
        let Some(tls) = tls else {
            return Ok(MeshStream {
                inner: Inner::Plain(io),
                peer: None,
            });
        };
        let stream = tls.accept(io).await.map_err(|e| tls_error(self.mode, e))?;
        let peer = stream
            .get_ref()
            .1
            .peer_certificates()
            .and_then(|certs| certs.first())
            .map(|leaf| spiffe_id_of(leaf).map(|id| PeerIdentity::of_certificate(id, leaf)))
            .transpose()
            .map_err(|e| Error::new(ErrorKind::Tls, format!("the client certificate: {e}")))?;
        Ok(MeshStream {
            inner: Inner::Tls(Box::new(stream)),
            peer,
        })
    }
}

fn tls_error(mode: MtlsMode, e: io::Error) -> Error {
    let hint = match (
        mode,
        e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>()),
    ) {
        (MtlsMode::Strict, Some(rustls::Error::InvalidMessage(_))) => {
            " (is the client speaking plaintext to a STRICT port?)"
        }
        (_, Some(rustls::Error::NoCertificatesPresented)) => {
            " (the client sent no certificate; STRICT requires one)"
        }
        _ => "",
    };
    Error::new(ErrorKind::Tls, format!("TLS handshake failed{hint}")).with_source(e)
}

impl fmt::Debug for MeshAcceptor {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshAcceptor")
            .field("mode", &self.mode)
            .finish()
    }
}

/// An accepted connection: TLS or plaintext, with the client's identity.
pub struct MeshStream<IO> {
    inner: Inner<IO>,
    peer: Option<PeerIdentity>,
}

enum Inner<IO> {
    Plain(Rewind<IO>),
    Tls(Box<TlsStream<Rewind<IO>>>),
}

impl<IO> MeshStream<IO> {
    /// The client's verified identity; `None` for plaintext and for TLS
    /// clients without a certificate (PERMISSIVE).
    pub fn peer_identity(&self) -> Option<&PeerIdentity> {
        self.peer.as_ref()
    }

    /// The client's certificate (leaf), when it sent one over TLS: for
    /// logs and audits (its serial, its expiry).
    pub fn peer_certificate(&self) -> Option<&rustls::pki_types::CertificateDer<'static>> {
        match &self.inner {
            Inner::Tls(s) => s.get_ref().1.peer_certificates()?.first(),
            Inner::Plain(_) => None,
        }
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self.inner, Inner::Tls(_))
    }

    /// The ALPN protocol agreed on (`h2`, `http/1.1`), if any.
    pub fn alpn_protocol(&self) -> Option<&[u8]> {
        match &self.inner {
            Inner::Tls(s) => s.get_ref().1.alpn_protocol(),
            Inner::Plain(_) => None,
        }
    }
}

impl<IO> fmt::Debug for MeshStream<IO> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MeshStream")
            .field("tls", &self.is_tls())
            .field("peer", &self.peer)
            .finish()
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncRead for MeshStream<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl<IO: AsyncRead + AsyncWrite + Unpin> AsyncWrite for MeshStream<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.inner {
            Inner::Plain(s) => s.inner.is_write_vectored(),
            Inner::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_flush(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().inner {
            Inner::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Inner::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// A stream that gives back the byte read to detect TLS before the rest.
struct Rewind<IO> {
    first: Option<u8>,
    inner: IO,
}

impl<IO: AsyncRead + Unpin> AsyncRead for Rewind<IO> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        if buf.remaining() > 0
            && let Some(byte) = this.first.take()
        {
            buf.put_slice(&[byte]);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.inner).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Rewind<IO> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}
