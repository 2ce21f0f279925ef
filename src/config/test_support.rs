//! Helpers shared by the unit tests of the `config` modules: parsing a
//! command line, and private temporary files for `--users`.
//!
//! Test-only (`#[cfg(test)]` in `mod.rs`); lives in one place because both
//! the command-line tests and the users-file tests need it.

use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};

use super::{Config, ConfigError};

pub(super) fn parse(args: &[&str]) -> Result<Config, ConfigError> {
    Config::try_parse_from(std::iter::once("ringsocks").chain(args.iter().copied()))
}

pub(super) fn parse_err(args: &[&str]) -> String {
    match parse(args) {
        Ok(c) => panic!("{args:?} accepted: {c:?}"),
        Err(e) => e.to_string(),
    }
}

/// A file in the temp dir with `mode`, removed on drop.
pub(super) struct TempFile(PathBuf);

impl TempFile {
    pub(super) fn new(contents: &str, mode: u32) -> TempFile {
        static N: AtomicUsize = AtomicUsize::new(0);
        let path = std::env::temp_dir().join(format!(
            "ringsocks-config-test-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::write(&path, contents).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        TempFile(path)
    }

    pub(super) fn path(&self) -> &str {
        self.0.to_str().unwrap()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
