//! The gRPC contract seen from a client: request validation (INVALID_ARGUMENT naming the field, with
//! every boundary value accepted), feedback receipts, and the admin service.
mod common;

use common::TestBroker;
use prost::Message;
use proxy_broker::pb::{
    ConnectionType, GetEffectiveConfigRequest, InvalidateCacheRequest, ListCacheRequest,
    ListUpstreamsRequest, ProxyFeedback, ProxyRequest, ProxyResponse, ProxySource, ReportFeedbackResponse,
    invalidate_cache_request,
};
use proxy_broker::request::{
    MAX_CLIENT_ID_LEN, MAX_ERROR_DETAILS_LEN, MAX_METADATA_BYTES, MAX_REGION_LEN, MAX_STICKY_KEY_LEN,
};
use tonic::{Code, Status};

const EXAMPLE: &str = include_str!("../examples/broker.yaml");

async fn broker() -> TestBroker {
    TestBroker::start_yaml(EXAMPLE, &[]).await
}

/// A valid request for binance over HTTP; each test breaks one field.
fn request() -> ProxyRequest {
    ProxyRequest {
        exchange_id: "binance".into(),
        connection_type: ConnectionType::Http.into(),
        ..Default::default()
    }
}

/// A valid failure report for the proxy the example hands out for binance over HTTP.
fn feedback() -> ProxyFeedback {
    ProxyFeedback {
        proxy_url: "http://binance-proxy:8080".into(),
        exchange_id: "binance".into(),
        connection_type: ConnectionType::Http.into(),
        success: false,
        latency_ms: Some(120),
        error_details: Some("connect timed out".into()),
        timestamp: None,
        client_id: "cryptofeed-host1-4242".into(),
        http_status: None,
        retry_after_seconds: None,
    }
}

async fn ask(broker: &TestBroker, req: ProxyRequest) -> Result<ProxyResponse, Status> {
    broker
        .client()
        .request_proxy(req)
        .await
        .map(tonic::Response::into_inner)
}

async fn report(broker: &TestBroker, fb: ProxyFeedback) -> Result<ReportFeedbackResponse, Status> {
    broker
        .client()
        .report_feedback(fb)
        .await
        .map(tonic::Response::into_inner)
}

/// Asserts INVALID_ARGUMENT whose message starts with `<field>: `, and returns the message.
#[track_caller]
fn assert_invalid<T: std::fmt::Debug>(result: Result<T, Status>, field: &str) -> String {
    let status = result.expect_err("the request must be rejected");
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    let message = status.message().to_owned();
    assert!(
        message.starts_with(&format!("{field}: ")),
        "message {message:?} does not name the field {field:?}"
    );
    message
}

/// Asserts the example's answer for binance over HTTP.
#[track_caller]
fn assert_binance_http(result: Result<ProxyResponse, Status>) {
    let answer = result.expect("the request must be accepted");
    assert_eq!(answer.proxy_url, "http://binance-proxy:8080");
    assert_eq!(answer.source(), ProxySource::Embedded);
}

/// A `Struct` whose encoding is exactly `size` bytes.
fn metadata_of_encoded_size(size: usize) -> prost_types::Struct {
    for key_len in 1..=4 {
        for text_len in size.saturating_sub(32)..=size {
            let value = prost_types::Value {
                kind: Some(prost_types::value::Kind::StringValue("v".repeat(text_len))),
            };
            let metadata = prost_types::Struct {
                fields: [("k".repeat(key_len), value)].into_iter().collect(),
            };
            if metadata.encoded_len() == size {
                return metadata;
            }
        }
    }
    panic!("no Struct encodes to exactly {size} bytes");
}

// --- RequestProxy: exchange_id ---------------------------------------------------------------

#[tokio::test]
async fn empty_exchange_id_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    let message = assert_invalid(
        ask(
            &broker,
            ProxyRequest {
                exchange_id: String::new(),
                ..request()
            },
        )
        .await,
        "exchange_id",
    );
    assert!(message.contains("must not be empty"), "{message}");
    broker.stop().await;
}

