//! File watching for `--watch`: turns bursts of file changes into one
//! reload trigger.
//!
//! Directories are watched recursively; a file is watched through its parent
//! directory, so an editor that saves by writing a temporary file and
//! renaming it over the original (vim, VS Code, JetBrains) is seen like any
//! write. Changes under `.git/` or `target/` and editor scratch files
//! (`*.swp`, `*~`, `.#*`, vim's `4913`) are ignored. A burst of events (a
//! build or `git checkout` rewriting many files) becomes one
//! [`Event::FilesChanged`] once no event has arrived for `--debounce`.
//!
//! This module never reloads anything itself: it only sends the event.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use notify::{EventKind, RecursiveMode, Watcher as _};
use tokio::sync::mpsc;

use crate::event::Event;
use crate::Error;

/// The running watcher; dropping it stops watching.
pub struct Watcher {
    _inner: notify::RecommendedWatcher,
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

/// What one `--watch PATH` watches.
#[derive(Debug, Clone)]
struct Target {
    /// What is handed to the OS watcher.
    watched: PathBuf,
    /// For a file: only this name in `watched` counts.
    only: Option<PathBuf>,
}

/// Starts watching `paths`; changes reach the loop as
/// [`Event::FilesChanged`] after `debounce` of quiet.
pub fn start(
    paths: &[PathBuf],
    debounce: Duration,
    events: mpsc::Sender<Event>,
) -> Result<Watcher, Error> {
    let err = |path: &Path, e: &dyn std::fmt::Display| {
        Error::Watch(format!("--watch {}: {e}", path.display()))
    };
    let mut targets = Vec::new();
    for path in paths {
        let meta = std::fs::metadata(path).map_err(|e| err(path, &e))?;
        let absolute = std::path::absolute(path).map_err(|e| err(path, &e))?;
        if meta.is_dir() {
            targets.push(Target {
                watched: absolute,
                only: None,
            });
        } else {
            let parent = absolute
                .parent()
                .ok_or_else(|| err(path, &"has no parent directory"))?;
            targets.push(Target {
                watched: parent.to_path_buf(),
                only: Some(absolute.clone()),
            });
        }
    }
    let (raw_tx, raw_rx) = mpsc::unbounded_channel::<PathBuf>();
    let filter = targets.clone();
    let mut watcher = notify::recommended_watcher(move |res: notify::Result<notify::Event>| {
        let event = match res {
            Ok(event) => event,
            Err(e) => {
                tracing::warn!("watching files: {e}");
                return;
            }
        };
        if matches!(event.kind, EventKind::Access(_) | EventKind::Other) {
            return;
        }
        for path in event.paths {
            if counts(&path, &filter) {
                let _ = raw_tx.send(path);
            }
        }
    })
    .map_err(|e| Error::Watch(format!("starting the file watcher: {e}")))?;
    for t in &targets {
        let mode = if t.only.is_some() {
            RecursiveMode::NonRecursive
        } else {
            RecursiveMode::Recursive
        };
        watcher
            .watch(&t.watched, mode)
            .map_err(|e| err(&t.watched, &e))?;
    }
    tokio::spawn(debounce_changes(raw_rx, debounce, events));
    Ok(Watcher { _inner: watcher })
}

/// Whether a change to `path` should trigger a reload.
fn counts(path: &Path, targets: &[Target]) -> bool {
    let ignored_dir = path
        .components()
        .any(|c| c.as_os_str() == ".git" || c.as_os_str() == "target");
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy())
        .unwrap_or_default();
    let scratch = name.ends_with('~')
        || name.ends_with(".swp")
        || name.ends_with(".swx")
        || name.starts_with(".#")
        || name == "4913";
    if ignored_dir || scratch {
        return false;
    }
    targets.iter().any(|t| match &t.only {
        Some(file) => path == file,
        None => path.starts_with(&t.watched),
    })
}

async fn debounce_changes(
    mut raw: mpsc::UnboundedReceiver<PathBuf>,
    quiet: Duration,
    events: mpsc::Sender<Event>,
) {
    while let Some(first) = raw.recv().await {
        let mut paths = BTreeSet::from([first]);
        loop {
            match tokio::time::timeout(quiet, raw.recv()).await {
                Ok(Some(path)) => {
                    paths.insert(path);
                }
                Ok(None) => return,
                Err(_) => break,
            }
        }
        let paths = paths.into_iter().collect();
        if events.send(Event::FilesChanged { paths }).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignores_vcs_build_output_and_editor_scratch_files() {
        let dir = Target {
            watched: "/src".into(),
            only: None,
        };
        let file = Target {
            watched: "/etc".into(),
            only: Some("/etc/app.toml".into()),
        };
        let t = [dir, file];
        assert!(counts(Path::new("/src/main.rs"), &t));
        assert!(counts(Path::new("/src/a/b/lib.rs"), &t));
        assert!(counts(Path::new("/etc/app.toml"), &t));
        assert!(!counts(Path::new("/etc/other.toml"), &t));
        assert!(!counts(Path::new("/src/.git/index"), &t));
        assert!(!counts(Path::new("/src/target/debug/app"), &t));
        assert!(!counts(Path::new("/src/.main.rs.swp"), &t));
        assert!(!counts(Path::new("/src/main.rs~"), &t));
        assert!(!counts(Path::new("/src/4913"), &t));
        assert!(!counts(Path::new("/src/.#main.rs"), &t));
    }
}
