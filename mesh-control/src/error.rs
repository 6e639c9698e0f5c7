//! The one error type of mesh-control.

use std::fmt;

/// Why the control server could not start or do what it was asked.
///
/// `Debug` is written for people, as anyhow's is, because it is what Rust
/// prints when `main` returns the error (`Error: {err:?}`, e.g. from
/// `Server::builder().start().await?`): the message, then the underlying
/// cause under `Caused by:`. `{:#?}` prints the fields, as anyhow's does.
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

impl fmt::Debug for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            return f
                .debug_struct("Error")
                .field("kind", &self.kind)
                .field("message", &self.message)
                .field("source", &self.source)
                .finish();
        }
        f.write_str(&self.message)?;
        if let Some(source) = &self.source {
            write!(f, "\n\nCaused by:")?;
            for line in source.to_string().split('\n') {
                write!(f, "\n    {line}")?;
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_ref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_reads_like_anyhow() {
        let e = Error::config("config directory /x does not exist");
        assert_eq!(format!("{e:?}"), "config directory /x does not exist");
        let e = Error::io(
            "cannot bind admin address 127.0.0.1:15000",
            std::io::Error::new(std::io::ErrorKind::AddrInUse, "address in use"),
        );
        assert_eq!(
            format!("{e:?}"),
            "cannot bind admin address 127.0.0.1:15000\n\nCaused by:\n    address in use"
        );
        assert_eq!(
            e.to_string(),
            "cannot bind admin address 127.0.0.1:15000: address in use"
        );
        assert!(format!("{e:#?}").starts_with("Error {\n    kind: Io,"));
    }
}
