//! Server reflection lists the node's services, so grpcurl and other generic clients work.

mod common;

use common::ClusterSpec;
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[test]
fn reflection_lists_the_kv_health_and_admin_services() {
    let cluster = ClusterSpec::new(1).n(1).start();
    let addr = cluster.addr(0);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let services = runtime.block_on(async move {
        let channel = tonic::transport::Endpoint::from_shared(format!("http://{addr}"))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client = ServerReflectionClient::new(channel);
        let request = ServerReflectionRequest {
            host: String::new(),
            message_request: Some(MessageRequest::ListServices(String::new())),
        };
        let mut answers = client
            .server_reflection_info(tokio_stream::iter([request]))
            .await
            .unwrap()
            .into_inner();
        let answer = answers.message().await.unwrap().unwrap();
        match answer.message_response {
            Some(MessageResponse::ListServicesResponse(list)) => {
                list.service.into_iter().map(|s| s.name).collect::<Vec<_>>()
            }
            other => panic!("unexpected reflection answer: {other:?}"),
        }
    });
    for wanted in ["dynakv.v1.KV", "dynakv.v1.Admin", "grpc.health.v1.Health"] {
        assert!(
            services.iter().any(|s| s == wanted),
            "{wanted} missing from {services:?}"
        );
    }
}
