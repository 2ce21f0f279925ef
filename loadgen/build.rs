//! Stamps the git revision loadgen is built from into the binary, as
//! `VERGEN_GIT_SHA` (read by `sys::git_revision`), so a binary reports the
//! source it came from wherever it runs. vergen-gitcl runs `git` here, at
//! build time. Without git or a repository (a source tarball) the build
//! still succeeds: vergen emits a placeholder, or nothing, and the report
//! says "unknown".

use std::path::Path;
use std::process::Command;

use vergen_gitcl::{Emitter, GitclBuilder};

fn main() {
    if let Err(e) = stamp_git_revision() {
        println!("cargo:warning=loadgen: no git revision stamped ({e})");
    }
    watch_branch_ref();
}

fn stamp_git_revision() -> Result<(), Box<dyn std::error::Error>> {
    let git = GitclBuilder::default().sha(true).build()?;
    Emitter::default().add_instructions(&git)?.emit()?;
    Ok(())
}

/// vergen re-runs this script when HEAD or the branch's ref inside
/// `git rev-parse --git-dir` changes. In a linked worktree the branch refs
/// live in the common git directory instead, so a new commit would keep the
/// old revision: watch the ref (and packed-refs) where git keeps them. Only
/// existing files are named, since cargo re-runs for a missing one on
/// every build.
fn watch_branch_ref() {
    let git = |args: &[&str]| {
        Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
    };
    let Some(branch) = git(&["symbolic-ref", "-q", "HEAD"]) else {
        return;
    };
    for name in [branch.as_str(), "packed-refs"] {
        if let Some(path) = git(&["rev-parse", "--git-path", name]) {
            if Path::new(&path).exists() {
                println!("cargo:rerun-if-changed={path}");
            }
        }
    }
}
