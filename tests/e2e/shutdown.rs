//! Graceful shutdown: SIGTERM/SIGINT stop accepting, drain, exit 0.

use crate::common::*;
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

/// Poll (bounded) until a fresh TCP connect to `addr` is refused.
fn wait_refused(addr: SocketAddr, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    while Instant::now() < deadline {
        match TcpStream::connect_timeout(&addr, Duration::from_millis(200)) {
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => return true,
            _ => thread::sleep(Duration::from_millis(20)),
        }
    }
    false
}

#[test]
fn sigterm_stops_accepting_drains_then_exits_zero() {
    let _guard = exclusive();
    let echo = echo_server("127.0.0.1:0");
    let mut relay = Relay::start(&["--drain-timeout", "2s"]);
    let mut s = socks_connect(relay.addr, echo.addr);
    echo_roundtrip(&s, b"before SIGTERM");

    let t0 = Instant::now();
    relay.signal("TERM");
    assert!(
        wait_refused(relay.addr, Duration::from_millis(1500)),
        "new connections must be refused after SIGTERM"
    );
    assert!(
        relay.is_running(),
        "relay exited before draining the open tunnel"
    );
    echo_roundtrip(&s, b"existing tunnel still works while draining");

    let st = relay
        .wait_exit(Duration::from_secs(6))
        .expect("relay did not exit within drain-timeout (2 s) + slack");
    let el = t0.elapsed();
    assert!(st.success(), "exit status after SIGTERM: {st}");
    assert!(
        el <= Duration::from_millis(4500),
        "exit took {el:?} with --drain-timeout 2s"
    );
    assert_closed(
        &mut s,
        Duration::from_secs(2),
        "tunnel after the relay exited",
    );
}

#[test]
fn sigterm_exits_as_soon_as_last_tunnel_closes() {
    let _guard = exclusive();
    let echo = echo_server("127.0.0.1:0");
    let mut relay = Relay::start(&["--drain-timeout", "10s"]);
    let s = socks_connect(relay.addr, echo.addr);
    echo_roundtrip(&s, b"x");
    relay.signal("TERM");
    assert!(wait_refused(relay.addr, Duration::from_millis(1500)));
    thread::sleep(Duration::from_millis(200));
    let t = Instant::now();
    drop(s);
    let st = relay
        .wait_exit(Duration::from_secs(4))
        .expect("relay kept running long after its last tunnel closed (drain-timeout is 10s)");
    assert!(st.success(), "exit status: {st}");
    println!("exited {:?} after the last tunnel closed", t.elapsed());
}

#[test]
fn sigint_when_idle_exits_zero_promptly() {
    let _guard = exclusive();
    let mut relay = Relay::start(&["--drain-timeout", "10s"]);
    let t = Instant::now();
    relay.signal("INT");
    let st = relay
        .wait_exit(Duration::from_secs(3))
        .expect("idle relay did not exit within 3 s of SIGINT");
    assert!(st.success(), "exit status after SIGINT: {st}");
    println!("exited {:?} after SIGINT", t.elapsed());
}
