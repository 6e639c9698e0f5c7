//! An in-memory sink for log lines (a `tracing` subscriber's writer, an access
//! log), so a test asserts on what was logged without a file or stdout capture.

use std::io;
use std::sync::{Arc, Mutex, PoisonError};

/// Everything written to it, shared by its clones: hand a clone to the logger
/// (`tracing_subscriber::fmt().with_writer(move || lines.clone())`) and read
/// [`Lines::text`] afterwards.
#[derive(Debug, Clone, Default)]
pub struct Lines(Arc<Mutex<Vec<u8>>>);

impl Lines {
    /// What was written so far, as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.0.lock().unwrap_or_else(PoisonError::into_inner)).into_owned()
    }
}

impl io::Write for Lines {
    fn write(&mut self, b: &[u8]) -> io::Result<usize> {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .extend_from_slice(b);
        Ok(b.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;

    use super::*;

    #[test]
    fn clones_share_what_was_written() {
        let lines = Lines::default();
        let mut writer = lines.clone();
        writeln!(writer, "one").unwrap();
        write!(writer, "two").unwrap();
        assert_eq!(lines.text(), "one\ntwo");
    }
}
