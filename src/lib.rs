//! proxy-broker: a gRPC service that tells crypto market-data feeds which proxy to use.
//!
//! Modules, one concern each: [`config`] (the configuration file; its `brokering:` block is
//! [`brokering::config`]), [`request`] (request validation), [`broker`] (the decision),
//! [`brokering`] (feed-aware brokering), [`upstream`] (HTTP client, endpoints, auth), [`breaker`]
//! (per-endpoint circuit breakers), [`cache`] and [`flight`] (answer cache, detached single
//! flight), [`feedback`] (background forwarding), [`service`] and [`admin`] (gRPC glue), [`server`]
//! (wiring), [`clock`] (time source), [`codec`] (the protobuf codec: small encode buffers),
//! [`json`] (Struct ↔ JSON), [`error`] (errors and their status codes), [`pb`] (generated code).

pub mod admin;
pub mod auth;
pub mod breaker;
pub mod broker;
pub mod brokering;
pub mod cache;
pub mod clock;
pub mod codec;
pub mod config;
pub mod error;
pub mod feedback;
pub mod flight;
pub mod hit;
pub mod json;
pub mod limits;
pub mod metrics;
pub mod pb;
pub mod reload;
pub mod request;
pub mod server;
pub mod service;
pub mod state;
pub mod store;
mod sync;
pub mod telemetry;
pub mod tls;
pub mod upstream;
pub mod wire;

pub use config::BrokerConfig;
pub use server::{run, serve};
