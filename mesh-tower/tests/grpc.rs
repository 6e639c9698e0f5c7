//! A tonic generated client over the mesh client, to a tonic server run by
//! `serve` (tonic's `Routes` as the app).

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use common::admin::fake_admin;
use envoy_types::pb::envoy::config::core::v3::Node;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_client::ClientStatusDiscoveryServiceClient;
use envoy_types::pb::envoy::service::status::v3::client_status_discovery_service_server::{
    ClientStatusDiscoveryService, ClientStatusDiscoveryServiceServer,
};
use envoy_types::pb::envoy::service::status::v3::{
    ClientConfig, ClientStatusRequest, ClientStatusResponse,
};
use mesh_core::Snapshot;
use mesh_core::model::Protocol;
use mesh_testkit::snapshot::add_two_backends;
use mesh_tower::{MeshClient, Registration, Serving, serve};
use tokio::net::TcpListener;
use tonic::{Code, Request, Response, Status, Streaming};

/// Answers with its own name; `missing` gets NOT_FOUND (a Trailers-Only response).
struct Csds(&'static str);

#[tonic::async_trait]
impl ClientStatusDiscoveryService for Csds {
    type StreamClientStatusStream = tokio_stream::Empty<Result<ClientStatusResponse, Status>>;

    async fn stream_client_status(
        &self,
        _: Request<Streaming<ClientStatusRequest>>,
    ) -> Result<Response<Self::StreamClientStatusStream>, Status> {
        Err(Status::unimplemented("not here"))
    }

    async fn fetch_client_status(
        &self,
        request: Request<ClientStatusRequest>,
    ) -> Result<Response<ClientStatusResponse>, Status> {
        let asked = request.into_inner().node.map(|n| n.id).unwrap_or_default();
        if asked == "missing" {
            return Err(Status::not_found("no client \"missing\""));
        }
        Ok(Response::new(ClientStatusResponse {
            config: vec![ClientConfig {
                node: Some(Node {
                    id: self.0.to_owned(),
                    ..Node::default()
                }),
                ..ClientConfig::default()
            }],
        }))
    }
}

async fn grpc_server(admin: SocketAddr, name: &'static str) -> (SocketAddr, Serving) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let routes = tonic::service::Routes::new(ClientStatusDiscoveryServiceServer::new(Csds(name)));
    let registration = Registration::new(admin.to_string(), "csds")
        .protocol(Protocol::Grpc)
        .ttl(Duration::from_secs(5));
    (addr, serve(listener, registration, routes).await.unwrap())
}

fn ask(id: &str) -> ClientStatusRequest {
    ClientStatusRequest {
        node: Some(Node {
            id: id.to_owned(),
            ..Node::default()
        }),
        ..ClientStatusRequest::default()
    }
}

#[tokio::test]
async fn tonic_clients_use_the_mesh_client_as_their_channel() {
    let (admin, _calls) = fake_admin(0, None).await;
    let (a, serving_a) = grpc_server(admin, "a").await;
    let (b, serving_b) = grpc_server(admin, "b").await;
    let mut snapshot = Snapshot::default();
    add_two_backends(&mut snapshot, "csds", a, b, Protocol::Grpc);
    let source = Arc::new(ArcSwap::from_pointee(snapshot));
    let channel: MeshClient<tonic::body::Body, _> = MeshClient::new(source);

    // tonic writes the URI from the origin: it must name the service.
    let mut client = ClientStatusDiscoveryServiceClient::with_origin(
        channel.clone(),
        "http://csds".parse().unwrap(),
    );
    let reply = client
        .fetch_client_status(ask("x"))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.config[0].node.as_ref().unwrap().id, "a");

    // Header routing sees gRPC metadata.
    let mut request = tonic::Request::new(ask("x"));
    request
        .metadata_mut()
        .insert("x-version", "v2".parse().unwrap());
    let reply = client
        .fetch_client_status(request)
        .await
        .unwrap()
        .into_inner();
    assert_eq!(reply.config[0].node.as_ref().unwrap().id, "b");

    // A Trailers-Only error status passes through untouched.
    let status = client
        .fetch_client_status(ask("missing"))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::NotFound);
    assert_eq!(status.message(), "no client \"missing\"");

    // Without an origin there is no service name: a clear error, not a 503.
    let mut nameless = ClientStatusDiscoveryServiceClient::new(channel);
    let status = nameless.fetch_client_status(ask("x")).await.unwrap_err();
    assert!(status.message().contains("with_origin"), "{status:?}");

    serving_a.shutdown().await.unwrap();
    serving_b.shutdown().await.unwrap();
}
