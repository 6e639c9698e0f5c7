//! The demo shop's gRPC service, generated from `proto/shop.proto` at build
//! time: messages (`PayRequest`, `PayReply`, ...), the client
//! (`payment_client::PaymentClient`) and the server
//! (`payment_server::{Payment, PaymentServer}`).
//!
//! It lives in its own unpublished crate, a dev-dependency of `proxyless`,
//! so that a crate depending on `proxyless` runs no code generation: only the
//! examples, tests and benches build this (see docs/ARCHITECTURE.md).
#![allow(missing_docs, unreachable_pub, clippy::all)]

tonic::include_proto!("shop");
