//! The `ringsocks` binary: parse the command line (and config file), start one pinned shard per
//! core, print the listening addresses, re-read the configuration on SIGHUP and hand it to the
//! shards, and stop gracefully on SIGINT/SIGTERM.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ringsocks::access_log::AccessLog;
use ringsocks::activation;
use ringsocks::config::{self, Config};
use ringsocks::dns::Resolver;
use ringsocks::limits::Limits;
use ringsocks::metrics::{self, Metrics, ShardMetrics};
use ringsocks::process;
use ringsocks::server::{self, Shard, ShardSpec};
use tracing::{error, info, warn};

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    let cfg = match Config::from_args() {
        Ok(c) => c,
        Err(config::ConfigError::Clap(e)) => e.exit(),
        Err(e) => {
            eprintln!("ringsocks: {e}");
            std::process::exit(2);
        }
    };
    if cfg.check_only {
        let file = cfg
            .config_file
            .as_deref()
            .unwrap_or(std::path::Path::new("-"));
        println!(
            "{}: OK ({} rules, {} users, listen {})",
            file.display(),
            cfg.rules.len(),
            cfg.users.as_ref().map_or(0, |u| u.len()),
            cfg.listen
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(" ")
        );
        return;
    }
    config::init_logging(cfg.log_level);
    if let Err(e) = run(cfg) {
        error!("{e}");
        eprintln!("ringsocks: {e}");
        std::process::exit(1);
    }
}

