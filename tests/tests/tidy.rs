//! Tidy checks over the repository's own files, run by `cargo test`: every
//! Rust file opens with a `//!` paragraph saying what it owns, and the design
//! is cited where it lives, in `docs/`, not in a file outside the
//! repository. Each failure names every offending file at once.
//!
//! These tests read files; they never change one. `target/` and `.git/` are
//! skipped wherever they are.

use std::path::{Path, PathBuf};

/// The workspace root (this crate is `tests/`).
fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("the tests crate lives in the workspace")
        .to_path_buf()
}

/// Every file under `dir`, recursively, skipping build output, version
/// control and Python's caches; symbolic links are not followed.
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_path_buf()];
    while let Some(dir) = pending.pop() {
        let entries =
            std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
        for entry in entries {
            let entry = entry.unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()));
            let path = entry.path();
            let kind = entry
                .file_type()
                .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            let name = entry.file_name();
            if kind.is_dir() {
                if !matches!(name.to_str(), Some("target" | ".git" | "__pycache__")) {
                    pending.push(path);
                }
            } else if kind.is_file() {
                found.push(path);
            }
        }
    }
    found.sort();
    found
}

/// `path` relative to the workspace root, for messages.
fn relative(path: &Path) -> String {
    path.strip_prefix(root())
        .unwrap_or(path)
        .display()
        .to_string()
}

#[test]
fn every_rust_file_opens_with_a_module_doc_paragraph() {
    let offenders: Vec<String> = files(&root())
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter(|p| {
            let text = std::fs::read_to_string(p)
                .unwrap_or_else(|e| panic!("reading {}: {e}", p.display()));
            let first = text.lines().next().unwrap_or_default();
            // A paragraph: `//!` and words on the very first line.
            first
                .strip_prefix("//!")
                .is_none_or(|rest| rest.trim().is_empty())
        })
        .map(|p| relative(&p))
        .collect();
    assert!(
        offenders.is_empty(),
        "these files do not open with a `//!` paragraph saying what they own and what they \
         never do:\n  {}",
        offenders.join("\n  ")
    );
}

#[test]
fn the_design_is_cited_where_it_lives() {
    // Spelt in two halves so that this file does not mention it itself.
    let old = concat!("DESIGN", ".md");
    let mut offenders = Vec::new();
    for path in files(&root()) {
        let name = relative(&path);
        if name.starts_with("docs/") {
            continue;
        }
        // Only text: a binary file cannot cite anything.
        let Ok(text) = std::fs::read_to_string(&path) else {
            continue;
        };
        if text.contains(old) {
            offenders.push(name);
        }
    }
    assert!(
        offenders.is_empty(),
        "these files cite {old}, which is not in the repository; cite docs/design.md \
         instead:\n  {}",
        offenders.join("\n  ")
    );
}

/// The most lines a source file of the supervisor may have: past that, it
/// holds more than one reader keeps in mind, and it is time for a new room.
const MAX_SUPERVISOR_LINES: usize = 500;

#[test]
fn no_supervisor_source_file_outgrows_one_reader() {
    let offenders: Vec<String> = files(&root().join("supervisor/src"))
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "rs"))
        .filter_map(|p| {
            let lines = std::fs::read_to_string(&p).ok()?.lines().count();
            (lines > MAX_SUPERVISOR_LINES).then(|| format!("{} ({lines} lines)", relative(&p)))
        })
        .collect();
    assert!(
        offenders.is_empty(),
        "split these by concern (at most {MAX_SUPERVISOR_LINES} lines each):\n  {}",
        offenders.join("\n  ")
    );
}
