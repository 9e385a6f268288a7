//! What the client does with each kind of broker answer, against a real tonic server on loopback
//! that answers what the test scripts: statuses that mean "no answer now" fall back locally,
//! refusals are surfaced, and nothing a broker sends (a huge TTL, a bad URL) makes it panic.
#![allow(clippy::unwrap_used)]

mod common;

use std::time::Duration;

use common::*;
use proxy_broker_client::{ConnectionType, Error, MAX_TTL, Source};
use tonic::Code;

/// Statuses the client treats like UNAVAILABLE: the broker could not decide right now.
const FALLS_BACK: &[Code] = &[
    Code::Unavailable,
    Code::ResourceExhausted,
    Code::Unknown,
    Code::Internal,
    Code::DeadlineExceeded,
    Code::Cancelled,
];

/// Statuses that say the feed is misconfigured: a fallback would hide them.
const SURFACED: &[Code] = &[
    Code::Unauthenticated,
    Code::InvalidArgument,
    Code::PermissionDenied,
    Code::Unimplemented,
    Code::NotFound,
    Code::FailedPrecondition,
];

#[tokio::test]
async fn statuses_meaning_no_answer_now_fall_back_to_the_local_configuration() {
    for &code in FALLS_BACK {
        let broker = ScriptedBroker::status(code, "scripted failure").await;
        let with_local = client(&broker.url())
            .local_config(local_env("socks5://127.0.0.1:1081"))
            .build()
            .unwrap();
        let r = with_local
            .resolve("binance", ConnectionType::Websocket, None)
            .await
            .unwrap_or_else(|e| panic!("{code:?}: {e}"));
        assert_eq!(r.source, Source::Local, "{code:?}");
        assert_eq!(r.proxy.unwrap().as_str(), "socks5://127.0.0.1:1081", "{code:?}");

        // Without a local configuration: fail closed, naming what the broker said...
        let strict = client(&broker.url()).build().unwrap();
        match strict.resolve("binance", ConnectionType::Websocket, None).await {
            Err(Error::NoRoute { reason }) => {
                assert!(reason.contains(&format!("{code:?}")), "{code:?}: {reason}");
            }
            other => panic!("{code:?}: expected NoRoute, got {other:?}"),
        }
        // ...or connect directly when the caller allowed it.
        let direct = client(&broker.url()).allow_direct_fallback(true).build().unwrap();
        let r = direct
            .resolve("binance", ConnectionType::Websocket, None)
            .await
            .unwrap();
        assert_eq!(r.source, Source::AllowedDirect, "{code:?}");
        assert!(broker.calls() >= 3, "{code:?}: the broker was asked each time");
    }
}

#[tokio::test]
async fn refusals_are_surfaced_and_never_replaced_by_a_fallback() {
    for &code in SURFACED {
        let broker = ScriptedBroker::status(code, "scripted refusal").await;
        let client = client(&broker.url())
            .local_config(local_env("socks5://127.0.0.1:1081"))
            .allow_direct_fallback(true)
            .build()
            .unwrap();
        match client.resolve("binance", ConnectionType::Http, None).await {
            Err(Error::Broker { code: got, message }) => {
                assert_eq!(got, code);
                assert_eq!(message, "scripted refusal", "{code:?}");
            }
            other => panic!("{code:?}: expected Error::Broker, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn after_a_shed_call_the_broker_is_left_alone_for_broker_retry_after() {
    // RESOURCE_EXHAUSTED marks the broker busy like UNAVAILABLE does: the client answers locally
    // without asking again until `broker_retry_after` has passed.
    let broker = ScriptedBroker::status(Code::ResourceExhausted, "shed").await;
    let client = client(&broker.url())
        .local_config(local_env("socks5://127.0.0.1:1081"))
        .broker_retry_after(Duration::from_secs(3600))
        .build()
        .unwrap();
    for _ in 0..3 {
        let r = client
            .resolve("binance", ConnectionType::Http, None)
            .await
            .unwrap();
        assert_eq!(r.source, Source::Local);
    }
    assert_eq!(broker.calls(), 1, "asked once, then left alone");
}

#[tokio::test]
async fn a_ttl_of_u32_max_seconds_is_capped_and_cached_without_a_panic() {
    let broker = ScriptedBroker::start(Script::Answer(answer("socks5://127.0.0.1:1082", u32::MAX))).await;
    // No cap of the client's own either: only MAX_TTL stands between the answer and the clock.
    let client = client(&broker.url())
        .max_cache_ttl(Duration::MAX)
        .build()
        .unwrap();
    let first = client
        .resolve("binance", ConnectionType::Http, None)
        .await
        .unwrap();
    assert_eq!(first.ttl, MAX_TTL);
    let again = client
        .resolve("binance", ConnectionType::Http, None)
        .await
        .unwrap();
    assert_eq!(again.proxy, first.proxy);
    assert_eq!(broker.calls(), 1, "the second answer came from the cache");
}

#[tokio::test]
async fn an_unusable_proxy_url_from_the_broker_is_an_error_without_its_secret() {
    let broker = ScriptedBroker::start(Script::Answer(answer("ftp://user:SECRETPASS@h:21", 60))).await;
    let client = client(&broker.url()).build().unwrap();
    let err = client
        .resolve("binance", ConnectionType::Http, None)
        .await
        .unwrap_err();
    assert!(matches!(err, Error::ProxyUrl(_)), "{err}");
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains("SECRETPASS"), "{shown}");
}