#[tokio::test]
async fn exchange_id_of_65_characters_is_invalid_argument_and_64_is_accepted() {
    let broker = broker().await;
    let message = assert_invalid(
        ask(
            &broker,
            ProxyRequest {
                exchange_id: "a".repeat(65),
                ..request()
            },
        )
        .await,
        "exchange_id",
    );
    assert!(message.contains("65 characters"), "{message}");
    // 64 characters is valid; nothing is configured for it, so the default proxy answers.
    let answer = ask(
        &broker,
        ProxyRequest {
            exchange_id: "a".repeat(64),
            ..request()
        },
    )
    .await
    .expect("a 64-character exchange_id is valid");
    assert_eq!(answer.proxy_url, "socks5://proxy.example.com:1080");
    broker.stop().await;
}

#[tokio::test]
async fn exchange_id_with_a_space_or_slash_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    for (id, shown) in [("bin ance", "' '"), ("binance/us", "'/'"), ("binancé", "'é'")] {
        let message = assert_invalid(
            ask(
                &broker,
                ProxyRequest {
                    exchange_id: id.into(),
                    ..request()
                },
            )
            .await,
            "exchange_id",
        );
        assert!(message.contains(shown), "{id:?}: {message}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn exchange_id_with_dots_dashes_underscores_and_any_case_is_accepted() {
    let broker = broker().await;
    assert_binance_http(
        ask(
            &broker,
            ProxyRequest {
                exchange_id: "BiNaNcE".into(),
                ..request()
            },
        )
        .await,
    );
    let answer = ask(
        &broker,
        ProxyRequest {
            exchange_id: "binance_futures.v2-test".into(),
            ..request()
        },
    )
    .await
    .expect("[A-Za-z0-9._-] is valid");
    assert_eq!(answer.proxy_url, "socks5://proxy.example.com:1080");
    broker.stop().await;
}

// --- RequestProxy: connection_type -----------------------------------------------------------

#[tokio::test]
async fn unspecified_connection_type_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    let message = assert_invalid(
        ask(
            &broker,
            ProxyRequest {
                connection_type: ConnectionType::Unspecified.into(),
                ..request()
            },
        )
        .await,
        "connection_type",
    );
    assert!(message.contains("UNSPECIFIED"), "{message}");
    broker.stop().await;
}

#[tokio::test]
async fn unknown_connection_type_value_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    for raw in [9, -1, 3] {
        let message = assert_invalid(
            ask(
                &broker,
                ProxyRequest {
                    connection_type: raw,
                    ..request()
                },
            )
            .await,
            "connection_type",
        );
        assert!(message.contains(&format!("unknown value {raw}")), "{message}");
    }
    broker.stop().await;
}

// --- RequestProxy: region, client_id, metadata -----------------------------------------------

#[tokio::test]
async fn region_over_64_bytes_is_invalid_argument_and_64_bytes_is_accepted() {
    let broker = broker().await;
    let message = assert_invalid(
        ask(
            &broker,
            ProxyRequest {
                region: Some("r".repeat(MAX_REGION_LEN + 1)),
                ..request()
            },
        )
        .await,
        "region",
    );
    assert!(message.contains("65 bytes"), "{message}");
    // Bytes, not characters: 33 characters that take 65 bytes are too long.
    let multibyte = format!("{}x", "é".repeat(32));
    assert_eq!((multibyte.len(), multibyte.chars().count()), (65, 33));
    assert_invalid(
        ask(
            &broker,
            ProxyRequest {
                region: Some(multibyte),
                ..request()
            },
        )
        .await,
        "region",
    );

    assert_binance_http(
        ask(
            &broker,
            ProxyRequest {
                region: Some("r".repeat(MAX_REGION_LEN)),
                ..request()
            },
        )
        .await,
    );
    assert_binance_http(
        ask(
            &broker,
            ProxyRequest {
                region: Some(String::new()),
                ..request()
            },
        )
        .await,
    );
    broker.stop().await;
}

#[tokio::test]
async fn client_id_over_256_bytes_is_invalid_argument_and_256_bytes_is_accepted() {
    let broker = broker().await;
    let message = assert_invalid(
        ask(
            &broker,
            ProxyRequest {
                client_id: "c".repeat(MAX_CLIENT_ID_LEN + 1),
                ..request()
            },
        )
        .await,
        "client_id",
    );
    assert!(message.contains("257 bytes"), "{message}");
    assert_binance_http(
        ask(
            &broker,
            ProxyRequest {
                client_id: "c".repeat(MAX_CLIENT_ID_LEN),
                ..request()
            },
        )
        .await,
    );
    broker.stop().await;
}

