//! [`Name`], the string type of every name in the model and in the
//! authorization policies.
//!
//! It lives here, below both [`crate::model`] and [`crate::rbac`] (the
//! model's server listener holds policies, and policies hold names), so
//! that imports run one way (docs/ARCHITECTURE.md, "Conventions"). Its
//! public path is [`crate::model::Name`].

use std::sync::Arc;

/// A shared, immutable string: names are cloned into many places of a snapshot.
pub type Name = Arc<str>;
