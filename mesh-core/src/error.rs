//! The one error type of mesh-core.

use std::fmt;

/// Why a piece of config is invalid, or why a request cannot be routed.
///
/// Opaque by design (hyper's style): match on [`Error::kind`], print with
/// `Display`. Messages say what was wrong and where (resource and field).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// What kind of problem an [`Error`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Config that breaks a rule of the model (validation, conversion).
    InvalidConfig,
    /// Config this mesh understands but does not implement: rejected, never ignored.
    Unsupported,
    /// No listener, virtual host, route, cluster or endpoint for a request.
    NoRoute,
}

impl Error {
    /// An invalid-config error.
    pub fn invalid(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::InvalidConfig,
            message: message.into(),
        }
    }

    /// An unsupported-config error.
    pub fn unsupported(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::Unsupported,
            message: message.into(),
        }
    }

    /// A routing failure.
    pub fn no_route(message: impl Into<String>) -> Self {
        Error {
            kind: ErrorKind::NoRoute,
            message: message.into(),
        }
    }

    /// The kind of problem.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// The message without the context prefix.
    pub fn message(&self) -> &str {
        &self.message
    }

    /// Prefixes the message with where the problem is (`Listener "catalog": ...`).
    pub fn context(mut self, what: impl fmt::Display) -> Self {
        self.message = format!("{what}: {}", self.message);
        self
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}
