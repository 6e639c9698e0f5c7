//! The one error type of mesh-control.

use std::fmt;

/// Why the control server could not start or do what it was asked.
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    message: String,
    source: Option<std::io::Error>,
}

/// What kind of problem an [`Error`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Bad settings or a bad config directory.
    Config,
    /// A socket or file operation failed.
    Io,
    /// The caller may not do this: an unknown join token, or a certificate
    /// or registration for an identity its token does not grant.
    Denied,
    /// A malformed request: a bad CSR, a lifetime out of range.
    InvalidRequest,
}

impl Error {
    pub(crate) fn config(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Config,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn denied(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Denied,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn invalid_request(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::InvalidRequest,
            message: message.into(),
            source: None,
        }
    }

    pub(crate) fn io(message: impl Into<String>, source: std::io::Error) -> Self {
        Error {
            kind: ErrorKind::Io,
            message: message.into(),
            source: Some(source),
        }
    }

    /// The kind of problem.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.source {
            Some(e) => write!(f, "{}: {e}", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}
