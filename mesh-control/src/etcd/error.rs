//! The one error type of the etcd client, and how gRPC statuses map to it.

use std::fmt;

use tonic::{Code, Status};

/// Why an etcd call failed.
///
/// The message names the endpoint (or every endpoint tried) and says what to
/// do; [`Error::kind`] is what code branches on. `Debug` prints the message,
/// as `Display` does, so `main` returning it reads well; `{:#?}` prints the
/// fields.
pub struct Error {
    kind: ErrorKind,
    message: String,
    endpoint: Option<String>,
    compact_revision: Option<i64>,
}

/// What kind of problem an [`Error`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad client settings: no endpoints, an endpoint that is not a URL,
    /// an `https` endpoint without TLS settings.
    Config,
    /// No endpoint answered: etcd is down or unreachable, has no leader, or
    /// the connection broke during the call. Retrying later may succeed. A
    /// write that failed this way may or may not have been applied.
    Unavailable,
    /// TLS: unreadable or invalid certificate files, or a failed handshake
    /// (a server certificate the CA does not verify, a client certificate
    /// etcd refuses).
    Tls,
    /// A transaction's conditions did not hold: someone wrote after the
    /// revision the caller read. Read again and retry.
    Conflict,
    /// The revision asked for was compacted away: list again and watch from
    /// the revision the list returns ([`Error::compact_revision`] says where
    /// history now starts).
    Compacted,
    /// The lease does not exist (it expired or was revoked).
    NotFound,
    /// etcd refused the request: too large, not permitted, out of quota,
    /// invalid.
    Rejected,
    /// etcd answered something this client cannot read (a missing header,
    /// an answer of the wrong type).
    InvalidResponse,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
            endpoint: None,
            compact_revision: None,
        }
    }

    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Config, message)
    }

    pub(crate) fn tls(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Tls, message)
    }

    pub(crate) fn invalid_response(endpoint: &str, message: impl fmt::Display) -> Self {
        Error::new(
            ErrorKind::InvalidResponse,
            format!(
                "etcd at {endpoint} sent an unexpected answer: {message}; is this endpoint an \
                 etcd 3.4 or newer client URL?"
            ),
        )
        .at(endpoint)
    }

    pub(crate) fn compacted(endpoint: &str, revision: i64, compact_revision: i64) -> Self {
        let mut error = Error::new(
            ErrorKind::Compacted,
            format!(
                "etcd at {endpoint} compacted its history up to revision {compact_revision}, so \
                 the changes since revision {revision} are gone: list the keys again and watch \
                 from the revision the list returns, plus one"
            ),
        )
        .at(endpoint);
        error.compact_revision = Some(compact_revision);
        error
    }

    pub(crate) fn at(mut self, endpoint: &str) -> Self {
        self.endpoint = Some(endpoint.to_owned());
        self
    }

    /// The kind of problem.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The endpoint that answered with this error, when one did (an
    /// [`ErrorKind::Unavailable`] after trying several names them all in
    /// its message instead).
    pub fn endpoint(&self) -> Option<&str> {
        self.endpoint.as_deref()
    }

    /// For [`ErrorKind::Compacted`]: the first revision etcd still has
    /// changes for (minus one), when etcd said.
    pub fn compact_revision(&self) -> Option<i64> {
        self.compact_revision
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            return f
                .debug_struct("Error")
                .field("kind", &self.kind)
                .field("message", &self.message)
                .field("endpoint", &self.endpoint)
                .field("compact_revision", &self.compact_revision)
                .finish();
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

/// How a failed attempt on one endpoint counts.
#[derive(Debug)]
pub(crate) enum Failure {
    /// The request never left this process (the connection could not be
    /// made): another endpoint may be tried, even for a write.
    NotSent(Error),
    /// The connection broke or timed out with the request out: retry reads
    /// on another endpoint, but a write may have been applied.
    Broken(Error),
    /// etcd answered with an error: final, whatever the endpoint.
    Answered(Error),
}

/// Classifies the status of a failed call to `endpoint` doing `what`.
pub(crate) fn from_status(endpoint: &str, what: &str, status: &Status) -> Failure {
    let detail = describe(status);
    if let Some(tls) = tls_problem(status) {
        // An alert is etcd refusing this client (its certificate, or the lack
        // of one); anything else is this side's verification or files, whose
        // messages say what to fix.
        let advice = if tls.contains("alert") {
            "etcd refused this client: with --client-cert-auth it wants a client certificate \
             and key issued by the CA of its --trusted-ca-file"
        } else {
            "check the CA, certificate and key given for etcd against etcd's --cert-file, \
             --key-file and --trusted-ca-file"
        };
        let error = Error::tls(format!(
            "etcd at {endpoint}: {what}: TLS failed: {tls}; {advice}"
        ))
        .at(endpoint);
        return if is_connect_error(status) {
            Failure::NotSent(error)
        } else {
            Failure::Broken(error)
        };
    }
    if is_connect_error(status) {
        return Failure::NotSent(
            Error::new(
                ErrorKind::Unavailable,
                format!("etcd at {endpoint}: cannot connect: {detail}"),
            )
            .at(endpoint),
        );
    }
    let etcd_says = status.message();
    match status.code() {
        Code::NotFound => Failure::Answered(
            Error::new(
                ErrorKind::NotFound,
                format!("etcd at {endpoint}: {what}: {etcd_says}"),
            )
            .at(endpoint),
        ),
        Code::OutOfRange if etcd_says.contains("compacted") => Failure::Answered(
            Error::new(
                ErrorKind::Compacted,
                format!(
                    "etcd at {endpoint}: {what}: {etcd_says}: list the keys again and use the \
                     revision it returns"
                ),
            )
            .at(endpoint),
        ),
        Code::InvalidArgument
        | Code::OutOfRange
        | Code::FailedPrecondition
        | Code::PermissionDenied
        | Code::Unauthenticated
        | Code::ResourceExhausted
        | Code::AlreadyExists
        | Code::Unimplemented => Failure::Answered(
            Error::new(
                ErrorKind::Rejected,
                format!(
                    "etcd at {endpoint} refused {what}: {etcd_says} ({:?})",
                    status.code()
                ),
            )
            .at(endpoint),
        ),
        // Unavailable: no leader, leader changed, a timeout inside etcd, or
        // the connection broke; Unknown and Internal come from the transport
        // (a reset HTTP/2 stream) as often as from etcd; Cancelled and
        // DeadlineExceeded from a deadline.
        _ => {
            // Over TLS, etcd refusing the client certificate shows as a
            // connection closed right after the handshake (with TLS 1.3 the
            // client learns it only when it next reads or writes).
            let hint = if endpoint.starts_with("https://") {
                " (if etcd is up, it may have refused the client certificate: check it against \
                 etcd's --client-cert-auth and --trusted-ca-file)"
            } else {
                ""
            };
            Failure::Broken(
                Error::new(
                    ErrorKind::Unavailable,
                    format!("etcd at {endpoint}: {what} failed: {detail}{hint}"),
                )
                .at(endpoint),
            )
        }
    }
}

/// The status's message and the distinct messages of its causes (where
/// "connection refused" is), joined.
fn describe(status: &Status) -> String {
    // tonic's wrapper of every transport failure says nothing itself.
    const NOTHING: &str = "transport error";
    let mut parts: Vec<String> = Vec::new();
    if !status.message().is_empty() && status.message() != NOTHING {
        parts.push(status.message().to_owned());
    }
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        let text = error.to_string();
        if !text.is_empty() && text != NOTHING && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = error.source();
    }
    if parts.is_empty() {
        format!("{:?}", status.code())
    } else {
        parts.join(": ")
    }
}

