//! placeholder (conversion to and from Envoy v3 protos)
