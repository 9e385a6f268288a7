//! The local embedded configuration: what the feed would have used without a broker, read the way
//! cryptofeed reads it (`CRYPTOFEED_PROXY_*` environment over an optional YAML file's `proxy:`
//! block) with the broker's own model, loader and resolver from `proxy-broker-core`.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use proxy_broker_core::load::{Problems, Validate};
use proxy_broker_core::{ConnectionType, EmbeddedResolver, EnvMapping, Loader, ProxySettings};
use serde::Deserialize;

use crate::error::Error;
use crate::resolve::Resolved;

/// Environment prefix of cryptofeed's proxy settings.
pub const PROXY_ENV_PREFIX: &str = "CRYPTOFEED_PROXY_";
/// Environment variable naming a YAML file whose `proxy:` block is the local configuration.
pub const CONFIG_FILE_ENV: &str = "PROXY_BROKER_CLIENT_CONFIG";

/// Where the local embedded configuration comes from. Its `Debug` shows variable names and paths,
/// never values (they hold proxy credentials and tokens).
#[derive(Clone, Default)]
pub enum LocalConfig {
    /// The process environment: `CRYPTOFEED_PROXY_*` variables over the YAML file named by
    /// `PROXY_BROKER_CLIENT_CONFIG`. Absent when neither is set.
    #[default]
    FromEnv,
    /// These variables instead of the process environment (same rules as `FromEnv`).
    EnvVars(Vec<(String, String)>),
    /// This YAML file (its `proxy:` block), under the process's `CRYPTOFEED_PROXY_*` variables.
    File(PathBuf),
    /// Settings built in code.
    Settings(Box<ProxySettings>),
    /// No local configuration: when the broker is unavailable, fail (or connect directly if
    /// allowed).
    None,
}

impl fmt::Debug for LocalConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            LocalConfig::FromEnv => f.write_str("FromEnv"),
            LocalConfig::EnvVars(vars) => f
                .debug_tuple("EnvVars")
                .field(&vars.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>())
                .finish(),
            LocalConfig::File(path) => f.debug_tuple("File").field(path).finish(),
            LocalConfig::Settings(_) => f.write_str("Settings(..)"),
            LocalConfig::None => f.write_str("None"),
        }
    }
}

/// A cryptofeed configuration file: the `proxy:` block; other top-level keys (the feed's own
/// settings) are ignored.
#[derive(Debug, Deserialize)]
struct FeedConfigFile {
    #[serde(default)]
    proxy: ProxySettings,
}

impl Validate for FeedConfigFile {
    fn validate(&self, _path: &str, problems: &mut Problems) {
        self.proxy.validate("proxy", problems);
    }
}

/// A loaded local configuration with its resolver (pool rotation and leases live here).
pub(crate) struct Local {
    resolver: EmbeddedResolver,
    ttl: Duration,
}

/// By hand: the resolver holds the proxy URLs, credentials included.
impl fmt::Debug for Local {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Local")
            .field("ttl", &self.ttl)
            .finish_non_exhaustive()
    }
}

impl Local {
    /// Loads `spec`; `Ok(None)` when it names no configuration.
    pub(crate) fn load(spec: &LocalConfig) -> Result<Option<Self>, Error> {
        let settings = match spec {
            LocalConfig::None => return Ok(None),
            LocalConfig::Settings(settings) => {
                let mut problems = Problems::default();
                settings.validate("proxy", &mut problems);
                problems.into_result()?;
                (**settings).clone()
            }
            LocalConfig::FromEnv => match from_vars(process_env(), None)? {
                Some(s) => s,
                None => return Ok(None),
            },
            LocalConfig::EnvVars(vars) => match from_vars(vars.clone(), None)? {
                Some(s) => s,
                None => return Ok(None),
            },
            LocalConfig::File(path) => match from_vars(process_env(), Some(path.clone()))? {
                Some(s) => s,
                None => return Ok(None),
            },
        };
        let ttl = Duration::from_secs(settings.external_service.cache_ttl_seconds.unsigned_abs());
        Ok(Some(Self {
            resolver: EmbeddedResolver::new(&settings, ttl),
            ttl,
        }))
    }

    /// cryptofeed's `get_proxy(exchange, connection_type)`, pools included.
    pub(crate) fn resolve(&self, exchange: &str, connection_type: ConnectionType) -> Result<Resolved, Error> {
        Resolved::local(self.resolver.resolve(exchange, connection_type), self.ttl)
    }

    /// A failure of `proxy_url`: ends its oldest `least_connections` lease.
    pub(crate) fn release(&self, proxy_url: &str) {
        self.resolver.release(proxy_url);
    }
}

fn process_env() -> Vec<(String, String)> {
    std::env::vars_os()
        .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
        .collect()
}

/// Largest list index a `CRYPTOFEED_PROXY_*` variable name may carry (`...__PROXIES__9999__URL`).
///
/// The shared loader fills a list up to the index it is given, so a name like
/// `...__PROXIES__99999999999__URL` would have it allocate terabytes and abort the process; the
/// client refuses such names before loading.
pub const MAX_ENV_LIST_INDEX: u64 = 9_999;