#[tokio::test]
async fn metadata_over_8_kib_encoded_is_invalid_argument_and_8_kib_is_accepted() {
    let broker = broker().await;
    let too_big = metadata_of_encoded_size(MAX_METADATA_BYTES + 1);
    let message = assert_invalid(
        ask(
            &broker,
            ProxyRequest {
                metadata: Some(too_big),
                ..request()
            },
        )
        .await,
        "metadata",
    );
    assert!(message.contains("8193 bytes"), "{message}");

    let at_limit = metadata_of_encoded_size(MAX_METADATA_BYTES);
    assert_binance_http(
        ask(
            &broker,
            ProxyRequest {
                metadata: Some(at_limit),
                ..request()
            },
        )
        .await,
    );
    let nested = prost_types::Struct {
        fields: [(
            "tags".to_owned(),
            prost_types::Value {
                kind: Some(prost_types::value::Kind::ListValue(prost_types::ListValue {
                    values: vec![prost_types::Value {
                        kind: Some(prost_types::value::Kind::BoolValue(true)),
                    }],
                })),
            },
        )]
        .into_iter()
        .collect(),
    };
    assert_binance_http(
        ask(
            &broker,
            ProxyRequest {
                metadata: Some(nested),
                ..request()
            },
        )
        .await,
    );
    broker.stop().await;
}

#[tokio::test]
async fn request_with_every_field_at_its_limit_is_answered() {
    let broker = broker().await;
    let req = ProxyRequest {
        exchange_id: "B".repeat(64),
        connection_type: ConnectionType::Websocket.into(),
        region: Some("r".repeat(MAX_REGION_LEN)),
        client_id: "c".repeat(MAX_CLIENT_ID_LEN),
        metadata: Some(metadata_of_encoded_size(MAX_METADATA_BYTES)),
        sticky_key: Some("~".repeat(MAX_STICKY_KEY_LEN)),
    };
    let answer = ask(&broker, req).await.expect("limits are inclusive");
    assert_eq!(answer.proxy_url, "socks5://proxy.example.com:1081");
    assert_eq!(answer.source(), ProxySource::Embedded);
    broker.stop().await;
}

// --- ReportFeedback --------------------------------------------------------------------------

#[tokio::test]
async fn feedback_proxy_url_that_does_not_parse_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    for url in [
        "not a url",
        "socks5://[::1:1080",
        "://no-scheme:1080",
        "socks5://host:99999",
    ] {
        let message = assert_invalid(
            report(
                &broker,
                ProxyFeedback {
                    proxy_url: url.into(),
                    ..feedback()
                },
            )
            .await,
            "proxy_url",
        );
        assert!(
            message.contains(url),
            "the message shows the offending value {url:?}: {message}"
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn feedback_proxy_url_without_port_is_invalid_argument_and_hides_the_password() {
    let broker = broker().await;
    let message = assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                proxy_url: "socks5://proxy.example.com".into(),
                ..feedback()
            },
        )
        .await,
        "proxy_url",
    );
    assert!(message.contains("no port"), "{message}");
    let message = assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                proxy_url: "socks5://alice:hunter2@p1".into(),
                ..feedback()
            },
        )
        .await,
        "proxy_url",
    );
    assert!(message.contains("no port"), "{message}");
    assert!(message.contains("***@p1"), "{message}");
    assert!(!message.contains("hunter2"), "the password leaked: {message}");
    broker.stop().await;
}

#[tokio::test]
async fn feedback_proxy_url_with_a_bad_scheme_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    for url in ["ftp://proxy.example.com:21", "tcp://proxy.example.com:1080"] {
        let message = assert_invalid(
            report(
                &broker,
                ProxyFeedback {
                    proxy_url: url.into(),
                    ..feedback()
                },
            )
            .await,
            "proxy_url",
        );
        assert!(message.contains("scheme"), "{url}: {message}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn feedback_with_empty_exchange_id_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                exchange_id: String::new(),
                ..feedback()
            },
        )
        .await,
        "exchange_id",
    );
    assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                exchange_id: "a".repeat(65),
                ..feedback()
            },
        )
        .await,
        "exchange_id",
    );
    broker.stop().await;
}

