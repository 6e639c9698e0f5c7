//! The one error type of mesh-tower.
//!
//! A request the mesh cannot route fails with an [`Error`] (an `Err` from the
//! service), never with a synthesized `503` response: the caller can tell
//! "the mesh has no such service" from "the service answered 503", and tonic
//! turns the error into a `Status` whose message is this error's message.
//! (What the mesh decides about a request it could send, such as a breaker
//! overflow or a timeout, is a response instead: see [`crate::mesh`].)

use std::fmt;

/// A boxed error, as tower and hyper use.
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// Why a request could not be sent, or why serving failed.
///
/// Opaque by design (hyper's style): match on [`Error::kind`]. `Display`
/// prints the message, which names the target, route, cluster or endpoint
/// involved, followed by the underlying cause when there is one (also
/// available through [`std::error::Error::source`]).
///
/// `Debug` is written for people, as anyhow's is, because `Debug` is what
/// Rust prints when `main` returns an error (`Error: {err:?}`): the message
/// with its real line breaks, then each underlying cause on a `Caused by:`
/// line. `{:#?}` prints the fields (kind, message, source) for debugging
/// the error itself, as anyhow's `{:#?}` does.
///
/// An [`mesh_xds_client::Error`] converts into it (`?` works on
/// `Bootstrap::from_env()` in a function returning this error), keeping its
/// message; its kind maps to [`ErrorKind::Bootstrap`],
/// [`ErrorKind::NotFound`] or [`ErrorKind::Discovery`].
pub struct Error {
    inner: Box<Inner>,
}

struct Inner {
    kind: ErrorKind,
    message: String,
    source: Option<BoxError>,
}

/// What kind of problem an [`Error`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The request itself cannot be routed: no authority (neither in the URI
    /// nor in a `Host` header), or a malformed one.
    InvalidRequest,
    /// The mesh has no service by the requested name: the control server
    /// said the listener does not exist.
    NotFound,
    /// The service exists but nothing routes this request: no virtual host
    /// or route matches, or the config names a cluster that was not received.
    NoRoute,
    /// The request was routed to a cluster that has no endpoints.
    NoEndpoints,
    /// The configuration for the target did not arrive in time.
    Timeout,
    /// The configuration source failed while waiting for the target.
    Discovery,
    /// The endpoint could not be connected to (refused, unreachable, timed out).
    Connect,
    /// The request failed on an established connection to the endpoint.
    Upstream,
    /// A circuit breaker refused the request (a connection pool's
    /// `http1MaxPendingRequests`). The mesh client answers such requests
    /// with a `503` response; this kind reaches callers of a bare
    /// [`Pool`](crate::Pool).
    Overflow,
    /// The mesh-control admin API refused or failed a registration call.
    Registration,
    /// Serving failed (the listener, the local address).
    Io,
    /// mTLS: certificates or keys that cannot be used (unreadable files,
    /// bad PEM, no SPIFFE identity), or a failed TLS handshake.
    Tls,
    /// The xDS bootstrap is absent, unreadable or malformed (from
    /// [`mesh_xds_client::Error`]; the message names both environment
    /// variables and shows a bootstrap to start from).
    Bootstrap,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            inner: Box::new(Inner {
                kind,
                message: message.into(),
                source: None,
            }),
        }
    }

    pub(crate) fn with_source(mut self, source: impl Into<BoxError>) -> Self {
        self.inner.source = Some(source.into());
        self
    }

    /// Prefixes the message with where the problem happened.
    pub(crate) fn with_context(mut self, what: impl fmt::Display) -> Self {
        self.inner.message = format!("{what}: {}", self.inner.message);
        self
    }

    /// The kind of problem.
    pub fn kind(&self) -> ErrorKind {
        self.inner.kind
    }

    /// The message, without the underlying cause.
    pub fn message(&self) -> &str {
        &self.inner.message
    }

    /// Whether this is a timeout (configuration wait or connect timeout).
    pub fn is_timeout(&self) -> bool {
        if self.inner.kind == ErrorKind::Timeout {
            return true;
        }
        let mut source = self
            .inner
            .source
            .as_deref()
            .map(|e| e as &dyn std::error::Error);
        while let Some(e) = source {
            if let Some(io) = e.downcast_ref::<std::io::Error>()
                && io.kind() == std::io::ErrorKind::TimedOut
            {
                return true;
            }
            if e.is::<tokio::time::error::Elapsed>() {
                return true;
            }
            source = e.source();
        }
        false
    }

    /// Turns any boxed error into an `Error`: a boxed `Error` is unboxed as
    /// is, anything else becomes the source of a new error.
    pub(crate) fn from_boxed(e: BoxError, kind: ErrorKind, message: impl fmt::Display) -> Self {
        match e.downcast::<Error>() {
            Ok(e) => *e,
            Err(e) => Error::new(kind, message.to_string()).with_source(e),
        }
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.inner.message)?;
        if let Some(source) = &self.inner.source {
            write!(f, ": {source}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            let mut d = f.debug_struct("Error");
            d.field("kind", &self.inner.kind)
                .field("message", &self.inner.message);
            if let Some(source) = &self.inner.source {
                d.field("source", source);
            }
            return d.finish();
        }
        f.write_str(&self.inner.message)?;
        write_causes(f, std::error::Error::source(self))
    }
}

