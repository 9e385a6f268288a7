//! The standard services next to the broker: grpc.health.v1 and server reflection (v1 and
//! v1alpha), as grpc-health-probe and grpcurl use them.
mod common;

use common::TestBroker;
use prost::Message;
use prost_types::FileDescriptorProto;
use proxy_broker::server::SERVICE_NAMES;
use tonic::Code;
use tonic::transport::Channel;
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const EXAMPLE: &str = include_str!("../examples/broker.yaml");

async fn broker() -> TestBroker {
    TestBroker::start_yaml(EXAMPLE, &[]).await
}

// --- Health ----------------------------------------------------------------------------------

#[tokio::test]
async fn health_check_is_serving_for_the_server_and_every_named_service() {
    let broker = broker().await;
    assert!(
        SERVICE_NAMES.contains(&"proxybroker.v1.ProxyBroker"),
        "{SERVICE_NAMES:?}"
    );
    assert!(
        SERVICE_NAMES.contains(&"proxybroker.v1.ProxyBrokerAdmin"),
        "{SERVICE_NAMES:?}"
    );
    let mut health = HealthClient::new(broker.channel.clone());
    for service in std::iter::once("").chain(SERVICE_NAMES.iter().copied()) {
        let response = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap_or_else(|s| panic!("Check({service:?}): {s:?}"))
            .into_inner();
        assert_eq!(response.status(), ServingStatus::Serving, "Check({service:?})");
    }
    broker.stop().await;
}

