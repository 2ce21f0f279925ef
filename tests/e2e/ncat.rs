//! End-to-end: ncat through the real relay, plus half-close over raw sockets.
//!
//! Note on ncat's half-close: without `--proxy`, ncat half-closes on stdin EOF and keeps
//! reading; WITH `--proxy` (7.93 at least) it shuts the connection down and exits right
//! after stdin EOF without waiting for the reply. So the ncat test checks that ncat's data
//! and FIN cross the relay (the server sees the line, then EOF), and the "reply after
//! EOF must come back" half-close check is done with a raw `shutdown(Write)` client.

use crate::common::*;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

fn spawn_ncat(relay: SocketAddr, target: SocketAddr) -> Child {
    require_tool("ncat");
    Command::new("ncat")
        .args([
            "--proxy",
            &relay.to_string(),
            "--proxy-type",
            "socks5",
            &target.ip().to_string(),
            &target.port().to_string(),
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn ncat")
}

fn stderr_of(child: &mut Child) -> String {
    let mut s = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut s);
    }
    s
}

#[test]
fn ncat_echo_roundtrip_splice_and_copy() {
    let _guard = shared();
    let echo = echo_server("127.0.0.1:0");
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        let mut nc = spawn_ncat(relay.addr, echo.addr);
        let (tx, rx) = mpsc::channel();
        let out = nc.stdout.take().unwrap();
        thread::spawn(move || {
            let mut r = BufReader::new(out);
            for _ in 0..3 {
                let mut line = String::new();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if tx.send(line).is_err() {
                            break;
                        }
                    }
                }
            }
        });
        let mut stdin = nc.stdin.take().unwrap();
        for i in 0..3 {
            let line = format!("hello ringsocks {mode} #{i}\n");
            stdin.write_all(line.as_bytes()).unwrap();
            stdin.flush().unwrap();
            let got = rx
                .recv_timeout(Duration::from_secs(10))
                .unwrap_or_else(|e| {
                    let _ = nc.kill();
                    panic!(
                        "[{mode}] no echo from ncat within 10 s ({e}); ncat stderr: {}",
                        stderr_of(&mut nc)
                    )
                });
            assert_eq!(got, line, "[{mode}] echoed line");
        }
        drop(stdin);
        let st = wait_child_or_kill(&mut nc, Duration::from_secs(10));
        let st = st.unwrap_or_else(|| panic!("[{mode}] ncat did not exit after stdin EOF"));
        assert!(
            st.success(),
            "[{mode}] ncat exit {st}: {}",
            stderr_of(&mut nc)
        );
    }
}

#[test]
fn ncat_data_and_eof_cross_the_relay_splice_and_copy() {
    let _guard = shared();
    let (srv, received) = reply_after_eof_server("127.0.0.1:0");
    for (i, mode) in FORWARD_MODES.iter().enumerate() {
        let relay = Relay::start(&["--forward", mode]);
        let mut nc = spawn_ncat(relay.addr, srv.addr);
        let line = format!("half-close via ncat {mode}\n");
        {
            let mut stdin = nc.stdin.take().unwrap();
            stdin.write_all(line.as_bytes()).unwrap();
        } // stdin closed: ncat sends FIN
        let deadline = Instant::now() + Duration::from_secs(10);
        while received.lock().unwrap().len() <= i && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        let got = received.lock().unwrap().get(i).cloned();
        let _ = wait_child_or_kill(&mut nc, Duration::from_secs(10));
        assert_eq!(
            got.as_deref(),
            Some(line.as_bytes()),
            "[{mode}] the server must receive ncat's line followed by EOF"
        );
    }
}

fn raw_half_close(relay: SocketAddr, target: SocketAddr, payload: &[u8]) {
    let mut s = socks_connect(relay, target);
    s.write_all(payload).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    let mut reply = Vec::new();
    s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
    s.read_to_end(&mut reply)
        .unwrap_or_else(|e| panic!("reading the reply after our FIN: {e}"));
    assert_eq!(
        String::from_utf8_lossy(&reply),
        reply_after_eof_text(payload),
        "the server's reply after our half-close must come back through the relay"
    );
}

#[test]
fn raw_half_close_reply_after_eof_splice_and_copy() {
    let _guard = shared();
    let (srv, _) = reply_after_eof_server("127.0.0.1:0");
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        raw_half_close(relay.addr, srv.addr, b"a line then FIN\n");
        // Larger than socket buffers / pipe capacity, to exercise the forward path.
        raw_half_close(relay.addr, srv.addr, &prng_bytes(7, 3 * 1024 * 1024 + 17));
        // Empty: FIN right after the handshake.
        raw_half_close(relay.addr, srv.addr, b"");
    }
}

#[test]
fn raw_fin_propagates_both_ways_splice_and_copy() {
    let _guard = shared();
    // Client FIN -> relay -> echo server, which then FINs back -> relay -> client EOF.
    let echo = echo_server("127.0.0.1:0");
    for mode in FORWARD_MODES {
        let relay = Relay::start(&["--forward", mode]);
        let mut s = socks_connect(relay.addr, echo.addr);
        let data = prng_bytes(11, 200_000);
        echo_roundtrip(&s, &data);
        s.shutdown(Shutdown::Write).unwrap();
        // Echo server sees EOF, half-closes back; we must then see EOF (not hang).
        assert_closed(
            &mut s,
            Duration::from_secs(10),
            "EOF after echo server's FIN",
        );
    }
}