/// Whether the call ran out of time (tonic enforces the request's
/// deadline itself).
pub(crate) fn is_timeout(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::TimeoutExpired>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// Whether the call failed while connecting (tonic wraps every connector
/// error in [`tonic::ConnectError`]): nothing was sent.
fn is_connect_error(status: &Status) -> bool {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if error.is::<tonic::ConnectError>() {
            return true;
        }
        source = error.source();
    }
    false
}

/// The TLS problem among the causes, if any: a handshake failure of the
/// connector, or a TLS alert read later (with TLS 1.3, etcd refusing the
/// client certificate arrives after the client's handshake is done).
fn tls_problem(status: &Status) -> Option<String> {
    let mut source = std::error::Error::source(status);
    while let Some(error) = source {
        if let Some(handshake) = error.downcast_ref::<super::transport::TlsHandshakeError>() {
            return Some(handshake.to_string());
        }
        if let Some(rustls) = error.downcast_ref::<rustls::Error>() {
            return Some(rustls.to_string());
        }
        if let Some(io) = error.downcast_ref::<std::io::Error>()
            && let Some(rustls) = io.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>())
        {
            return Some(rustls.to_string());
        }
        // h2 keeps only the text of the I/O error that ended a connection,
        // so an alert etcd sent after the handshake is known by rustls's
        // words for it.
        let text = error.to_string();
        if let Some(at) = text.find("received fatal alert") {
            return Some(text[at..].to_owned());
        }
        source = error.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_map_to_kinds() {
        let kind = |status: Status| match from_status("http://e:2379", "put k", &status) {
            Failure::Answered(e) => ("answered", e.kind()),
            Failure::Broken(e) => ("broken", e.kind()),
            Failure::NotSent(e) => ("not sent", e.kind()),
        };
        assert_eq!(
            kind(Status::not_found("etcdserver: requested lease not found")),
            ("answered", ErrorKind::NotFound)
        );
        assert_eq!(
            kind(Status::out_of_range(
                "etcdserver: mvcc: required revision has been compacted"
            )),
            ("answered", ErrorKind::Compacted)
        );
        assert_eq!(
            kind(Status::invalid_argument("etcdserver: request is too large")),
            ("answered", ErrorKind::Rejected)
        );
        assert_eq!(
            kind(Status::unavailable("etcdserver: no leader")),
            ("broken", ErrorKind::Unavailable)
        );
        let connect = Status::from_error(Box::new(tonic::ConnectError(
            "tcp connect to 127.0.0.1:1: connection refused".into(),
        )));
        assert_eq!(kind(connect), ("not sent", ErrorKind::Unavailable));
    }

    #[test]
    fn messages_name_the_endpoint() {
        let Failure::Answered(e) = from_status(
            "http://127.0.0.1:2379",
            "revoke lease 7",
            &Status::not_found("etcdserver: requested lease not found"),
        ) else {
            panic!("not an answer");
        };
        assert_eq!(
            e.to_string(),
            "etcd at http://127.0.0.1:2379: revoke lease 7: etcdserver: requested lease not found"
        );
        assert_eq!(e.endpoint(), Some("http://127.0.0.1:2379"));
        assert!(format!("{e:#?}").starts_with("Error {\n    kind: NotFound,"));
    }
}
