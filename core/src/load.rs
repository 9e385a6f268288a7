//! Layered configuration loading: built-in defaults → one YAML file → environment variables.
//!
//! The `config` crate does the layering and the deep merge. It lacks three things cryptofeed's
//! environment format needs, which [`EnvSource`] adds: JSON values for lists and objects
//! (`...__ENDPOINTS=["https://a:8080"]`), numeric-index list elements (`...__PROXIES__0__URL`), and
//! several prefixes mapped to different subtrees (`CRYPTOFEED_PROXY_*` → `proxy.*`,
//! `PROXY_BROKER_*` → `server.*`; the longest matching prefix wins, so `PROXY_BROKER_BROKERING__*`
//! can go to `brokering.*`). [`YamlFile`] folds exchange ids to lower case so that YAML's
//! `Binance` and the environment's `BINANCE` are one exchange (in `proxy.exchanges` and in any
//! other mapping declared with [`Loader::exchange_map`]).
//!
//! Deserialization goes through `serde_path_to_error`, so every error names the key path; range and
//! format rules are checked afterwards by [`Validate`] implementations. Values of secret keys are
//! never echoed.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};

use config::{FileFormat, Map, Source, Value, ValueKind};
use serde::de::DeserializeOwned;

use crate::redact::{is_secret_path, redact_text, redact_url};

/// One configuration problem: where, and what is wrong (value and rule).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// Key path, e.g. `proxy.default.http.url` (empty for whole-file problems).
    pub path: String,
    /// The offending value and the rule it breaks.
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.path.is_empty() {
            f.write_str(&self.message)
        } else {
            write!(f, "{}: {}", self.path, self.message)
        }
    }
}

/// Every problem found in a configuration; start-up stops on any.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in the order they were found.
    pub problems: Vec<Problem>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.problems.as_slice() {
            [one] => write!(f, "invalid configuration: {one}"),
            many => {
                write!(f, "invalid configuration ({} problems):", many.len())?;
                for p in many {
                    write!(f, "\n  - {p}")?;
                }
                Ok(())
            }
        }
    }
}

impl ConfigError {
    fn single(path: impl Into<String>, message: impl Into<String>) -> Self {
        Self {
            problems: vec![Problem {
                path: path.into(),
                message: message.into(),
            }],
        }
    }
}

/// Collects problems during validation.
#[derive(Debug, Default)]
pub struct Problems(Vec<Problem>);

impl Problems {
    /// Records a problem at `path`.
    pub fn push(&mut self, path: impl Into<String>, message: impl Into<String>) {
        self.0.push(Problem {
            path: path.into(),
            message: message.into(),
        });
    }

    /// Whether nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Ok when empty, else the collected error.
    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: self.0 })
        }
    }
}

/// Rules a loaded configuration must satisfy beyond its types.
pub trait Validate {
    /// Records every broken rule; `path` is this value's key path.
    fn validate(&self, path: &str, problems: &mut Problems);
}

/// Maps environment variables with a prefix onto a configuration subtree.
#[derive(Debug, Clone)]
pub struct EnvMapping {
    /// Variable prefix, matched case-insensitively, e.g. `CRYPTOFEED_PROXY_`.
    pub prefix: String,
    /// Key path the rest of the name is placed under, e.g. `proxy` (empty = root).
    pub target: String,
    /// Whole variable names with this prefix that are not configuration keys (e.g. `PROXY_BROKER_CONFIG`).
    pub exclude: Vec<String>,
}

impl EnvMapping {
    /// A mapping from `prefix` to `target`.
    pub fn new(prefix: &str, target: &str) -> Self {
        Self {
            prefix: prefix.to_owned(),
            target: target.to_owned(),
            exclude: Vec::new(),
        }
    }

    /// Leaves a variable out of the mapping.
    pub fn exclude(mut self, name: &str) -> Self {
        self.exclude.push(name.to_ascii_uppercase());
        self
    }
}

/// Highest list index an environment variable may name (`...__PROXIES__9999__URL`). The `config`
/// crate grows a list to the index it is given, so an unchecked `__99999999999__` would try to
/// allocate terabytes.
pub const MAX_ENV_LIST_INDEX: usize = 9_999;