#[tokio::test]
async fn feedback_with_unspecified_or_unknown_connection_type_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                connection_type: ConnectionType::Unspecified.into(),
                ..feedback()
            },
        )
        .await,
        "connection_type",
    );
    assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                connection_type: 9,
                ..feedback()
            },
        )
        .await,
        "connection_type",
    );
    broker.stop().await;
}

#[tokio::test]
async fn feedback_error_details_over_4_kib_is_invalid_argument_and_4_kib_is_accepted() {
    let broker = broker().await;
    let message = assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                error_details: Some("e".repeat(MAX_ERROR_DETAILS_LEN + 1)),
                ..feedback()
            },
        )
        .await,
        "error_details",
    );
    assert!(message.contains("4097 bytes"), "{message}");
    let receipt = report(
        &broker,
        ProxyFeedback {
            error_details: Some("e".repeat(MAX_ERROR_DETAILS_LEN)),
            ..feedback()
        },
    )
    .await
    .expect("4 KiB of error_details is valid");
    assert!(receipt.accepted);
    broker.stop().await;
}

#[tokio::test]
async fn feedback_client_id_over_256_bytes_is_invalid_argument_and_256_is_accepted() {
    let broker = broker().await;
    let message = assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                client_id: "c".repeat(MAX_CLIENT_ID_LEN + 1),
                ..feedback()
            },
        )
        .await,
        "client_id",
    );
    assert!(message.contains("257 bytes"), "{message}");
    let receipt = report(
        &broker,
        ProxyFeedback {
            client_id: "c".repeat(MAX_CLIENT_ID_LEN),
            ..feedback()
        },
    )
    .await
    .expect("a 256-byte client_id is valid");
    assert!(receipt.accepted);
    broker.stop().await;
}

#[tokio::test]
async fn feedback_timestamp_with_nanos_out_of_range_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    for nanos in [1_000_000_000, 2_000_000_000, -1] {
        let ts = prost_types::Timestamp {
            seconds: 1_700_000_000,
            nanos,
        };
        assert_invalid(
            report(
                &broker,
                ProxyFeedback {
                    timestamp: Some(ts),
                    ..feedback()
                },
            )
            .await,
            "timestamp",
        );
    }
    broker.stop().await;
}

#[tokio::test]
async fn feedback_timestamp_outside_the_representable_range_is_invalid_argument_naming_the_field() {
    let broker = broker().await;
    let ts = prost_types::Timestamp {
        seconds: i64::MIN,
        nanos: 0,
    };
    let message = assert_invalid(
        report(
            &broker,
            ProxyFeedback {
                timestamp: Some(ts),
                ..feedback()
            },
        )
        .await,
        "timestamp",
    );
    assert!(message.contains("not a valid"), "{message}");
    broker.stop().await;
}

#[tokio::test]
async fn valid_feedback_with_and_without_timestamp_is_accepted() {
    let broker = broker().await;
    let without = report(&broker, feedback()).await.expect("no timestamp means now");
    assert!(without.accepted);
    let ts = prost_types::Timestamp {
        seconds: 1_700_000_000,
        nanos: 999_999_999,
    };
    let with = report(
        &broker,
        ProxyFeedback {
            timestamp: Some(ts),
            ..feedback()
        },
    )
    .await
    .expect("a valid timestamp");
    assert!(with.accepted);
    let success = report(
        &broker,
        ProxyFeedback {
            success: true,
            error_details: None,
            latency_ms: None,
            client_id: String::new(),
            ..feedback()
        },
    )
    .await
    .expect("minimal success report");
    assert!(success.accepted);
    broker.stop().await;
}

#[tokio::test]
async fn feedback_with_empty_proxy_url_reports_a_direct_connection_and_is_accepted() {
    let broker = broker().await;
    let receipt = report(
        &broker,
        ProxyFeedback {
            proxy_url: String::new(),
            ..feedback()
        },
    )
    .await
    .expect("empty proxy_url means direct");
    assert!(receipt.accepted);
    broker.stop().await;
}

