//! Generated gRPC stubs for the whole `proxybroker.v1` contract (`proto/proxybroker/v1/`), clients
//! only: `proxy_broker_client::ProxyBrokerClient` (feeds) and
//! `proxy_broker_admin_client::ProxyBrokerAdminClient` (operators). Quarantined here: never edited,
//! never mixed with logic.

#![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]

tonic::include_proto!("proxybroker.v1");