/// Most YAML nodes a configuration file may hold once its aliases are expanded. The YAML loader
/// copies a node for every alias to it, so a few hundred bytes of nested aliases ("billion laughs")
/// would otherwise expand to gigabytes.
pub const MAX_YAML_NODES: u64 = 1_000_000;

/// Where the YAML layer comes from. `Debug` leaves the text out (it may hold secrets).
#[derive(derive_more::Debug, Clone)]
enum YamlOrigin {
    /// A file, read when loading (it must exist).
    File(PathBuf),
    /// Text already in memory, with a name for messages.
    Text {
        name: String,
        #[debug("<{} bytes>", text.len())]
        text: String,
    },
}

/// Builds a configuration of type `T` from defaults, an optional YAML file and the environment.
/// `Debug` shows the names of the given environment variables, not their values.
#[derive(derive_more::Debug, Clone, Default)]
pub struct Loader {
    file: Option<YamlOrigin>,
    mappings: Vec<EnvMapping>,
    #[debug("{:?}", env.as_ref().map(|vars| vars.iter().map(|(k, _)| k).collect::<Vec<_>>()))]
    env: Option<Vec<(String, String)>>,
    proxy_root: Option<String>,
    exchange_maps: Vec<String>,
    tables: Vec<String>,
}

impl Loader {
    /// A loader with no file and no environment mappings.
    pub fn new() -> Self {
        Self::default()
    }

    /// Reads this YAML file (it must exist).
    pub fn file(mut self, path: impl AsRef<Path>) -> Self {
        self.file = Some(YamlOrigin::File(path.as_ref().to_owned()));
        self
    }

    /// Reads this YAML text instead of a file (`name` stands for the file in messages); the same
    /// rules apply. For embedding and fuzzing.
    pub fn yaml_text(mut self, name: &str, text: &str) -> Self {
        self.file = Some(YamlOrigin::Text {
            name: name.to_owned(),
            text: text.to_owned(),
        });
        self
    }

    /// Applies environment variables with this mapping.
    pub fn env_mapping(mut self, mapping: EnvMapping) -> Self {
        self.mappings.push(mapping);
        self
    }

    /// Uses these variables instead of the process environment (tests, embedding).
    pub fn env_vars<I, K, V>(mut self, vars: I) -> Self
    where
        I: IntoIterator<Item = (K, V)>,
        K: Into<String>,
        V: Into<String>,
    {
        self.env = Some(vars.into_iter().map(|(k, v)| (k.into(), v.into())).collect());
        self
    }

    /// Where cryptofeed's `proxy:` block sits (e.g. `proxy`). Each source is normalized there
    /// before merging: exchange ids lower-cased, aliases (`rest`, `ws`) renamed and shorthands
    /// (bare strings) expanded, so that YAML and environment refer to the same keys.
    pub fn proxy_block(mut self, path: &str) -> Self {
        self.proxy_root = Some(path.to_owned());
        self
    }

    /// Declares the mapping at this dotted path as keyed by exchange ids: in every source its keys
    /// are folded to lower case before merging (two spellings of one id in a source are an error),
    /// as in `proxy.exchanges`, and the value must be a mapping.
    pub fn exchange_map(mut self, path: &str) -> Self {
        self.exchange_maps.push(path.to_owned());
        self
    }

    /// Requires the value at this dotted path, if present, to be a mapping. A `*` segment matches
    /// any one key (`brokering.exchanges.*`).
    pub fn table(mut self, path: &str) -> Self {
        self.tables.push(path.to_owned());
        self
    }

