//! The proxy configuration that cryptofeed feeds use today, shared by the `proxy-broker` server and
//! the `proxy-broker-client` crate so that both resolve proxies with one copy of the code.
//!
//! - [`model`]: the configuration types (`proxy:` block, including `external_service`).
//! - [`load`]: layered loading (defaults → YAML → environment) on top of the `config` crate.
//! - [`validate`]: the rules, reported with key path, value and rule.
//! - [`embedded`]: the embedded resolver with proxy pools and leases.
//! - [`redact`]: keeping secrets out of logs, errors, `Debug` and admin output ([`Secret`]).

pub mod embedded;
pub mod load;
pub mod model;
pub mod redact;
pub mod validate;

pub use embedded::{ConnectionType, EmbeddedResolver, Resolution};
pub use load::{ConfigError, EnvMapping, Loader, Problem};
pub use model::{
    AuthMethod, ConnectionProxies, ExternalServiceConfig, PoolConfig, PoolMember, ProxyConfig, ProxySettings,
    Strategy,
};
pub use redact::Secret;
