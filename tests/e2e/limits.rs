//! Running out of file descriptors at accept: the relay logs, backs off without spinning, and
//! serves again once descriptors are free. The relay runs under `prlimit --nofile=64`.

use crate::common::*;
use std::net::TcpStream;
use std::time::{Duration, Instant};

#[test]
fn emfile_at_accept_backs_off_and_recovers() {
    let _guard = exclusive();
    require_tool("prlimit");
    let http = http_server("127.0.0.1:0").unwrap();
    let relay = Relay::start_wrapped(
        &["prlimit", "--nofile=64:64"],
        &["--shards", "1", "--handshake-timeout", "60s"],
    );
    // Far more connections than 64 fds plus a 64-slot fixed-file table can hold: the kernel
    // completes them into the listen backlog, and the relay's accept runs into EMFILE.
    let mut flood: Vec<TcpStream> = (0..300)
        .map(|_| TcpStream::connect(relay.addr).expect("connect to relay"))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !relay.stderr().contains("accept failed") && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(
        relay.stderr().contains("accept failed"),
        "no 'accept failed' log line; stderr:\n{}",
        relay.stderr()
    );
    // Backing off, not spinning: over 2 s the relay uses well under a core.
    let t0 = proc_cpu_ticks(relay.pid());
    std::thread::sleep(Duration::from_secs(2));
    let used = proc_cpu_ticks(relay.pid()) - t0;
    assert!(
        used < 50,
        "relay used {used} ticks of CPU in 2 s while out of fds"
    );
    let lines = relay.stderr().matches("accept failed").count();
    assert!(
        lines < 100,
        "{lines} 'accept failed' lines: the log is not rate limited"
    );

    // Free the descriptors: the relay accepts again and serves curl.
    flood.clear();
    let deadline = Instant::now() + Duration::from_secs(20);
    let url = format!("http://127.0.0.1:{}/", http.port());
    loop {
        let out = curl(&[
            "-s",
            "--max-time",
            "5",
            "--socks5",
            &relay.addr.to_string(),
            &url,
        ]);
        if out.status.success() {
            assert_eq!(out.stdout, b"hello\n");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "relay did not recover after fds were freed; stderr:\n{}",
            relay.stderr()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}
