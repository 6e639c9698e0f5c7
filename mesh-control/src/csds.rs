//! Client Status Discovery Service (CSDS, `envoy.service.status.v3`): the
//! config each connected client was sent, its version, and whether it ACKed
//! or NACKed it — what `istioctl proxy-status`-style and grpcdebug-style
//! tools ask a control plane (gRFC A40 describes the client side).
//!
//! It shows every client's config, so with a CA it takes the credentials
//! ADS takes (a client certificate from the mesh CA or a join token as
//! `authorization: Bearer` metadata, see `ads::authenticate`); without
//! them the call is `UNAUTHENTICATED`.

use std::pin::Pin;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use envoy_types::pb::envoy::admin::v3::{ClientResourceStatus, UpdateFailureState};
use envoy_types::pb::envoy::service::status::v3::client_config::GenericXdsConfig;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::ClientStatusDiscoveryService;
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse, ConfigStatus,
};
use envoy_types::pb::google::protobuf::Timestamp;
use futures_util::{Stream, StreamExt};
use mesh_core::xds::{self, ResourceType};
use tonic::{Request, Response, Status, Streaming};

use crate::state::Shared;

/// The tonic service; cheap to clone.
#[derive(Clone)]
pub(crate) struct Csds {
    pub(crate) shared: Arc<Shared>,
}

type StatusStream = Pin<Box<dyn Stream<Item = Result<ClientStatusResponse, Status>> + Send>>;

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = StatusStream;

    async fn stream_client_status(
        &self,
        request: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        crate::ads::authenticate(&self.shared, &request, "CSDS")?;
        // Like ADS streams, a CSDS stream ends with UNAVAILABLE when the
        // control server stops, so a graceful stop does not wait out its
        // grace for a debugging client that keeps its stream open.
        let mut stop = self.shared.stop.subscribe();
        let stopping: Pin<Box<dyn std::future::Future<Output = ()> + Send>> =
            Box::pin(async move {
                let _ = stop.wait_for(|stopping| *stopping).await;
            });
        let state = (request.into_inner(), stopping, self.shared.clone(), false);
        let stream = futures_util::stream::unfold(
            state,
            |(mut inbound, mut stopping, shared, ended)| async move {
                if ended {
                    return None;
                }
                tokio::select! {
                    () = &mut stopping => Some((
                        Err(Status::unavailable("mesh-control is shutting down; reconnect")),
                        (inbound, stopping, shared, true),
                    )),
                    req = inbound.next() => match req {
                        Some(Ok(req)) => {
                            let status = client_status(&shared, &req);
                            Some((Ok(status), (inbound, stopping, shared, false)))
                        }
                        Some(Err(status)) => Some((Err(status), (inbound, stopping, shared, true))),
                        None => None,
                    },
                }
            },
        );
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        crate::ads::authenticate(&self.shared, &request, "CSDS")?;
        Ok(Response::new(client_status(
            &self.shared,
            request.get_ref(),
        )))
    }
}

fn timestamp(t: SystemTime) -> Timestamp {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    Timestamp {
        seconds: d.as_secs() as i64,
        nanos: d.subsec_nanos() as i32,
    }
}

/// Every connected client matching the request's node matchers (exact node
/// id matchers are honored; without matchers, all clients).
pub(crate) fn client_status(shared: &Shared, req: &ClientStatusRequest) -> ClientStatusResponse {
    let wanted: Vec<String> = req
        .node_matchers
        .iter()
        .filter_map(|m| m.node_id.as_ref())
        .filter_map(|s| match &s.match_pattern {
            Some(
                envoy_types::pb::envoy::r#type::matcher::v3::string_matcher::MatchPattern::Exact(e),
            ) => Some(e.clone()),
            _ => None,
        })
        .collect();
    let clients = shared.clients.lock();
    let config = clients
        .values()
        .filter(|c| wanted.is_empty() || wanted.contains(&c.node_id))
        .map(|c| {
            let mut generic = Vec::new();
            // The four xDS types, then SDS (private keys redacted).
            let types = ResourceType::ALL
                .map(|t| (t.short_name(), t.type_url()))
                .into_iter()
                .chain([(crate::sds::STATUS_NAME, crate::dialect::SECRET_TYPE)]);
            for (short_name, type_url) in types {
                let Some(s) = c.types.get(short_name) else {
                    continue;
                };
                let nacked = s.nacked_latest();
                let acked = s.acked_latest();
                let (config_status, client_status) = if nacked {
                    (ConfigStatus::Error, ClientResourceStatus::Nacked)
                } else if acked {
                    (ConfigStatus::Synced, ClientResourceStatus::Acked)
                } else {
                    (ConfigStatus::Stale, ClientResourceStatus::Requested)
                };
                for any in s.sent_resources.iter() {
                    generic.push(GenericXdsConfig {
                        type_url: type_url.to_string(),
                        name: xds::resource_name(any)
                            .or_else(|| crate::sds::secret_name(any))
                            .unwrap_or_default(),
                        version_info: s.sent_version.clone(),
                        xds_config: (!req.exclude_resource_contents).then(|| any.clone()),
                        last_updated: s.last_push_wall.map(timestamp),
                        config_status: config_status as i32,
                        client_status: client_status as i32,
                        error_state: s.last_nack.as_ref().filter(|_| nacked).map(|n| {
                            UpdateFailureState {
                                details: n.message.clone(),
                                version_info: n.version.clone(),
                                last_update_attempt: Some(timestamp(n.at)),
                                ..UpdateFailureState::default()
                            }
                        }),
                        ..GenericXdsConfig::default()
                    });
                }
            }
            ClientConfig {
                node: c.node.clone(),
                generic_xds_configs: generic,
                ..ClientConfig::default()
            }
        })
        .collect();
    ClientStatusResponse { config }
}