    /// Loads, deserializes and validates.
    pub fn load<T: DeserializeOwned + Validate>(&self) -> Result<T, ConfigError> {
        let vars = match &self.env {
            Some(v) => v.clone(),
            None => std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .collect(),
        };
        let shape = Shape {
            proxy_root: self.proxy_root.clone(),
            exchange_maps: self.exchange_maps.clone(),
        };
        let env = EnvSource::new(&self.mappings, &vars, &shape)?;
        let mut builder = config::Config::builder();
        if let Some(origin) = &self.file {
            builder = builder.add_source(YamlFile {
                origin: origin.clone(),
                shape: shape.clone(),
            });
        }
        let built = builder
            .add_source(env.clone())
            .build()
            .map_err(|e| ConfigError::single("", redact_text(&e.to_string())))?;
        let tree: Value = built
            .clone()
            .try_deserialize()
            .map_err(|e| ConfigError::single("", e.to_string()))?;
        let mut problems = Problems::default();
        shape.check_tables(&tree, &self.tables, &mut problems);
        env.check_lists(&tree, &mut problems);
        problems.into_result()?;
        let snapshot = built.clone();
        let value: T = serde_path_to_error::deserialize(built).map_err(|e| {
            let path = e.path().to_string();
            let path = if path == "." { String::new() } else { path };
            let message = if is_secret_path(&path) {
                "invalid value (not shown: this key holds a secret)".to_owned()
            } else {
                let mut message = strip_key_suffix(&e.inner().to_string());
                if let Some(shown) = scalar_at(&snapshot, &path)
                    && !message.contains(&shown)
                {
                    message = format!("'{shown}': {message}");
                }
                redact_text(&message)
            };
            let message = match env.origin_of(&path) {
                Some(var) => format!("{message} (set by environment variable {var})"),
                None => message,
            };
            ConfigError::single(path, message)
        })?;
        let mut problems = Problems::default();
        value.validate("", &mut problems);
        problems.into_result()?;
        Ok(value)
    }
}

/// The `config` crate appends " for key `a.b`" (and sometimes " in <origin>") to type errors; the
/// path is reported separately, so drop the repetition.
fn strip_key_suffix(message: &str) -> String {
    match message.find(" for key `") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

/// The scalar value at `path`, as text, for error messages.
fn scalar_at(config: &config::Config, path: &str) -> Option<String> {
    if path.is_empty() {
        return None;
    }
    let value = config.get::<Value>(path).ok()?;
    match value.kind {
        ValueKind::Table(_) | ValueKind::Array(_) | ValueKind::Nil => None,
        _ => Some(value.to_string()),
    }
}

/// The `config` crate's YAML file source, normalized by [`Shape`].
#[derive(Debug, Clone)]
struct YamlFile {
    origin: YamlOrigin,
    shape: Shape,
}

impl Source for YamlFile {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        let (name, text) = match &self.origin {
            YamlOrigin::File(path) => {
                if !path.is_file() {
                    return Err(config::ConfigError::Message(format!(
                        "configuration file {} does not exist or is not a file",
                        path.display()
                    )));
                }
                let text = std::fs::read_to_string(path).map_err(|e| {
                    config::ConfigError::Message(format!("cannot read {}: {e}", path.display()))
                })?;
                (path.display().to_string(), text)
            }
            YamlOrigin::Text { name, text } => (name.clone(), text.clone()),
        };
        let message = |e: String| config::ConfigError::Message(format!("{e} (in {name})"));
        check_yaml_size(&text).map_err(message)?;
        let map = config::File::from_str(&text, FileFormat::Yaml)
            .collect()
            .map_err(|e| match e {
                config::ConfigError::FileParse { cause, .. } => config::ConfigError::FileParse {
                    uri: Some(name.clone()),
                    cause,
                },
                other => other,
            })?;
        // The `config` crate reads top-level keys as paths: `a[99999999999]` would be a list index.
        if let Some(key) = map.keys().find(|k| k.contains(['[', ']'])) {
            return Err(message(format!(
                "top-level key '{key}' contains '[' or ']' (keys are names, not list indexes)"
            )));
        }
        let mut root = Value::new(None, ValueKind::Table(map));
        self.shape.normalize(&[], &mut root).map_err(message)?;
        match root.kind {
            ValueKind::Table(map) => Ok(map),
            _ => Ok(Map::new()),
        }
    }
}

