//! proxy-broker: a gRPC service that tells crypto market-data feeds which proxy to use.
//!
//! Modules, one concern each: [`config`] (the configuration file), [`request`] (request
//! validation), [`broker`] (the decision), [`service`] and [`admin`] (gRPC glue), [`server`]
//! (wiring), [`error`] (errors and their status codes), [`pb`] (generated code).

pub mod admin;
pub mod broker;
pub mod config;
pub mod error;
pub mod pb;
pub mod request;
pub mod server;
pub mod service;

pub use config::BrokerConfig;
pub use server::run;