/// anyhow's layout of the causes of an error under its message: a blank
/// line, `Caused by:`, then each cause indented by four spaces (numbered
/// `    0: ` when there are several), its own line breaks kept and indented.
/// A cause that is itself an [`Error`] prints its message alone: its own
/// cause follows on the next line rather than twice.
fn write_causes(
    f: &mut fmt::Formatter<'_>,
    first: Option<&(dyn std::error::Error + 'static)>,
) -> fmt::Result {
    let Some(first) = first else { return Ok(()) };
    f.write_str("\n\nCaused by:")?;
    let numbered = first.source().is_some();
    let mut cause = Some(first);
    let mut n = 0;
    while let Some(e) = cause {
        let text = match e.downcast_ref::<Error>() {
            Some(ours) => ours.inner.message.clone(),
            None => e.to_string(),
        };
        for (i, line) in text.split('\n').enumerate() {
            match (i, numbered) {
                (0, true) => write!(f, "\n{n: >5}: {line}")?,
                (0, false) => write!(f, "\n    {line}")?,
                (_, true) => write!(f, "\n       {line}")?,
                (_, false) => write!(f, "\n    {line}")?,
            }
        }
        cause = e.source();
        n += 1;
    }
    Ok(())
}

impl From<mesh_xds_client::Error> for Error {
    /// Keeps the message (which says what to do about it); the source is
    /// not kept, as it would only repeat the message.
    fn from(e: mesh_xds_client::Error) -> Self {
        let kind = match e.kind() {
            mesh_xds_client::ErrorKind::Bootstrap => ErrorKind::Bootstrap,
            mesh_xds_client::ErrorKind::NotFound => ErrorKind::NotFound,
            _ => ErrorKind::Discovery,
        };
        Error::new(kind, e.message())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.inner
            .source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_names_the_cause_and_source_is_kept() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::new(ErrorKind::Connect, "cannot connect to 127.0.0.1:1").with_source(io);
        assert_eq!(e.to_string(), "cannot connect to 127.0.0.1:1: refused");
        assert_eq!(e.message(), "cannot connect to 127.0.0.1:1");
        assert!(std::error::Error::source(&e).is_some());
        assert_eq!(e.kind(), ErrorKind::Connect);
        assert!(!e.is_timeout());
    }

    #[test]
    fn boxed_errors_are_unboxed() {
        let boxed: BoxError = Box::new(Error::new(ErrorKind::NoRoute, "x"));
        let e = Error::from_boxed(boxed, ErrorKind::Upstream, "y");
        assert_eq!(e.kind(), ErrorKind::NoRoute);
        let other: BoxError = "plain".into();
        let e = Error::from_boxed(other, ErrorKind::Upstream, "y");
        assert_eq!(e.kind(), ErrorKind::Upstream);
        assert_eq!(e.to_string(), "y: plain");
    }

    /// What `fn main() -> Result<(), Error>` prints after `Error: `.
    #[test]
    fn debug_reads_like_anyhow_with_real_line_breaks() {
        let e = Error::new(ErrorKind::Bootstrap, "no bootstrap\n{\n  \"a\": 1\n}");
        assert_eq!(format!("{e:?}"), "no bootstrap\n{\n  \"a\": 1\n}");

        let io = std::io::Error::new(std::io::ErrorKind::ConnectionRefused, "refused");
        let e = Error::new(ErrorKind::Connect, "cannot connect to 127.0.0.1:1").with_source(io);
        assert_eq!(
            format!("{e:?}"),
            "cannot connect to 127.0.0.1:1\n\nCaused by:\n    refused"
        );

        // Several causes are numbered; a cause's own lines stay aligned.
        let inner = Error::new(ErrorKind::Tls, "handshake\nfailed")
            .with_source(std::io::Error::other("eof"));
        let e = Error::new(ErrorKind::Connect, "outer").with_source(inner);
        assert_eq!(
            format!("{e:?}"),
            "outer\n\nCaused by:\n    0: handshake\n       failed\n    1: eof"
        );
        // `{:#?}` shows the fields, for debugging the error itself.
        let alt = format!("{e:#?}");
        assert!(alt.starts_with("Error {\n    kind: Connect,"), "{alt}");
    }

    #[test]
    fn xds_client_errors_convert_with_their_message_and_kind() {
        let missing = mesh_xds_client::Bootstrap::from_lookup(|_| None).unwrap_err();
        let e = Error::from(missing.clone());
        assert_eq!(e.kind(), ErrorKind::Bootstrap);
        assert_eq!(e.to_string(), missing.to_string());
        assert!(std::error::Error::source(&e).is_none());
    }

    #[test]
    fn timeouts_are_found_in_the_chain() {
        let io = std::io::Error::new(std::io::ErrorKind::TimedOut, "slow");
        assert!(
            Error::new(ErrorKind::Connect, "c")
                .with_source(io)
                .is_timeout()
        );
        assert!(Error::new(ErrorKind::Timeout, "t").is_timeout());
    }
}
