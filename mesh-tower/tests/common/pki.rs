//! The test PKI (`mesh_testkit::pki`) as mesh-tower's types: TLS credentials
//! and certificate stores built from a test CA and its leaves.

use mesh_testkit::pki::{Leaf, TestCa};
use mesh_tower::tls::{CertStore, Credentials};

/// mesh-tower credentials from a [`TestCa`].
pub trait TestCaExt {
    /// `leaf` with this CA's root as the trust bundle.
    fn credentials(&self, leaf: &Leaf) -> Credentials;

    /// A store holding a current leaf for `uri`.
    fn store(&self, uri: &str) -> CertStore;
}

impl TestCaExt for TestCa {
    fn credentials(&self, leaf: &Leaf) -> Credentials {
        leaf.credentials(&self.pem)
    }

    fn store(&self, uri: &str) -> CertStore {
        CertStore::new(self.credentials(&self.leaf(uri))).unwrap()
    }
}

/// mesh-tower credentials from a [`Leaf`].
pub trait LeafExt {
    /// This leaf with the PEM trust bundle `bundle` (one root or several).
    fn credentials(&self, bundle: &str) -> Credentials;
}

impl LeafExt for Leaf {
    fn credentials(&self, bundle: &str) -> Credentials {
        Credentials::from_pem(
            self.chain.as_bytes(),
            self.key.as_bytes(),
            bundle.as_bytes(),
        )
        .unwrap()
    }
}
