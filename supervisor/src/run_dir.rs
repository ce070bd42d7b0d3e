//! Files baton removes when it is done with them: its runtime directory
//! ([`RunDir`]) and each worker's notify socket ([`SocketFile`]).
//!
//! Both are removed on drop, never at an upgrade's exec (no destructor runs
//! across `execve`), and both can be taken over by the new supervisor from
//! the paths the hand-over state names, so the directory is neither removed
//! nor made anew. This module never creates anything itself.

use std::path::{Path, PathBuf};

/// baton's runtime directory (the notify sockets); removed, with what is
/// left in it, when dropped.
#[derive(Debug)]
pub struct RunDir(PathBuf);

impl RunDir {
    /// Takes charge of `path`: a directory made for this baton (or by the
    /// supervisor before an upgrade).
    pub fn adopt(path: PathBuf) -> RunDir {
        RunDir(path)
    }

    /// Where it is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A file that is removed when this value is dropped: a notify socket's,
/// from its bind until its generation is gone (or its start failed).
#[derive(Debug)]
pub struct SocketFile(PathBuf);

impl SocketFile {
    /// Takes charge of the socket file at `path`.
    pub fn adopt(path: PathBuf) -> SocketFile {
        SocketFile(path)
    }

    /// Where the file is.
    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
