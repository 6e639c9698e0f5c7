//! The one error type of mesh-xds-client.
//!
//! Opaque, in hyper's style: callers branch on [`Error::kind`] and print the
//! message, which says what went wrong, where (variable, file, server, resource)
//! and what to do about it.

use std::fmt;

/// Why the xDS client could not start, connect, or deliver a listener.
///
/// `Debug` prints the message as `Display` does, with its real line breaks
/// (the bootstrap error shows a JSON example on several lines), because
/// `Debug` is what Rust prints when `main` returns the error. `{:#?}`
/// prints the fields, as anyhow's `{:#?}` does.
#[derive(Clone, PartialEq, Eq)]
pub struct Error {
    kind: ErrorKind,
    message: String,
}

/// What kind of problem an [`Error`] reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ErrorKind {
    /// The bootstrap is absent, unreadable, malformed or asks for something unsupported.
    Bootstrap,
    /// No control server could be reached, or the ADS stream failed.
    Connect,
    /// The control server said a listener does not exist.
    NotFound,
    /// The control server sent a resource this client rejected (NACKed) and
    /// there is no earlier valid version of it to use.
    Rejected,
    /// The client's background task has ended (its runtime shut down).
    Closed,
    /// The static-stability cache file could not be read or written.
    Cache,
}

impl Error {
    pub(crate) fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        Error {
            kind,
            message: message.into(),
        }
    }

    pub(crate) fn bootstrap(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Bootstrap, message)
    }

    pub(crate) fn connect(message: impl Into<String>) -> Self {
        Error::new(ErrorKind::Connect, message)
    }

    /// The kind of problem.
    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    /// Whether the control server said the resource does not exist.
    pub fn is_not_found(&self) -> bool {
        self.kind == ErrorKind::NotFound
    }

    /// Whether the bootstrap is at fault.
    pub fn is_bootstrap(&self) -> bool {
        self.kind == ErrorKind::Bootstrap
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.message
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
                .finish();
        }
        f.write_str(&self.message)
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_the_message_with_real_line_breaks() {
        let e = Error::bootstrap("no bootstrap:\n{\n  \"xds_servers\": []\n}");
        assert_eq!(
            format!("{e:?}"),
            "no bootstrap:\n{\n  \"xds_servers\": []\n}"
        );
        assert_eq!(format!("{e:?}"), e.to_string());
        let alt = format!("{e:#?}");
        assert!(alt.starts_with("Error {\n    kind: Bootstrap,"), "{alt}");
    }
}