#[tokio::test]
async fn feedback_for_every_allowed_scheme_and_an_unknown_proxy_is_accepted() {
    let broker = broker().await;
    for url in [
        "http://h:1",
        "https://h:443",
        "socks4://h:1080",
        "socks4a://h:1080",
        "socks5://alice:pw@h:1080",
        "socks5h://[::1]:1080",
    ] {
        let receipt = report(
            &broker,
            ProxyFeedback {
                proxy_url: url.into(),
                ..feedback()
            },
        )
        .await
        .unwrap_or_else(|s| panic!("{url}: {s:?}"));
        assert!(receipt.accepted, "{url}");
    }
    broker.stop().await;
}

#[tokio::test]
async fn failure_feedback_does_not_disturb_later_answers() {
    let broker = broker().await;
    let first = broker.ask("binance", ConnectionType::Websocket).await;
    let receipt = report(
        &broker,
        ProxyFeedback {
            proxy_url: first.proxy_url.clone(),
            connection_type: ConnectionType::Websocket.into(),
            ..feedback()
        },
    )
    .await
    .unwrap();
    assert!(receipt.accepted);
    let second = broker.ask("binance", ConnectionType::Websocket).await;
    assert_eq!(
        (first.proxy_url.as_str(), second.proxy_url.as_str()),
        ("socks5://de-1:1080", "socks5://nl-1:1080")
    );
    broker.stop().await;
}

// --- Admin -----------------------------------------------------------------------------------

const SECRETS_YAML: &str = r#"
server:
  shutdown_grace_seconds: 7
proxy:
  enabled: true
  external_service:
    enabled: true
    endpoints: ["https://svc-one.internal:8443"]
    auth_method: bearer_token
    auth_credentials: { token: "tok-SECRET-123" }
    cache_ttl_seconds: 120
  default:
    http: { url: "socks5://alice:pw-SECRET-456@proxy.internal:1080", timeout_seconds: 12 }
  exchanges:
    kraken:
      ws: "http://bob:pw-SECRET-789@ws-proxy.internal:3128"
"#;

#[tokio::test]
async fn effective_config_is_json_of_the_loaded_values_with_every_secret_masked() {
    let broker = TestBroker::start_yaml(
        SECRETS_YAML,
        &[("CRYPTOFEED_PROXY_EXTERNAL_SERVICE__TIMEOUT_SECONDS", "17")],
    )
    .await;
    let text = broker
        .admin()
        .get_effective_config(GetEffectiveConfigRequest {})
        .await
        .unwrap()
        .into_inner()
        .config_json;
    for secret in ["tok-SECRET-123", "pw-SECRET-456", "pw-SECRET-789", "SECRET"] {
        assert!(!text.contains(secret), "{secret} leaked:\n{text}");
    }
    let json: serde_json::Value = serde_json::from_str(&text).expect("config_json is JSON");
    let external = &json["proxy"]["external_service"];
    assert_eq!(external["auth_credentials"]["token"], "***");
    assert_eq!(external["endpoints"][0], "https://svc-one.internal:8443");
    assert_eq!(external["auth_method"], "bearer_token");
    assert_eq!(external["cache_ttl_seconds"], 120);
    assert_eq!(
        external["timeout_seconds"], 17,
        "the environment layer is applied"
    );
    assert_eq!(external["enabled"], true);
    assert_eq!(
        json["proxy"]["default"]["http"]["url"],
        "socks5://***@proxy.internal:1080"
    );
    assert_eq!(json["proxy"]["default"]["http"]["timeout_seconds"], 12);
    assert_eq!(
        json["proxy"]["exchanges"]["kraken"]["websocket"]["url"],
        "http://***@ws-proxy.internal:3128"
    );
    assert_eq!(json["server"]["shutdown_grace_seconds"], 7);
    assert_eq!(
        json["server"]["listen"], "0.0.0.0:50051",
        "defaults are filled in"
    );
    broker.stop().await;
}