/// Refuses YAML whose aliases expand to more than [`MAX_YAML_NODES`] nodes. Parse errors are left to
/// the real parse, which reports them with their position.
fn check_yaml_size(text: &str) -> Result<(), String> {
    use yaml_rust2::parser::{Event, EventReceiver, Parser};

    /// Counts nodes as the loader would build them: an alias costs the size of its anchor's node.
    #[derive(Default)]
    struct Count {
        total: u64,
        /// Open collections: (anchor id, total when it started).
        open: Vec<(usize, u64)>,
        /// Expanded size of each anchored node.
        anchors: HashMap<usize, u64>,
    }

    impl EventReceiver for Count {
        fn on_event(&mut self, event: Event) {
            match event {
                Event::Scalar(_, _, anchor, _) => {
                    self.total = self.total.saturating_add(1);
                    if anchor > 0 {
                        self.anchors.insert(anchor, 1);
                    }
                }
                Event::SequenceStart(anchor, _) | Event::MappingStart(anchor, _) => {
                    self.total = self.total.saturating_add(1);
                    self.open.push((anchor, self.total));
                }
                Event::SequenceEnd | Event::MappingEnd => {
                    if let Some((anchor, start)) = self.open.pop()
                        && anchor > 0
                    {
                        self.anchors.insert(anchor, self.total - start + 1);
                    }
                }
                Event::Alias(anchor) => {
                    let size = self.anchors.get(&anchor).copied().unwrap_or(1);
                    self.total = self.total.saturating_add(size);
                }
                _ => {}
            }
        }
    }

    let mut count = Count::default();
    if Parser::new_from_str(text).load(&mut count, true).is_err() {
        return Ok(());
    }
    if count.total > MAX_YAML_NODES {
        return Err(format!(
            "expands to more than {MAX_YAML_NODES} values once its aliases (*name) are resolved"
        ));
    }
    Ok(())
}

/// Where a value sits inside cryptofeed's `proxy:` block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    /// The block itself.
    Settings,
    /// `exchanges`: keys are exchange ids.
    Exchanges,
    /// `default` or `exchanges.<id>`: `http`/`websocket` (aliases `rest`/`ws`), or a bare URL.
    ConnectionProxies,
    /// `...http` or `...websocket`: a proxy config, or a bare URL.
    ProxyConfig,
    /// `...pool`.
    Pool,
    /// `...pool.proxies`.
    Members,
    /// `...pool.proxies[i]`.
    Member,
    /// Anything else.
    Other,
}

impl Role {
    fn child(self, key: &str) -> Role {
        match (self, key) {
            (Role::Settings, "exchanges") => Role::Exchanges,
            (Role::Settings, "default") | (Role::Exchanges, _) => Role::ConnectionProxies,
            (Role::ConnectionProxies, "http" | "websocket") => Role::ProxyConfig,
            (Role::ProxyConfig, "pool") => Role::Pool,
            (Role::Pool, "proxies") => Role::Members,
            _ => Role::Other,
        }
    }

    fn element(self) -> Role {
        if self == Role::Members {
            Role::Member
        } else {
            Role::Other
        }
    }

    /// The canonical spelling of `key` here (aliases and exchange-id case folded).
    fn canonical(self, key: &str) -> String {
        match (self, key) {
            (Role::Exchanges, id) => id.to_lowercase(),
            (Role::ConnectionProxies, "rest") => "http".to_owned(),
            (Role::ConnectionProxies, "ws") => "websocket".to_owned(),
            (_, other) => other.to_owned(),
        }
    }

    fn is_table(self) -> bool {
        matches!(self, Role::Settings | Role::Exchanges | Role::Pool | Role::Member)
    }
}

/// The cryptofeed-specific normalization applied to each source before merging.
#[derive(Debug, Clone, Default)]
struct Shape {
    proxy_root: Option<String>,
    /// Dotted paths of mappings keyed by exchange ids outside the `proxy:` block.
    exchange_maps: Vec<String>,
}

impl Shape {
    /// The role of an absolute key path (segments; list indexes as `[i]`).
    fn role(&self, path: &[String]) -> Role {
        if self.exchange_maps.iter().any(|m| segments_match(m, path)) {
            return Role::Exchanges;
        }
        let Some(root) = &self.proxy_root else {
            return Role::Other;
        };
        let root: Vec<&str> = if root.is_empty() {
            Vec::new()
        } else {
            root.split('.').collect()
        };
        if path.len() < root.len() || path.iter().zip(&root).any(|(a, b)| a != b) {
            return Role::Other;
        }
        path[root.len()..].iter().fold(Role::Settings, |role, seg| {
            if seg.starts_with('[') {
                role.element()
            } else {
                role.child(seg)
            }
        })
    }

