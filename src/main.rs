//! The `ringsocks` binary: parse the command line, start one pinned shard per core, print the
//! listening addresses, and stop gracefully on SIGINT/SIGTERM.

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use ringsocks::config::{self, Config};
use ringsocks::dns::Resolver;
use ringsocks::limits::Limits;
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
    config::init_logging(cfg.log_level);
    if let Err(e) = run(cfg) {
        error!("{e}");
        eprintln!("ringsocks: {e}");
        std::process::exit(1);
    }
}

fn run(cfg: Config) -> std::io::Result<()> {
    process::ignore_sigpipe();
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
        cfg.users.iter().flat_map(|u| u.names()),
    );
    // Blocked here, before any thread starts, so only `wait_termination` sees them.
    process::block_termination_signals();

    let cfg = Arc::new(cfg);
    let listeners = server::bind_listeners(&cfg.listen, cfg.shards, cfg.ipv6_only)?;
    let bound: Vec<_> = listeners[0]
        .iter()
        .filter_map(|s| s.local_addr().ok().and_then(|a| a.as_socket()))
        .collect();
    let cores = core_affinity::get_core_ids().unwrap_or_default();
    let resolver = Resolver::new(cfg.resolver_threads);
    let stop = Arc::new(AtomicBool::new(false));

    let mut threads = Vec::new();
    let mut wakers = Vec::new();
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    for (id, socks) in listeners.into_iter().enumerate() {
        let (ctl_r, ctl_w) = std::io::pipe()?;
        wakers.push(ctl_w);
        let spec = ShardSpec {
            id,
            core: (!cores.is_empty()).then(|| cores[id % cores.len()]),
            listeners: socks,
            cfg: cfg.clone(),
            resolver: resolver.clone(),
            limits: limits.clone(),
            ctl: ctl_r,
            stop: stop.clone(),
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
    info!(
        shards = cfg.shards,
        forward = ?cfg.forward,
        auth = cfg.users.is_some(),
        "ringsocks ready"
    );
    {
        let mut out = std::io::stdout().lock();
        for a in &bound {
            writeln!(out, "listening {a}")?;
        }
        out.flush()?;
    }

    let sig = process::wait_termination();
    info!(signal = sig, drain = ?cfg.drain_timeout, "stopping");
    stop.store(true, Ordering::Release);
    for mut w in wakers {
        let _ = w.write_all(&[1]);
    }
    let mut failed = false;
    for t in threads {
        failed |= !matches!(t.join(), Ok(Ok(())));
    }
    if failed {
        return Err(std::io::Error::other("a shard failed"));
    }
    Ok(())
}
