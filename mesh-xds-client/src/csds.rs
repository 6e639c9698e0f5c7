//! Client-side CSDS (`envoy.service.status.v3`): the config this service
//! runs, as it received it, with the ACK/NACK status of every resource.
//!
//! gRFC A40 (<https://github.com/grpc/proposal/blob/master/A40-csds-support.md>)
//! has every gRPC xDS client answer CSDS about itself, so `grpcdebug <addr>
//! xds status` / `xds config` show what a workload runs, not only what the
//! control server sent it. This is that service for a Rust service: one
//! [`ClientConfig`] (this node) whose `generic_xds_configs` list every
//! resource the client holds or waits for, per type:
//!
//! - `ACKED`: accepted; `xds_config` is the resource as received,
//!   `version_info` the version of the response that last carried it.
//! - `NACKED`: its last update was rejected; `error_state` says why, which
//!   version and when (and carries the rejected resource); `xds_config` is the
//!   previously accepted version still in use, if any.
//! - `DOES_NOT_EXIST`: a listener or cluster the server left out of its
//!   state-of-the-world response.
//! - `REQUESTED`: subscribed, not received yet.
//!
//! As A40 specifies, `node_matchers` are not supported (the client only
//! knows itself): a request carrying any is answered `INVALID_ARGUMENT`.
//! `exclude_resource_contents` is honored.

use std::pin::Pin;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse,
};
use envoy_types::pb::google::protobuf::Timestamp;
use futures_util::{Stream, StreamExt};
use tonic::{Request, Response, Status, Streaming};

use crate::XdsClient;
use crate::state::{ResourceReport, ResourceStatus};

impl XdsClient {
    /// This client's CSDS answer (gRFC A40): one [`ClientConfig`] for its
    /// node, listing every resource it holds or waits for with its version,
    /// raw form, last update time and ACK/NACK status.
    pub fn client_status(&self) -> ClientStatusResponse {
        ClientStatusResponse {
            config: vec![client_config(
                self.bootstrap().node(),
                &self.resource_report(),
                true,
            )],
        }
    }
}

/// The tonic `ClientStatusDiscoveryService` of one [`XdsClient`]: mount
/// [`CsdsService::into_server`] on any tonic or axum server (mesh-tower's
/// admin endpoint does) so grpcdebug-style tools can query the service.
#[derive(Debug, Clone)]
pub struct CsdsService {
    xds: XdsClient,
}

impl CsdsService {
    /// The service reporting `xds`'s config.
    pub fn new(xds: XdsClient) -> Self {
        CsdsService { xds }
    }

    /// The tonic server to add to a router.
    pub fn into_server(self) -> ClientStatusDiscoveryServiceServer<CsdsService> {
        ClientStatusDiscoveryServiceServer::new(self)
    }

    fn answer(&self, req: &ClientStatusRequest) -> Result<ClientStatusResponse, Status> {
        if !req.node_matchers.is_empty() {
            return Err(Status::invalid_argument(format!(
                "node_matchers are not supported by a client's CSDS (gRFC A40): this service \
                 reports only itself (node {:?}); send the request without them",
                self.xds.bootstrap().node_id()
            )));
        }
        Ok(ClientStatusResponse {
            config: vec![client_config(
                self.xds.bootstrap().node(),
                &self.xds.resource_report(),
                !req.exclude_resource_contents,
            )],
        })
    }
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for CsdsService {
    type StreamClientStatusStream = StatusStream;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        let service = self.clone();
        let stream = request
            .into_inner()
            .map(move |req| req.and_then(|req| service.answer(&req)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        self.answer(request.get_ref()).map(Response::new)
    }
}

pub(crate) fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: i64::try_from(d.as_secs()).unwrap_or(i64::MAX),
        nanos: i32::try_from(d.subsec_nanos()).unwrap_or(0),
    }
}

fn proto_status(status: ResourceStatus) -> ClientResourceStatus {
    match status {
        ResourceStatus::Requested => ClientResourceStatus::Requested,
        ResourceStatus::DoesNotExist => ClientResourceStatus::DoesNotExist,
        ResourceStatus::Acked => ClientResourceStatus::Acked,
        ResourceStatus::Nacked => ClientResourceStatus::Nacked,
    }
}

/// The CSDS [`ClientConfig`] of `node` for a resource report; raw resources
/// (`xds_config`, a rejection's `failed_configuration`) only with `contents`.
pub(crate) fn client_config(node: Node, report: &ResourceReport, contents: bool) -> ClientConfig {
    let generic_xds_configs = report
        .entries()
        .iter()
        .map(|e| {
            let accepted = e.accepted.as_deref();
            // Without a raw copy (keep_raw off) an accepted resource is at
            // its type's version; a requested one has none.
            let version_info = match (accepted, e.status) {
                (Some(raw), _) => raw.version.clone(),
                (None, ResourceStatus::Acked) => report.version(e.kind).to_owned(),
                (None, _) => String::new(),
            };
            GenericXdsConfig {
                type_url: e.kind.type_url().to_owned(),
                name: e.name.to_string(),
                version_info,
                xds_config: accepted.filter(|_| contents).map(|r| r.any.clone()),
                last_updated: accepted.map(|r| timestamp(r.updated)),
                client_status: proto_status(e.status) as i32,
                error_state: e.rejection.as_deref().map(|r| UpdateFailureState {
                    failed_configuration: r.failed.clone().filter(|_| contents),
                    last_update_attempt: Some(timestamp(r.at)),
                    details: r.details.clone(),
                    version_info: r.version.clone(),
                }),
                ..GenericXdsConfig::default()
            }
        })
        .collect();
    ClientConfig {
        node: Some(node),
        generic_xds_configs,
        ..ClientConfig::default()
    }
}

#[cfg(test)]
mod tests;