    /// Normalizes `value`, which sits at `path`: folds keys, renames aliases, expands shorthands.
    fn normalize(&self, path: &[String], value: &mut Value) -> Result<(), String> {
        let role = self.role(path);
        let dotted = || dotted(path);
        match (&mut value.kind, role) {
            (ValueKind::String(url), Role::ConnectionProxies) => {
                let url = url.clone();
                *value = table([("http", table([("url", string(url))]))]);
            }
            (ValueKind::String(url), Role::ProxyConfig) => {
                let url = url.clone();
                *value = table([("url", string(url))]);
            }
            (ValueKind::Table(map), _) => {
                let mut folded = Map::new();
                let mut originals: BTreeMap<String, String> = BTreeMap::new();
                for (key, child) in map.drain() {
                    let canonical = role.canonical(&key);
                    if let Some(previous) = originals.insert(canonical.clone(), key.clone()) {
                        let at = dotted();
                        return Err(if role == Role::Exchanges {
                            format!(
                                "{at}: keys '{previous}' and '{key}' name the same exchange (exchange ids are case-insensitive)"
                            )
                        } else {
                            format!(
                                "{at}: keys '{previous}' and '{key}' name the same entry (`rest` is `http`, `ws` is `websocket`)"
                            )
                        });
                    }
                    folded.insert(canonical, child);
                }
                for (key, child) in folded.iter_mut() {
                    let mut child_path = path.to_vec();
                    child_path.push(key.clone());
                    self.normalize(&child_path, child)?;
                }
                *map = folded;
            }
            (ValueKind::Array(items), _) => {
                for (i, item) in items.iter_mut().enumerate() {
                    let mut child_path = path.to_vec();
                    child_path.push(format!("[{i}]"));
                    self.normalize(&child_path, item)?;
                }
            }
            _ => {}
        }
        Ok(())
    }

    /// The canonical form of an environment key path.
    fn canonical_path(&self, path: &[String]) -> Vec<String> {
        let mut out: Vec<String> = Vec::with_capacity(path.len());
        for seg in path {
            let canonical = if seg.starts_with('[') {
                seg.clone()
            } else {
                self.role(&out).canonical(seg)
            };
            out.push(canonical);
        }
        out
    }

    /// Mappings must be mappings: serde would otherwise read a list into a struct by position.
    fn check_tables(&self, tree: &Value, extra: &[String], problems: &mut Problems) {
        fn walk(
            shape: &Shape,
            path: &mut Vec<String>,
            value: &Value,
            extra: &[String],
            problems: &mut Problems,
        ) {
            let role = shape.role(path);
            let required =
                role.is_table() || extra.iter().any(|p| segments_match(p, path)) || path.is_empty();
            let allowed_string = matches!(role, Role::ConnectionProxies | Role::ProxyConfig);
            match &value.kind {
                ValueKind::Table(map) => {
                    for (k, v) in map {
                        path.push(k.clone());
                        walk(shape, path, v, extra, problems);
                        path.pop();
                    }
                }
                ValueKind::Array(items) => {
                    if required || allowed_string {
                        problems.push(
                            dotted(path),
                            "invalid type: found a list, expected a mapping (key: value pairs)",
                        );
                        return;
                    }
                    for (i, v) in items.iter().enumerate() {
                        path.push(format!("[{i}]"));
                        walk(shape, path, v, extra, problems);
                        path.pop();
                    }
                }
                ValueKind::Nil => {}
                _ if required => {
                    let at = dotted(path);
                    let shown = if is_secret_path(&at) {
                        "<secret>".to_owned()
                    } else {
                        redact_url(&value.to_string())
                    };
                    problems.push(
                        at,
                        format!("'{shown}': invalid type, expected a mapping (key: value pairs)"),
                    )
                }
                _ => {}
            }
        }
        walk(self, &mut Vec::new(), tree, extra, problems);
    }
}

/// Whether key path `path` (segments) is `pattern` (dotted), where a `*` segment matches any one
/// key. Segments are compared whole, so an exchange id containing `.` is still one key.
fn segments_match(pattern: &str, path: &[String]) -> bool {
    let mut pattern = pattern.split('.');
    let mut path = path.iter();
    loop {
        match (pattern.next(), path.next()) {
            (None, None) => return true,
            (Some(p), Some(k)) if p == "*" || p == k => {}
            _ => return false,
        }
    }
}

