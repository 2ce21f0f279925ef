//! Scale over loopback: 1,000 concurrent busy tunnels (splice and copy), and 20,000 idle
//! tunnels held at once.
//!
//! `RINGSOCKS_SCALE_IDLE` overrides the idle count (default 20000), only for harness runs
//! against other servers.

use crate::common::*;
use std::io::{self, BufRead, Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

const THREADS: usize = 50;
const PER_THREAD: usize = 20;
const CHUNK: usize = 16 * 1024;

fn conn_len(id: usize) -> usize {
    // 64 KiB ..= 256 KiB, deterministic per connection.
    let r = prng_bytes(id as u64 + 1, 8);
    let x = u64::from_le_bytes(r.try_into().unwrap()) as usize;
    64 * 1024 + x % (192 * 1024 + 1)
}

fn concurrent_busy(mode: &str) {
    raise_nofile_limit();
    let echo = echo_server("127.0.0.1:0");
    let relay = Relay::start(&["--forward", mode]);
    let ready = Arc::new(AtomicUsize::new(0));
    let total = THREADS * PER_THREAD;
    let start = Instant::now();
    let mut handles = Vec::new();
    for t in 0..THREADS {
        let ready = ready.clone();
        let (relay_addr, echo_addr) = (relay.addr, echo.addr);
        handles.push(thread::spawn(move || -> Result<usize, String> {
            let mut conns: Vec<(TcpStream, Vec<u8>)> = Vec::new();
            let mut err = None;
            for i in 0..PER_THREAD {
                let id = t * PER_THREAD + i;
                match socks_request(relay_addr, None, CMD_CONNECT, &echo_addr.into()) {
                    Ok((s, r)) if r.rep == 0 => {
                        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
                        conns.push((s, prng_bytes(0x5CA1E + id as u64, conn_len(id))));
                    }
                    Ok((_, r)) => {
                        err = Some(format!("conn {id}: REP {:#04x}", r.rep));
                        break;
                    }
                    Err(e) => {
                        err = Some(format!("conn {id}: handshake: {e}"));
                        break;
                    }
                }
            }
            // Hold until every thread has all its connections open (bounded).
            ready.fetch_add(1, Ordering::SeqCst);
            if let Some(e) = err {
                return Err(e);
            }
            let deadline = Instant::now() + Duration::from_secs(60);
            while ready.load(Ordering::SeqCst) < THREADS && Instant::now() < deadline {
                thread::sleep(Duration::from_millis(5));
            }
            let mut got: Vec<Vec<u8>> = conns
                .iter()
                .map(|(_, d)| Vec::with_capacity(d.len()))
                .collect();
            let max = conns.iter().map(|(_, d)| d.len()).max().unwrap_or(0);
            let mut off = 0;
            while off < max {
                for (s, d) in conns.iter_mut() {
                    if off < d.len() {
                        let end = (off + CHUNK).min(d.len());
                        s.write_all(&d[off..end])
                            .map_err(|e| format!("thread {t} write: {e}"))?;
                    }
                }
                for ((s, d), g) in conns.iter_mut().zip(got.iter_mut()) {
                    if off < d.len() {
                        let end = (off + CHUNK).min(d.len());
                        let mut buf = vec![0u8; end - off];
                        s.read_exact(&mut buf)
                            .map_err(|e| format!("thread {t} read at {off}: {e}"))?;
                        g.extend_from_slice(&buf);
                    }
                }
                off += CHUNK;
            }
            let mut ok = 0;
            for (i, ((_, d), g)) in conns.iter().zip(got.iter()).enumerate() {
                if sha256_hex(d) != sha256_hex(g) {
                    return Err(format!(
                        "conn {}: checksum mismatch ({} bytes sent)",
                        t * PER_THREAD + i,
                        d.len()
                    ));
                }
                ok += 1;
            }
            Ok(ok)
        }));
    }
    let mut ok = 0;
    let mut errors = Vec::new();
    for h in handles {
        match h.join().expect("client thread panicked") {
            Ok(n) => ok += n,
            Err(e) => errors.push(e),
        }
    }
    assert!(
        errors.is_empty(),
        "[{mode}] {} client threads failed, first: {:?}",
        errors.len(),
        errors.first()
    );
    assert_eq!(ok, total, "[{mode}] verified connections");
    assert!(
        echo.accepted.load(Ordering::SeqCst) >= total,
        "[{mode}] echo server saw fewer than {total} connections"
    );
    let el = start.elapsed();
    println!("[{mode}] {total} concurrent tunnels verified in {el:?}");
    assert!(el < Duration::from_secs(60), "[{mode}] took {el:?}");
}

#[test]
fn concurrent_1000_busy_tunnels_splice() {
    let _guard = exclusive();
    concurrent_busy("splice");
}

#[test]
fn concurrent_1000_busy_tunnels_copy() {
    let _guard = exclusive();
    concurrent_busy("copy");
}

#[test]
fn idle_20000_tunnels_then_curl_then_close_splice_and_copy() {
    let _guard = exclusive();
    for mode in FORWARD_MODES {
        idle_tunnels(mode);
    }
}

fn idle_tunnels(mode: &str) {
    let n: usize = std::env::var("RINGSOCKS_SCALE_IDLE")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(20_000);
    require_tool("python3");
    let http = http_server("127.0.0.1:0").unwrap();
    let relay = Relay::start(&["--forward", mode]);
    let (rss0, fds0) = (proc_rss_kib(relay.pid()), proc_fd_count(relay.pid()));
    let start = Instant::now();
    // Both ends of every tunnel live in helper processes: this machine's hard RLIMIT_NOFILE
    // (20,000, not raisable without CAP_SYS_RESOURCE) is too small for one process to hold
    // 20,000 client sockets, let alone their targets too.
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/support/hold_idle.py");
    let mut holder = std::process::Command::new("python3")
        .args([
            script,
            "--relay",
            &relay.addr.to_string(),
            "--count",
            &n.to_string(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("spawn hold_idle.py");
    let mut lines = io::BufReader::new(holder.stdout.take().unwrap()).lines();
    let (tx, rx) = std::sync::mpsc::channel();
    thread::spawn(move || {
        for l in lines.by_ref() {
            if tx.send(l.unwrap_or_default()).is_err() {
                break;
            }
        }
    });
    let held = rx.recv_timeout(Duration::from_secs(240));
    let held = match held {
        Ok(l) => l,
        Err(_) => {
            let _ = holder.kill();
            let _ = holder.wait();
            panic!(
                "[{mode}] holder did not report within 240 s; relay stderr:\n{}",
                relay.stderr()
            );
        }
    };
    assert_eq!(
        held,
        format!("held {n}"),
        "[{mode}] relay stderr:\n{}",
        relay.stderr()
    );
    let (rss1, fds1) = (proc_rss_kib(relay.pid()), proc_fd_count(relay.pid()));
    println!(
        "[{mode}] {n} idle tunnels open after {:?}: relay RSS {rss0} -> {rss1} KiB ({} B per tunnel), fds {fds0} -> {fds1}",
        start.elapsed(),
        (rss1.saturating_sub(rss0)) * 1024 / n as u64
    );
    // Established sockets live in the rings' fixed-file tables, not in the fd table.
    assert!(
        fds1 < fds0 + n / 4,
        "[{mode}] relay holds {fds1} fds for {n} tunnels"
    );

    // The relay still serves new work while holding them.
    assert_eq!(
        curl_ok(relay.addr, &format!("http://127.0.0.1:{}/", http.port())),
        b"hello\n"
    );

    // Close all client sides; the relay must close every outbound connection.
    holder
        .stdin
        .as_mut()
        .unwrap()
        .write_all(b"close\n")
        .unwrap();
    let closed = rx
        .recv_timeout(Duration::from_secs(120))
        .expect("holder reports the targets' EOF");
    let _ = holder.wait();
    assert_eq!(
        closed,
        format!("targets-closed {n} 0"),
        "[{mode}] every outbound connection must see EOF once its client closed"
    );
    println!("[{mode}] all {n} closed after {:?}", start.elapsed());
    // And it still works afterwards.
    assert_eq!(
        curl_ok(relay.addr, &format!("http://127.0.0.1:{}/", http.port())),
        b"hello\n"
    );
}
