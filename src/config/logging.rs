//! Logging set-up: [`init_logging`] installs the tracing subscriber.
//!
//! Kept apart from the command line: it needs only the chosen level (plus
//! `RUST_LOG`), and `main` calls it once the configuration has been parsed.

use std::io::IsTerminal;

/// Installs the global tracing subscriber: human-readable lines on stderr,
/// at `level`, unless `RUST_LOG` is set, in which case its directives (e.g.
/// `ringsocks::relay=trace,info`) win. Calling it twice is harmless.
pub fn init_logging(level: tracing::Level) {
    use tracing_subscriber::filter::{EnvFilter, LevelFilter};

    let default = || EnvFilter::default().add_directive(LevelFilter::from_level(level).into());
    let mut bad_env = None;
    let filter = match std::env::var("RUST_LOG") {
        Ok(spec) if !spec.trim().is_empty() => EnvFilter::try_new(&spec).unwrap_or_else(|e| {
            bad_env = Some((spec, e));
            default()
        }),
        _ => default(),
    };
    let installed = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        // Shard and resolver threads are named; the name says which core.
        .with_thread_names(true)
        .try_init()
        .is_ok();
    if let (true, Some((spec, e))) = (installed, bad_env) {
        tracing::warn!("ignoring RUST_LOG={spec:?}: {e}; using --log-level {level}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn init_logging_twice_is_harmless() {
        init_logging(tracing::Level::WARN);
        init_logging(tracing::Level::DEBUG);
    }
}