fn dotted(path: &[String]) -> String {
    let mut out = String::new();
    for seg in path {
        if !seg.starts_with('[') && !out.is_empty() {
            out.push('.');
        }
        out.push_str(seg);
    }
    out
}

fn string(s: String) -> Value {
    Value::new(None, ValueKind::String(s))
}

fn table<const N: usize>(entries: [(&str, Value); N]) -> Value {
    Value::new(
        None,
        ValueKind::Table(entries.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()),
    )
}

/// Environment variables as configuration, cryptofeed-style (see the module docs). `Debug` shows
/// the keys, not the values (they may be secrets).
#[derive(derive_more::Debug, Clone, Default)]
struct EnvSource {
    /// Dotted key path (with `[i]` indexes) → value.
    #[debug("{:?}", values.iter().map(|(k, _)| k).collect::<Vec<_>>())]
    values: Vec<(String, Value)>,
    /// Dotted key path → variable name, for error messages.
    origins: BTreeMap<String, String>,
    /// Lists that variables index into: dotted path → (its segments, highest index set, variable).
    lists: BTreeMap<String, (Vec<String>, usize, String)>,
}

impl EnvSource {
    fn new(mappings: &[EnvMapping], vars: &[(String, String)], shape: &Shape) -> Result<Self, ConfigError> {
        let mut source = EnvSource::default();
        let mut problems = Problems::default();
        let mut sorted: Vec<&(String, String)> = vars.iter().collect();
        // Deterministic order: shorter (outer) keys first, so `X__POOL={...}` then `X__POOL__...`.
        sorted.sort_by(|a, b| a.0.len().cmp(&b.0.len()).then(a.0.cmp(&b.0)));
        for (name, raw) in sorted {
            let upper = name.to_ascii_uppercase();
            // The longest matching prefix wins: `PROXY_BROKER_BROKERING__` before `PROXY_BROKER_`.
            let Some(mapping) = mappings
                .iter()
                .filter(|m| upper.starts_with(&m.prefix.to_ascii_uppercase()))
                .max_by_key(|m| m.prefix.len())
            else {
                continue;
            };
            if mapping.exclude.contains(&upper) {
                continue;
            }
            let rest = &upper[mapping.prefix.len()..];
            if rest.is_empty() {
                continue;
            }
            let mut segments: Vec<String> = mapping
                .target
                .split('.')
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect();
            let mut ok = true;
            let mut indexes = Vec::new();
            for segment in rest.to_lowercase().split("__") {
                let valid = !segment.is_empty()
                    && segment
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                if !valid {
                    ok = false;
                    break;
                }
                if segment.chars().all(|c| c.is_ascii_digit()) {
                    match segment.parse::<usize>() {
                        Ok(index) if index <= MAX_ENV_LIST_INDEX => {
                            indexes.push((segments.len(), index));
                            segments.push(format!("[{index}]"));
                        }
                        _ => {
                            let at = dotted(&shape.canonical_path(&segments));
                            problems.push(
                                format!("{at}[{segment}]"),
                                format!(
                                    "list index {segment} from environment variable {name} is out of range \
                                     (0..={MAX_ENV_LIST_INDEX})"
                                ),
                            );
                            ok = false;
                            break;
                        }
                    }
                } else {
                    segments.push(segment.to_owned());
                }
            }
            if !ok {
                if problems
                    .0
                    .last()
                    .is_none_or(|p| !p.message.contains(name.as_str()))
                {
                    problems.push(
                        name.clone(),
                        "environment variable name cannot be mapped to a configuration key \
                         (segments between `__` must be non-empty letters, digits, `_` or `-`)",
                    );
                }
                continue;
            }
            let segments = shape.canonical_path(&segments);
            let path = dotted(&segments);
            for (at, index) in indexes {
                let list = segments[..at].to_vec();
                let entry = source
                    .lists
                    .entry(dotted(&list))
                    .or_insert_with(|| (list, index, name.clone()));
                if index > entry.1 {
                    entry.1 = index;
                    entry.2 = name.clone();
                }
            }
            let trimmed = raw.trim();
            let mut value = if trimmed.starts_with('[') || trimmed.starts_with('{') {
                match serde_json::from_str::<serde_json::Value>(trimmed) {
                    Ok(json) => json_to_config(json),
                    Err(e) => {
                        let shown = if is_secret_path(&path) {
                            "<secret>".to_owned()
                        } else {
                            redact_text(trimmed)
                        };
                        problems.push(
                            path.clone(),
                            format!("'{shown}' from environment variable {name} is not valid JSON ({e})"),
                        );
                        continue;
                    }
                }
            } else {
                Value::new(None, ValueKind::String(raw.clone()))
            };
            if let Err(e) = shape.normalize(&segments, &mut value) {
                problems.push(path.clone(), format!("{e} (from environment variable {name})"));
                continue;
            }
            source.origins.insert(path.clone(), name.clone());
            source.values.push((path, value));
        }
        problems.into_result()?;
        Ok(source)
    }