#[tokio::test]
async fn health_check_of_an_unknown_service_is_not_found() {
    let broker = broker().await;
    let mut health = HealthClient::new(broker.channel.clone());
    for service in [
        "proxybroker.v1.NoSuchService",
        "proxybroker.v1.proxybroker",
        "proxybroker.v2.ProxyBroker",
    ] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .expect_err(service);
        assert_eq!(status.code(), Code::NotFound, "Check({service:?}): {status:?}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn health_watch_starts_with_serving() {
    let broker = broker().await;
    let mut stream = HealthClient::new(broker.channel.clone())
        .watch(HealthCheckRequest {
            service: "proxybroker.v1.ProxyBroker".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().expect("a first status");
    assert_eq!(first.status(), ServingStatus::Serving);
    drop(stream);
    broker.stop().await;
}

// --- Reflection ------------------------------------------------------------------------------

/// What a test asks the reflection service.
#[derive(Debug, Clone)]
enum Ask {
    ListServices,
    Symbol(String),
    File(String),
}

/// What the reflection service answered.
#[derive(Debug)]
enum Answer {
    Services(Vec<String>),
    Files(Vec<FileDescriptorProto>),
    Error(i32, String),
}

/// One client per reflection version; the two generated APIs are identical but distinct types.
macro_rules! reflection_client {
    ($name:ident, $($pb:ident)::+) => {
        async fn $name(channel: Channel, ask: Ask) -> Answer {
            use $($pb)::+ as pb;
            use pb::server_reflection_request::MessageRequest;
            use pb::server_reflection_response::MessageResponse;
            let message_request = match ask {
                Ask::ListServices => MessageRequest::ListServices(String::new()),
                Ask::Symbol(s) => MessageRequest::FileContainingSymbol(s),
                Ask::File(f) => MessageRequest::FileByFilename(f),
            };
            let request = pb::ServerReflectionRequest {
                host: String::new(),
                message_request: Some(message_request),
            };
            let mut client = pb::server_reflection_client::ServerReflectionClient::new(channel);
            let mut responses = client
                .server_reflection_info(tokio_stream::iter([request]))
                .await
                .unwrap()
                .into_inner();
            // tonic-reflection reports failures as the stream's status rather than an ErrorResponse.
            let response = match responses.message().await {
                Ok(response) => response.expect("one response per request"),
                Err(status) => return Answer::Error(status.code() as i32, status.message().to_owned()),
            };
            assert!(responses.message().await.unwrap().is_none(), "exactly one response");
            match response.message_response.expect("a response body") {
                MessageResponse::ListServicesResponse(list) => {
                    Answer::Services(list.service.into_iter().map(|s| s.name).collect())
                }
                MessageResponse::FileDescriptorResponse(files) => Answer::Files(
                    files
                        .file_descriptor_proto
                        .iter()
                        .map(|raw| FileDescriptorProto::decode(raw.as_slice()).unwrap())
                        .collect(),
                ),
                MessageResponse::ErrorResponse(e) => Answer::Error(e.error_code, e.error_message),
                other => panic!("unexpected reflection response {other:?}"),
            }
        }
    };
}

reflection_client!(reflect_v1, tonic_reflection::pb::v1);
reflection_client!(reflect_v1alpha, tonic_reflection::pb::v1alpha);

#[derive(Debug, Clone, Copy)]
enum Version {
    V1,
    V1alpha,
}

const VERSIONS: [Version; 2] = [Version::V1, Version::V1alpha];

async fn reflect(version: Version, channel: &Channel, ask: Ask) -> Answer {
    match version {
        Version::V1 => reflect_v1(channel.clone(), ask).await,
        Version::V1alpha => reflect_v1alpha(channel.clone(), ask).await,
    }
}

/// The file descriptors answering `ask`, which must succeed.
async fn files(version: Version, channel: &Channel, ask: Ask) -> Vec<FileDescriptorProto> {
    match reflect(version, channel, ask.clone()).await {
        Answer::Files(files) => {
            assert!(!files.is_empty(), "{version:?} {ask:?}: no descriptors");
            files
        }
        other => panic!("{version:?} {ask:?}: {other:?}"),
    }
}

/// The method names of `service` in `files`, panicking when no file declares it.
fn methods(files: &[FileDescriptorProto], package: &str, service: &str) -> Vec<String> {
    let file = files
        .iter()
        .find(|f| f.package() == package && f.service.iter().any(|s| s.name() == service))
        .unwrap_or_else(|| panic!("no descriptor declares {package}.{service}"));
    let service = file
        .service
        .iter()
        .find(|s| s.name() == service)
        .expect("found above");
    service.method.iter().map(|m| m.name().to_owned()).collect()
}

#[tokio::test]
async fn reflection_lists_the_broker_admin_and_health_services_in_v1_and_v1alpha() {
    let broker = broker().await;
    for version in VERSIONS {
        let Answer::Services(services) = reflect(version, &broker.channel, Ask::ListServices).await else {
            panic!("{version:?}: ListServices failed");
        };
        for expected in [
            "proxybroker.v1.ProxyBroker",
            "proxybroker.v1.ProxyBrokerAdmin",
            "grpc.health.v1.Health",
        ] {
            assert!(
                services.iter().any(|s| s == expected),
                "{version:?}: {expected} missing from {services:?}"
            );
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn reflection_describes_the_broker_service_and_its_methods() {
    let broker = broker().await;
    for version in VERSIONS {
        let files = files(
            version,
            &broker.channel,
            Ask::Symbol("proxybroker.v1.ProxyBroker".into()),
        )
        .await;
        assert_eq!(
            methods(&files, "proxybroker.v1", "ProxyBroker"),
            [
                "RequestProxy",
                "ReportFeedback",
                "WatchProxy",
                "ReportFeedbackStream"
            ],
            "{version:?}"
        );
        let broker_file = files.iter().find(|f| f.package() == "proxybroker.v1").unwrap();
        let request_proxy = broker_file.service[0]
            .method
            .iter()
            .find(|m| m.name() == "RequestProxy")
            .unwrap();
        assert_eq!(request_proxy.input_type(), ".proxybroker.v1.ProxyRequest");
        assert_eq!(request_proxy.output_type(), ".proxybroker.v1.ProxyResponse");
        let watch_proxy = broker_file.service[0]
            .method
            .iter()
            .find(|m| m.name() == "WatchProxy")
            .unwrap();
        assert_eq!(watch_proxy.input_type(), ".proxybroker.v1.ProxyRequest");
        assert_eq!(watch_proxy.output_type(), ".proxybroker.v1.ProxyResponse");
        assert!(watch_proxy.server_streaming() && !watch_proxy.client_streaming());
        let stream = broker_file.service[0]
            .method
            .iter()
            .find(|m| m.name() == "ReportFeedbackStream")
            .unwrap();
        assert_eq!(stream.input_type(), ".proxybroker.v1.ProxyFeedback");
        assert_eq!(
            stream.output_type(),
            ".proxybroker.v1.ReportFeedbackStreamResponse"
        );
        assert!(stream.client_streaming() && !stream.server_streaming());
    }
    broker.stop().await;
}

#[tokio::test]
async fn reflection_describes_the_admin_service_and_its_methods() {
    let broker = broker().await;
    for version in VERSIONS {
        let files = files(
            version,
            &broker.channel,
            Ask::Symbol("proxybroker.v1.ProxyBrokerAdmin".into()),
        )
        .await;
        assert_eq!(
            methods(&files, "proxybroker.v1", "ProxyBrokerAdmin"),
            [
                "ListUpstreams",
                "ListCache",
                "InvalidateCache",
                "GetEffectiveConfig",
                "ListProxies",
                "ListExchanges"
            ],
            "{version:?}"
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn reflection_describes_the_health_service() {
    let broker = broker().await;
    for version in VERSIONS {
        let files = files(
            version,
            &broker.channel,
            Ask::Symbol("grpc.health.v1.Health".into()),
        )
        .await;
        let methods = methods(&files, "grpc.health.v1", "Health");
        assert!(methods.iter().any(|m| m == "Check"), "{version:?}: {methods:?}");
        assert!(methods.iter().any(|m| m == "Watch"), "{version:?}: {methods:?}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn reflection_describes_the_request_message_so_grpcurl_can_build_requests() {
    let broker = broker().await;
    for version in VERSIONS {
        let files = files(
            version,
            &broker.channel,
            Ask::Symbol("proxybroker.v1.ProxyRequest".into()),
        )
        .await;
        let file = files
            .iter()
            .find(|f| f.message_type.iter().any(|m| m.name() == "ProxyRequest"))
            .unwrap_or_else(|| panic!("{version:?}: ProxyRequest not described"));
        assert_eq!(file.package(), "proxybroker.v1");
        let message = file
            .message_type
            .iter()
            .find(|m| m.name() == "ProxyRequest")
            .unwrap();
        let fields: Vec<(&str, i32)> = message.field.iter().map(|f| (f.name(), f.number())).collect();
        assert_eq!(
            fields,
            [
                ("exchange_id", 1),
                ("connection_type", 2),
                ("region", 3),
                ("client_id", 4),
                ("metadata", 5),
                ("sticky_key", 6)
            ],
            "{version:?}"
        );
        // grpcurl then fetches every import by file name: they must all be served.
        for dependency in &file.dependency {
            let deps = files_by_name(version, &broker.channel, dependency).await;
            assert!(
                deps.iter().any(|d| d.name() == dependency),
                "{version:?}: {dependency} not served"
            );
        }
        assert!(
            file.dependency
                .iter()
                .any(|d| d == "google/protobuf/struct.proto"),
            "{:?}",
            file.dependency
        );
    }
    broker.stop().await;
}

async fn files_by_name(version: Version, channel: &Channel, name: &str) -> Vec<FileDescriptorProto> {
    files(version, channel, Ask::File(name.into())).await
}

#[tokio::test]
async fn reflection_serves_every_import_of_the_admin_contract() {
    let broker = broker().await;
    for version in VERSIONS {
        let admin = files_by_name(version, &broker.channel, "proxybroker/v1/admin.proto").await;
        let admin = admin
            .iter()
            .find(|f| f.name() == "proxybroker/v1/admin.proto")
            .unwrap();
        assert!(
            admin
                .dependency
                .iter()
                .any(|d| d == "proxybroker/v1/broker.proto"),
            "{:?}",
            admin.dependency
        );
        for name in [
            "proxybroker/v1/broker.proto",
            "google/protobuf/struct.proto",
            "google/protobuf/timestamp.proto",
        ] {
            let served = files_by_name(version, &broker.channel, name).await;
            assert!(
                served.iter().any(|f| f.name() == name),
                "{version:?}: {name} not served"
            );
        }
    }
    broker.stop().await;
}

#[tokio::test]
async fn reflection_of_an_unknown_symbol_is_not_found() {
    let broker = broker().await;
    for version in VERSIONS {
        match reflect(
            version,
            &broker.channel,
            Ask::Symbol("proxybroker.v1.NoSuchThing".into()),
        )
        .await
        {
            Answer::Error(code, message) => {
                assert_eq!(code, Code::NotFound as i32, "{version:?}: {message}");
            }
            other => panic!("{version:?}: expected NOT_FOUND, got {other:?}"),
        }
    }
    broker.stop().await;
}