/// Refuses variable names with a list index above [`MAX_ENV_LIST_INDEX`], naming the variable.
fn check_list_indexes(vars: &[(String, String)]) -> Result<(), Error> {
    for (name, _) in vars {
        if !name.to_ascii_uppercase().starts_with(PROXY_ENV_PREFIX) {
            continue;
        }
        let too_big = name[PROXY_ENV_PREFIX.len()..].split("__").any(|segment| {
            !segment.is_empty()
                && segment.bytes().all(|b| b.is_ascii_digit())
                && !segment.parse::<u64>().is_ok_and(|i| i <= MAX_ENV_LIST_INDEX)
        });
        if too_big {
            return Err(Error::Settings(format!(
                "environment variable {name}: a list index must be at most {MAX_ENV_LIST_INDEX}"
            )));
        }
    }
    Ok(())
}

/// Loads from `vars` and a file (explicit, else named by `PROXY_BROKER_CLIENT_CONFIG`); `None`
/// when there is neither a file nor any `CRYPTOFEED_PROXY_*` variable.
fn from_vars(vars: Vec<(String, String)>, file: Option<PathBuf>) -> Result<Option<ProxySettings>, Error> {
    let file = file.or_else(|| {
        vars.iter()
            .find(|(k, v)| k.eq_ignore_ascii_case(CONFIG_FILE_ENV) && !v.is_empty())
            .map(|(_, v)| PathBuf::from(v))
    });
    let has_env = vars
        .iter()
        .any(|(k, _)| k.to_ascii_uppercase().starts_with(PROXY_ENV_PREFIX));
    if file.is_none() && !has_env {
        return Ok(None);
    }
    check_list_indexes(&vars)?;
    let mut loader = Loader::new()
        .env_mapping(EnvMapping::new(PROXY_ENV_PREFIX, "proxy"))
        .env_vars(vars)
        .proxy_block("proxy")
        .table("proxy.external_service");
    if let Some(path) = file {
        if !path.is_file() {
            return Err(Error::Settings(format!(
                "local proxy configuration file '{}' does not exist",
                path.display()
            )));
        }
        loader = loader.file(path);
    }
    Ok(Some(loader.load::<FeedConfigFile>()?.proxy))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> LocalConfig {
        LocalConfig::EnvVars(
            pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        )
    }

    #[test]
    fn no_variables_and_no_file_means_no_local_configuration() {
        assert!(Local::load(&vars(&[("HOME", "/root")])).unwrap().is_none());
        assert!(Local::load(&LocalConfig::None).unwrap().is_none());
    }

    #[test]
    fn cryptofeed_environment_resolves_per_exchange() {
        let local = Local::load(&vars(&[
            ("CRYPTOFEED_PROXY_ENABLED", "true"),
            (
                "CRYPTOFEED_PROXY_DEFAULT__WEBSOCKET__URL",
                "socks5://fallback:1080",
            ),
            ("CRYPTOFEED_PROXY_EXCHANGES__BINANCE__WS", "socks5h://bn:1080"),
        ]))
        .unwrap()
        .unwrap();
        let bn = local.resolve("BINANCE", ConnectionType::Websocket).unwrap();
        assert_eq!(bn.proxy.unwrap().as_str(), "socks5h://bn:1080");
        let other = local.resolve("kraken", ConnectionType::Websocket).unwrap();
        assert_eq!(other.proxy.unwrap().as_str(), "socks5://fallback:1080");
        let http = local.resolve("kraken", ConnectionType::Http).unwrap();
        assert!(http.proxy.is_none());
    }

    #[test]
    fn a_yaml_file_named_by_the_environment_is_read_and_other_keys_ignored() {
        let mut f = tempfile::Builder::new().suffix(".yaml").tempfile().unwrap();
        std::io::Write::write_all(
            &mut f,
            b"log_level: INFO\nproxy:\n  enabled: true\n  default:\n    http: http://p:3128\n",
        )
        .unwrap();
        let path = f.path().to_str().unwrap().to_owned();
        let local = Local::load(&vars(&[(CONFIG_FILE_ENV, &path)])).unwrap().unwrap();
        let r = local.resolve("x", ConnectionType::Http).unwrap();
        assert_eq!(r.proxy.unwrap().as_str(), "http://p:3128");
    }

    #[test]
    fn a_huge_list_index_in_the_environment_is_an_error_not_an_abort() {
        let pool = |index: &str| {
            vars(&[
                ("CRYPTOFEED_PROXY_ENABLED", "true"),
                (
                    &format!("CRYPTOFEED_PROXY_DEFAULT__HTTP__POOL__PROXIES__{index}__URL"),
                    "socks5://h:1080",
                ),
            ])
        };
        for index in ["10000", "99999999999", "184467440737095516160"] {
            let err = Local::load(&pool(index)).unwrap_err().to_string();
            assert!(
                err.contains(&format!("PROXIES__{index}__URL")) && err.contains("at most 9999"),
                "{index}: {err}"
            );
        }
        let local = Local::load(&pool("0")).unwrap().unwrap();
        let r = local.resolve("x", ConnectionType::Http).unwrap();
        assert_eq!(r.proxy.unwrap().as_str(), "socks5://h:1080");
    }

    #[test]
    fn invalid_local_configuration_names_the_key() {
        let err = Local::load(&vars(&[
            ("CRYPTOFEED_PROXY_ENABLED", "true"),
            ("CRYPTOFEED_PROXY_DEFAULT__HTTP__URL", "socks5://nohost"),
        ]))
        .unwrap_err()
        .to_string();
        assert!(err.contains("proxy.default.http.url"), "{err}");
    }
}
