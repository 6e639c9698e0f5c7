//! [`ConnectionInfo`]: the connection a request arrived on.
//!
//! [`serve`](crate::serve()) sets it; the server stack (authorization),
//! telemetry and the client stack (which passes the caller's address on)
//! read it. It lives here, below all of them, so that imports run down the
//! layering (docs/ARCHITECTURE.md, "Conventions").

use std::net::SocketAddr;

/// The connection a request arrived on: a request extension set by
/// [`serve()`](crate::serve()).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConnectionInfo {
    peer_addr: SocketAddr,
    local_addr: SocketAddr,
}

impl ConnectionInfo {
    /// The connection from `peer_addr`, accepted on `local_addr`.
    pub(crate) fn new(peer_addr: SocketAddr, local_addr: SocketAddr) -> Self {
        ConnectionInfo {
            peer_addr,
            local_addr,
        }
    }

    /// The client's address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer_addr
    }

    /// The local address the connection was accepted on.
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }
}
