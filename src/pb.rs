//! Generated code for the `proxybroker.v1` contract (from `proto/`), quarantined here: never edited,
//! never mixed with logic.

#![allow(missing_docs, missing_debug_implementations, clippy::all, clippy::pedantic)]

tonic::include_proto!("proxybroker.v1");

/// Encoded descriptors of `proto/`, served by reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = tonic::include_file_descriptor_set!("proxybroker_descriptor");

/// The server side of `proxybroker.v1.ProxyBroker` generated again with
/// [`crate::wire::ProxyAnswer`] as its `ProxyResponse` (see `build.rs`); the messages are this
/// module's. The `proxy_broker_server` above is generated too but not served.
pub mod wire {
    include!(concat!(env!("OUT_DIR"), "/wire_server/proxybroker.v1.rs"));
}
