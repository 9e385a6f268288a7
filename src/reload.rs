//! Hot reload: the configuration file and the credential files it names are watched; a change is
//! loaded (file + environment), validated, and applied atomically with [`Broker::reload`]. An
//! invalid change keeps the running configuration, is logged with the key named, and counts as a
//! failed reload.
//!
//! Kubernetes updates a mounted ConfigMap or Secret by swapping a `..data` symlink inside the
//! mount directory, so the *directories* are watched (not the files), and every event there
//! triggers a reload after a short debounce. Reloading an unchanged configuration changes nothing.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use notify::{RecursiveMode, Watcher};
use tokio::sync::mpsc;

use crate::broker::Broker;
use crate::config::BrokerConfig;

/// Quiet period after the last file event before reloading.
const DEBOUNCE: Duration = Duration::from_millis(300);

/// Keeps the watch running; dropping it stops watching.
#[derive(Debug)]
pub struct ReloadHandle {
    _watcher: notify::RecommendedWatcher,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for ReloadHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Directories to watch: the config file's, and those of the credential and token files.
fn watched_dirs(config_path: &Path, config: &BrokerConfig) -> BTreeSet<PathBuf> {
    let mut files: Vec<PathBuf> = vec![config_path.to_owned()];
    files.extend(
        config
            .proxy
            .external_service
            .auth_credentials
            .iter()
            .filter(|(k, _)| k.ends_with("_file"))
            .map(|(_, v)| PathBuf::from(v)),
    );
    files.extend(config.server.auth_tokens_file.iter().map(PathBuf::from));
    files
        .iter()
        .filter_map(|f| {
            let parent = f.parent()?;
            Some(if parent.as_os_str().is_empty() {
                PathBuf::from(".")
            } else {
                parent.to_owned()
            })
        })
        .collect()
}

/// Loads `config_path` (+ environment) and applies it to `broker`; logs and counts the result.
pub fn reload_now(broker: &Broker, config_path: &Path) -> bool {
    let result = BrokerConfig::load(Some(config_path)).and_then(|config| broker.reload(config));
    let label = match &result {
        Ok(summary) => {
            if summary.restart_needed {
                tracing::warn!(
                    "configuration reloaded, but changed server.* settings (listen addresses, TLS file paths and client CA, limits, reflection) take effect only after a restart (certificate and key files are re-read on their own)"
                );
            }
            tracing::info!(
                embedded_changed = summary.embedded_changed,
                upstreams_changed = summary.upstreams_changed,
                "configuration reloaded"
            );
            "success"
        }
        Err(error) => {
            tracing::error!(%error, "configuration reload rejected; the running configuration stays in force");
            "failure"
        }
    };
    broker
        .metrics()
        .config_reloads
        .get_or_create(&vec![("result", label.to_owned())])
        .inc();
    result.is_ok()
}

/// Starts watching `config_path` (and the files it names) and reloading `broker` on changes.
pub fn watch(broker: Arc<Broker>, config_path: PathBuf) -> notify::Result<ReloadHandle> {
    let (tx, mut rx) = mpsc::unbounded_channel::<()>();
    let mut watcher = notify::recommended_watcher(move |event: notify::Result<notify::Event>| {
        if event.is_ok_and(|e| !e.kind.is_access()) {
            let _ = tx.send(());
        }
    })?;
    let dirs = watched_dirs(&config_path, &broker.config());
    for dir in &dirs {
        watcher.watch(dir, RecursiveMode::NonRecursive)?;
    }
    tracing::info!(?dirs, "watching configuration for changes");
    let task = tokio::spawn(async move {
        while rx.recv().await.is_some() {
            // Debounce: wait until events stop arriving.
            while let Ok(Some(())) = tokio::time::timeout(DEBOUNCE, rx.recv()).await {}
            reload_now(&broker, &config_path);
        }
    });
    Ok(ReloadHandle {
        _watcher: watcher,
        task,
    })
}