fn run(cfg: Config) -> std::io::Result<()> {
    process::ignore_sigpipe();
    // Before any thread starts: this edits the environment (LISTEN_PID, LISTEN_FDS).
    let passed = process::take_listen_fds()?;
    let nofile = match process::raise_nofile() {
        Ok(n) => n,
        Err(e) => {
            warn!(error = %e, "could not raise RLIMIT_NOFILE");
            process::nofile_soft()
        }
    };
    let max_connections = cfg
        .max_connections
        .unwrap_or_else(|| server::default_max_connections(cfg.shards));
    info!(
        nofile,
        max_connections,
        per_ip = ?cfg.max_connections_per_ip,
        per_user = ?cfg.max_connections_per_user,
        "limits"
    );
    let limits = Limits::new(
        max_connections,
        cfg.max_connections_per_ip,
        cfg.max_connections_per_user,
    );
    // Blocked here, before any thread starts, so only `wait_signal` sees them.
    process::block_control_signals();

    let cfg = Arc::new(cfg);
    // Socket activation: the service manager's sockets replace --listen, shared by the shards.
    let listeners = if passed.is_empty() {
        server::bind_listeners(&cfg.listen, cfg.shards, cfg.ipv6_only)?
    } else {
        info!(
            sockets = passed.len(),
            "socket-activated: using the passed sockets, not --listen"
        );
        activation::listeners_from_fds(passed, cfg.shards)?
    };
    let bound: Vec<_> = listeners[0]
        .iter()
        .filter_map(|s| s.local_addr().ok().and_then(|a| a.as_socket()))
        .collect();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let resolver = Resolver::new(cfg.resolver_threads);
    let stop = Arc::new(AtomicBool::new(false));
    let (access, access_writer) = match &cfg.access_log {
        Some(path) => {
            let (log, writer) = AccessLog::open(path, cfg.access_log_format)?;
            (Some(log), Some(writer))
        }
        None => (None, None),
    };
    let shard_metrics: Vec<Arc<ShardMetrics>> =
        (0..listeners.len()).map(|_| Arc::default()).collect();

    let mut threads = Vec::new();
    let mut wakers = Vec::new();
    let mut reloads = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (id, socks) in listeners.into_iter().enumerate() {
        let (ctl_r, ctl_w) = std::io::pipe()?;
        wakers.push(ctl_w);
        let (reload_tx, reload_rx) = std::sync::mpsc::channel();
        reloads.push(reload_tx);
        let spec = ShardSpec {
            id,
            core: (!cores.is_empty()).then(|| cores[id % cores.len()]),
            listeners: socks,
            cfg: cfg.clone(),
            resolver: resolver.clone(),
            limits: limits.clone(),
            ctl: ctl_r,
            reload: reload_rx,
            stop: stop.clone(),
            metrics: shard_metrics[id].clone(),
            access: access.clone(),
        };
        let ready = ready_tx.clone();
        let t = std::thread::Builder::new()
            .name(format!("ringsocks-shard-{id}"))
            .spawn(move || {
                let r = Shard::run(spec, ready);
                if let Err(e) = &r {
                    error!(shard = id, error = %e, "shard failed");
                }
                r
            })?;
        threads.push(t);
    }
    drop(ready_tx);
    for _ in 0..threads.len() {
        match ready_rx.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(e),
            Err(_) => return Err(std::io::Error::other("a shard exited during start-up")),
        }
    }
    let mut metrics_at = None;
    if let Some(addr) = cfg.metrics {
        let m = Metrics {
            shards: shard_metrics,
            resolver: resolver.clone(),
            limits: limits.clone(),
            stop: stop.clone(),
            access_dropped: access
                .as_ref()
                .map_or_else(Default::default, |a| a.dropped()),
        };
        metrics_at = Some(
            metrics::serve(addr, Arc::new(m))
                .map_err(|e| std::io::Error::new(e.kind(), format!("--metrics {addr}: {e}")))?,
        );
    }
    info!(
        shards = cfg.shards,
        forward = ?cfg.forward,
        auth = cfg.users.is_some(),
        "ringsocks ready"
    );
    {
        let mut out = std::io::stdout().lock();
        // Port 0 picks a free port: say which (before the `listening` lines, which mean ready).
        if let Some(a) = metrics_at {
            writeln!(out, "metrics {a}")?;
        }
        for a in &bound {
            writeln!(out, "listening {a}")?;
        }
        out.flush()?;
    }

    let mut cfg = cfg;
    let sig = loop {
        let sig = process::wait_signal();
        if sig == libc::SIGUSR1 {
            if let Some(a) = &access {
                info!("reopening the access log");
                a.reopen();
            }
            continue;
        }
        if sig != libc::SIGHUP {
            break sig;
        }
        let Some(new) = reload(&cfg) else {
            continue;
        };
        limits.set(
            new.max_connections
                .unwrap_or_else(|| server::default_max_connections(new.shards)),
            new.max_connections_per_ip,
            new.max_connections_per_user,
        );
        cfg = Arc::new(new);
        // Each shard takes it at its next wake-up: no lock, and nothing on the hot path.
        for (tx, w) in reloads.iter().zip(&mut wakers) {
            if tx.send(cfg.clone()).is_ok() {
                let _ = w.write_all(&[1]);
            }
        }
        info!(
            rules = cfg.rules.len(),
            users = cfg.users.as_ref().map_or(0, |u| u.len()),
            "configuration reloaded"
        );
    };
    info!(signal = sig, drain = ?cfg.drain_timeout, "stopping");
    stop.store(true, Ordering::Release);
    for mut w in wakers {
        let _ = w.write_all(&[1]);
    }
    let mut failed = false;
    for t in threads {
        failed |= !matches!(t.join(), Ok(Ok(())));
    }
    // The shards' handles are gone with them; the last one closes the writer's queue.
    drop(access);
    if let Some(w) = access_writer {
        w.join();
    }
    if failed {
        return Err(std::io::Error::other("a shard failed"));
    }
    Ok(())
}

/// Re-reads the command line's configuration (its config file and users file) for SIGHUP.
/// None, with the reason logged, when it does not parse: the running configuration stays.
/// Settings that only take effect at start-up keep their running values, with a warning.
fn reload(running: &Config) -> Option<Config> {
    let mut new = match Config::from_args() {
        Ok(c) => c,
        Err(e) => {
            error!(error = %e, "reload failed; the running configuration stays in force");
            return None;
        }
    };
    let mut restart = Vec::new();
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if new.$field != running.$field {
                restart.push(stringify!($field));
                new.$field = running.$field.clone();
            }
        )*};
    }
    keep!(
        listen,
        shards,
        forward,
        ipv6_only,
        busy_poll,
        log_level,
        resolver_threads,
        stats_interval,
        metrics,
        access_log,
        access_log_format
    );
    if !restart.is_empty() {
        warn!(
            settings = %restart.join(", "),
            "changed, but only take effect on a restart; their running values stay"
        );
    }
    Some(new)
}
