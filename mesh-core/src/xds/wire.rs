//! Wire-compatible mirrors of a few protos, for two jobs the generated types
//! cannot do:
//!
//! - reading only a resource's name (field 1 of all four resource messages)
//!   when the rest may be invalid;
//! - encoding a ClusterLoadAssignment, and a Cluster's metadata,
//!   deterministically. The generated
//!   `Metadata` and `Struct` hold `HashMap`s, whose iteration order (and so
//!   the encoded bytes) changes from one map to the next; a protobuf map is
//!   on the wire a repeated `{1: key, 2: value}` entry, which a `Vec` of
//!   entries writes in a fixed order.
//!
//! The round-trip tests decode these bytes with the generated types.

use envoy_types::pb::envoy::config::core::v3::Locality;
use envoy_types::pb::envoy::config::endpoint::v3::Endpoint;
use envoy_types::pb::google::protobuf::UInt32Value;

use super::endpoints::endpoint_proto;
use crate::model::{self, Name};

/// Field 1 (`name` / `cluster_name`) of any of the four resources.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct NameOnly {
    #[prost(string, tag = "1")]
    pub(crate) name: String,
}

/// `envoy.config.endpoint.v3.ClusterLoadAssignment` (the fields we write).
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ClusterLoadAssignment {
    #[prost(string, tag = "1")]
    cluster_name: String,
    #[prost(message, repeated, tag = "2")]
    endpoints: Vec<LocalityLbEndpoints>,
}

/// `envoy.config.endpoint.v3.LocalityLbEndpoints`.
#[derive(Clone, PartialEq, prost::Message)]
struct LocalityLbEndpoints {
    #[prost(message, optional, tag = "1")]
    locality: Option<Locality>,
    #[prost(message, repeated, tag = "2")]
    lb_endpoints: Vec<LbEndpoint>,
    #[prost(message, optional, tag = "3")]
    load_balancing_weight: Option<UInt32Value>,
    #[prost(uint32, tag = "5")]
    priority: u32,
}

/// `envoy.config.endpoint.v3.LbEndpoint` (`endpoint` is oneof member 1).
#[derive(Clone, PartialEq, prost::Message)]
struct LbEndpoint {
    #[prost(message, optional, tag = "1")]
    endpoint: Option<Endpoint>,
    #[prost(int32, tag = "2")]
    health_status: i32,
    #[prost(message, optional, tag = "3")]
    metadata: Option<Metadata>,
    #[prost(message, optional, tag = "4")]
    load_balancing_weight: Option<UInt32Value>,
}

/// `envoy.config.core.v3.Metadata`: `map<string, Struct> filter_metadata = 1`.
#[derive(Clone, PartialEq, prost::Message)]
struct Metadata {
    #[prost(message, repeated, tag = "1")]
    filter_metadata: Vec<MetadataEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct MetadataEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Struct>,
}

/// `google.protobuf.Struct`: `map<string, Value> fields = 1`.
#[derive(Clone, PartialEq, prost::Message)]
struct Struct {
    #[prost(message, repeated, tag = "1")]
    fields: Vec<StructEntry>,
}

#[derive(Clone, PartialEq, prost::Message)]
struct StructEntry {
    #[prost(string, tag = "1")]
    key: String,
    #[prost(message, optional, tag = "2")]
    value: Option<Value>,
}

/// `google.protobuf.Value` (the three kinds we write).
#[derive(Clone, PartialEq, prost::Message)]
struct Value {
    #[prost(oneof = "Kind", tags = "3, 4, 5")]
    kind: Option<Kind>,
}

#[derive(Clone, PartialEq, prost::Oneof)]
enum Kind {
    #[prost(string, tag = "3")]
    String(String),
    #[prost(bool, tag = "4")]
    Bool(bool),
    #[prost(message, tag = "5")]
    Struct(Struct),
}

/// `envoy.config.cluster.v3.Cluster` reduced to its `metadata` (field 25):
/// appended to the bytes of the rest of the cluster, it sets that field.
#[derive(Clone, PartialEq, prost::Message)]
pub(crate) struct ClusterMetadataOnly {
    #[prost(message, optional, tag = "25")]
    metadata: Option<Metadata>,
}

/// The deterministic twin of the metadata [`super::cluster_to_proto`]
/// writes: `filter_metadata["proxyless"] { protocol, locality_failover? }`.
pub(crate) fn cluster_metadata(cluster: &model::Cluster) -> ClusterMetadataOnly {
    let mut fields = vec![StructEntry {
        key: super::cluster::PROTOCOL_KEY.to_string(),
        value: Some(Value {
            kind: Some(Kind::String(
                super::cluster::protocol_name(cluster.protocol).to_string(),
            )),
        }),
    }];
    if cluster.locality_failover {
        fields.push(StructEntry {
            key: super::cluster::LOCALITY_FAILOVER_KEY.to_string(),
            value: Some(Value {
                kind: Some(Kind::Bool(true)),
            }),
        });
    }
    ClusterMetadataOnly {
        metadata: Some(Metadata {
            filter_metadata: vec![MetadataEntry {
                key: super::METADATA_NAMESPACE.to_string(),
                value: Some(Struct { fields }),
            }],
        }),
    }
}

/// The deterministic twin of [`super::endpoints_to_proto`].
pub(crate) fn cluster_load_assignment(cla: &model::ClusterLoadAssignment) -> ClusterLoadAssignment {
    ClusterLoadAssignment {
        cluster_name: cla.cluster_name.to_string(),
        endpoints: cla
            .localities
            .iter()
            .map(|l| LocalityLbEndpoints {
                locality: Some(Locality {
                    region: l.locality.region.to_string(),
                    zone: l.locality.zone.to_string(),
                    sub_zone: l.locality.sub_zone.to_string(),
                }),
                lb_endpoints: l.endpoints.iter().map(lb_endpoint).collect(),
                load_balancing_weight: Some(UInt32Value { value: l.weight }),
                priority: l.priority,
            })
            .collect(),
    }
}

fn lb_endpoint(e: &model::Endpoint) -> LbEndpoint {
    LbEndpoint {
        endpoint: Some(endpoint_proto(e.address)),
        health_status: super::endpoints::HEALTHY,
        metadata: (!e.labels.is_empty()).then(|| labels_metadata(&e.labels)),
        load_balancing_weight: Some(UInt32Value { value: e.weight }),
    }
}

fn labels_metadata(labels: &[(Name, Name)]) -> Metadata {
    let labels = Struct {
        fields: labels
            .iter()
            .map(|(k, v)| StructEntry {
                key: k.to_string(),
                value: Some(Value {
                    kind: Some(Kind::String(v.to_string())),
                }),
            })
            .collect(),
    };
    Metadata {
        filter_metadata: vec![MetadataEntry {
            key: super::METADATA_NAMESPACE.to_string(),
            value: Some(Struct {
                fields: vec![StructEntry {
                    key: super::endpoints::LABELS_KEY.to_string(),
                    value: Some(Value {
                        kind: Some(Kind::Struct(labels)),
                    }),
                }],
            }),
        }],
    }
}