    /// Lists indexed by variables must not have holes: `...__PROXIES__5__URL` on a list of two
    /// leaves elements 2..=4 empty, which would otherwise surface as a puzzling type error.
    fn check_lists(&self, tree: &Value, problems: &mut Problems) {
        for (list, (segments, highest, var)) in &self.lists {
            let Some(ValueKind::Array(items)) = lookup(tree, segments).map(|v| &v.kind) else {
                continue;
            };
            if let Some(hole) = items.iter().position(|v| matches!(v.kind, ValueKind::Nil)) {
                problems.push(
                    format!("{list}[{hole}]"),
                    format!(
                        "has no value, but environment variable {var} sets element {highest} \
                         (list elements are numbered from 0 without gaps)"
                    ),
                );
            }
        }
    }

    /// The variable that set `path` or one of its parents.
    fn origin_of(&self, path: &str) -> Option<&str> {
        let mut candidate = path;
        loop {
            if let Some(var) = self.origins.get(candidate) {
                return Some(var);
            }
            candidate = &candidate[..candidate.rfind(['.', '['])?];
        }
    }
}

impl Source for EnvSource {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok(self.values.iter().cloned().collect())
    }

    fn collect_to(&self, cache: &mut Value) -> Result<(), config::ConfigError> {
        // Applied one at a time, in order, through the crate's own path setter, so that a JSON
        // list set by one variable can be refined element by element by a longer one.
        for (key, value) in &self.values {
            OneValue(key.clone(), value.clone()).collect_to(cache)?;
        }
        Ok(())
    }
}

/// A single `key = value`, applied with the `config` crate's path semantics (`a.b[0].c`). `Debug`
/// shows the key only.
#[derive(derive_more::Debug, Clone)]
struct OneValue(String, #[debug(skip)] Value);

impl Source for OneValue {
    fn clone_into_box(&self) -> Box<dyn Source + Send + Sync> {
        Box::new(self.clone())
    }

    fn collect(&self) -> Result<Map<String, Value>, config::ConfigError> {
        Ok([(self.0.clone(), self.1.clone())].into_iter().collect())
    }
}

/// The value at a key path (segments; list indexes as `[i]`).
fn lookup<'a>(tree: &'a Value, segments: &[String]) -> Option<&'a Value> {
    segments.iter().try_fold(tree, |value, seg| match &value.kind {
        ValueKind::Array(items) => {
            let index: usize = seg.strip_prefix('[')?.strip_suffix(']')?.parse().ok()?;
            items.get(index)
        }
        ValueKind::Table(map) => map.get(seg),
        _ => None,
    })
}

fn json_to_config(json: serde_json::Value) -> Value {
    let kind = match json {
        serde_json::Value::Null => ValueKind::Nil,
        serde_json::Value::Bool(b) => ValueKind::Boolean(b),
        serde_json::Value::Number(n) => match (n.as_i64(), n.as_f64()) {
            (Some(i), _) => ValueKind::I64(i),
            (None, Some(f)) => ValueKind::Float(f),
            _ => ValueKind::String(n.to_string()),
        },
        serde_json::Value::String(s) => ValueKind::String(s),
        serde_json::Value::Array(items) => ValueKind::Array(items.into_iter().map(json_to_config).collect()),
        serde_json::Value::Object(map) => {
            ValueKind::Table(map.into_iter().map(|(k, v)| (k, json_to_config(v))).collect())
        }
    };
    Value::new(None, kind)
}