#[tokio::test]
async fn effective_config_of_the_example_reflects_the_file() {
    let broker = broker().await;
    let text = broker
        .admin()
        .get_effective_config(GetEffectiveConfigRequest {})
        .await
        .unwrap()
        .into_inner()
        .config_json;
    let json: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert_eq!(json["proxy"]["enabled"], true);
    assert_eq!(
        json["proxy"]["exchanges"]["binance"]["http"]["url"],
        "http://binance-proxy:8080"
    );
    assert_eq!(
        json["proxy"]["exchanges"]["binance"]["http"]["timeout_seconds"],
        15
    );
    assert_eq!(
        json["proxy"]["exchanges"]["coinbase"]["http"]["url"], "http://coinbase-proxy:3128",
        "the `rest` shorthand is shown as http"
    );
    assert_eq!(json["server"]["metrics_listen"], "0.0.0.0:9090");
    assert_eq!(json["server"]["shutdown_grace_seconds"], 10);
    assert_eq!(json["proxy"]["external_service"]["enabled"], false);
    broker.stop().await;
}

#[tokio::test]
async fn admin_rpcs_report_delegation_off_and_an_empty_cache_when_upstreams_are_disabled() {
    let broker = broker().await;
    let mut admin = broker.admin();
    let upstreams = admin
        .list_upstreams(ListUpstreamsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(!upstreams.delegation_enabled);
    assert!(upstreams.upstreams.is_empty());
    let cache = admin
        .list_cache(ListCacheRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(cache.entries.is_empty());
    let removed = admin
        .invalidate_cache(InvalidateCacheRequest {
            target: Some(invalidate_cache_request::Target::All(true)),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(removed.removed, 0);
    let status = admin
        .invalidate_cache(InvalidateCacheRequest { target: None })
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert!(status.message().starts_with("target"), "{status:?}");
    broker.stop().await;
}

/// Sends `message` (of any type) to `path` as its request, as a client of another schema would.
async fn send_as<M: Message + Default + Send + 'static>(
    broker: &TestBroker,
    path: &'static str,
    message: M,
) -> Result<ProxyResponse, Status> {
    let mut grpc = tonic::client::Grpc::new(broker.channel.clone());
    grpc.ready().await.expect("the channel connects");
    let codec = tonic_prost::ProstCodec::<M, ProxyResponse>::default();
    grpc.unary(
        tonic::Request::new(message),
        tonic::codegen::http::uri::PathAndQuery::from_static(path),
        codec,
    )
    .await
    .map(tonic::Response::into_inner)
}

/// Sends `message` as a `RequestProxy` request: it must be refused as tonic-prost's decoder
/// refuses it (INTERNAL with prost's message); returns the message.
async fn assert_refused_as_prost_refuses<M: Message + Default + Send + 'static>(
    broker: &TestBroker,
    message: M,
) -> String {
    let expected = ProxyRequest::decode(message.encode_to_vec().as_slice())
        .expect_err("the message is not a ProxyRequest")
        .to_string();
    let status = send_as(broker, "/proxybroker.v1.ProxyBroker/RequestProxy", message)
        .await
        .expect_err("the broker refuses it");
    assert_eq!(status.code(), Code::Internal, "{status:?}");
    assert_eq!(status.message(), expected);
    expected
}

#[tokio::test]
async fn a_request_that_does_not_decode_is_internal_with_prost_s_error_and_the_server_keeps_serving() {
    let b = broker().await;
    // Field 1 as a varint: `exchange_id` is a string.
    let message = assert_refused_as_prost_refuses(&b, prost_types::Duration { seconds: 7, nanos: 0 }).await;
    assert!(message.contains("ProxyRequest.exchange_id"), "{message}");
    // `exchange_id` that is not UTF-8 (the request decoder's slow path).
    let not_utf8 = NotUtf8 {
        exchange_id: vec![0xff, 0xfe, b'x'],
    };
    assert_refused_as_prost_refuses(&b, not_utf8).await;
    assert_binance_http(ask(&b, request()).await);
    b.stop().await;
}

/// `ProxyRequest`'s field 1 as bytes, so that a test can send a non-UTF-8 `exchange_id`.
#[derive(Clone, PartialEq, prost::Message)]
struct NotUtf8 {
    #[prost(bytes = "vec", tag = "1")]
    exchange_id: Vec<u8>,
}
