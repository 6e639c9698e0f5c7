//! The OTLP trace receiver of mesh-testkit (the collector's gRPC trace service and
//! `POST /v1/traces`), flushed through the facade's [`Telemetry`]: a test waits for
//! the spans of its services' telemetries without flushing each by hand.

use std::net::SocketAddr;
use std::time::Duration;

#[allow(unused_imports)] // each test binary uses some
pub(crate) use mesh_testkit::otlp::{Span as Got, find, one};
use proxyless::telemetry::Telemetry;

/// The receiver: what arrived so far (clones share it).
#[derive(Clone, Default)]
pub(crate) struct Receiver(mesh_testkit::otlp::Receiver);

impl Receiver {
    /// Every span received so far.
    pub(crate) fn spans(&self) -> Vec<Got> {
        self.0.spans()
    }

    /// Flushes `telemetries` until `done` holds for the received spans; panics with
    /// what arrived after `deadline`.
    pub(crate) async fn wait_for(
        &self,
        telemetries: &[&Telemetry],
        deadline: Duration,
        done: impl Fn(&[Got]) -> bool,
    ) -> Vec<Got> {
        let flush = async || {
            for t in telemetries {
                if let Err(e) = t.flush().await {
                    panic!("flushing spans of {:?}: {e}", t.identity().service());
                }
            }
        };
        self.0.wait_for(deadline, flush, done).await
    }
}

/// Starts a receiver: (it, its OTLP/gRPC address, its OTLP/HTTP address).
pub(crate) async fn receiver() -> (Receiver, SocketAddr, SocketAddr) {
    let (receiver, grpc, http) = mesh_testkit::otlp::Receiver::start().await;
    (Receiver(receiver), grpc, http)
}
