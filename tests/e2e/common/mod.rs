//! Shared end-to-end helpers: spawn the real `ringsocks` binary on loopback,
//! small std-thread servers (HTTP, echo, reply-after-EOF, peer-reporting)
//! and a hand-rolled SOCKS5 client for probes.
//!
//! Every address used here is loopback. Every loop is bounded in count or time.
//!
//! `RINGSOCKS_TEST_BIN` may point at another SOCKS5 server wrapper that speaks the
//! same command-line/readiness contract (used to validate the harness itself, e.g.
//! `tests/support/microsocks-shim.sh`); by default the cargo-built binary is used.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{
    IpAddr, Ipv4Addr, Ipv6Addr, Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket,
};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

mod guard;
mod proc;
pub use guard::*;
pub use proc::*;

/// How long the relay gets to print its `listening` lines.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);
/// Default I/O timeout on test sockets so no test can hang forever.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// The relay process
// ---------------------------------------------------------------------------

/// Path of the binary under test.
pub fn relay_bin() -> PathBuf {
    match std::env::var_os("RINGSOCKS_TEST_BIN") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => PathBuf::from(env!("CARGO_BIN_EXE_ringsocks")),
    }
}

/// A running relay. Killed (by the PID we spawned) and reaped on drop.
pub struct Relay {
    /// First `listening` address.
    pub addr: SocketAddr,
    pub child: Child,
    stderr: Arc<Mutex<String>>,
    stdout: Arc<Mutex<String>>,
    exited: Option<ExitStatus>,
}

/// Why the relay did not become ready.
#[derive(Debug)]
pub struct StartFailure {
    /// Exit status if it exited (None: still running when we gave up, now killed).
    pub status: Option<ExitStatus>,
    pub stderr: String,
    pub stdout: String,
    pub reason: String,
}

fn spawn_reader<R: Read + Send + 'static>(r: R, sink: Arc<Mutex<String>>) -> JoinHandle<()> {
    thread::spawn(move || {
        let mut r = BufReader::new(r);
        let mut line = String::new();
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => break,
                Ok(_) => sink.lock().unwrap().push_str(&line),
            }
        }
    })
}

fn parse_listening(line: &str) -> Option<SocketAddr> {
    line.trim().strip_prefix("listening ")?.trim().parse().ok()
}

impl Relay {
    /// Start the relay with `args`; adds `--listen 127.0.0.1:0` unless a `--listen` is given.
    /// Panics (with the relay's stderr) if it is not ready within 10 s.
    pub fn start(args: &[&str]) -> Relay {
        match Relay::try_start(args) {
            Ok(r) => r,
            Err(f) => panic!(
                "relay {:?} {:?} failed to start: {}\nstatus: {:?}\nstdout:\n{}\nstderr:\n{}",
                relay_bin(),
                args,
                f.reason,
                f.status,
                f.stdout,
                f.stderr
            ),
        }
    }

    pub fn try_start(args: &[&str]) -> Result<Relay, StartFailure> {
        Relay::try_start_wrapped(&[], args)
    }

    /// Like `start`, with the relay run under `wrapper` (e.g. `["prlimit", "--nofile=64"]`), a
    /// command that execs the relay so that the PID stays the relay's.
    pub fn start_wrapped(wrapper: &[&str], args: &[&str]) -> Relay {
        Relay::try_start_wrapped(wrapper, args)
            .unwrap_or_else(|f| panic!("relay {wrapper:?} {args:?} failed to start: {f:?}"))
    }

    fn try_start_wrapped(wrapper: &[&str], args: &[&str]) -> Result<Relay, StartFailure> {
        assert_guarded();
        let mut full: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        let listens = args.iter().filter(|a| **a == "--listen").count();
        if listens == 0 {
            full.push("--listen".into());
            full.push("127.0.0.1:0".into());
        }
        let expected = listens.max(1);
        let mut cmd = match wrapper.split_first() {
            Some((prog, rest)) => {
                let mut c = Command::new(prog);
                c.args(rest).arg(relay_bin());
                c
            }
            None => Command::new(relay_bin()),
        };
        let mut child = cmd
            .args(&full)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {:?}: {e}", relay_bin()));
        let stderr = Arc::new(Mutex::new(String::new()));
        let stderr_thread = spawn_reader(child.stderr.take().unwrap(), stderr.clone());
        let stdout_log = Arc::new(Mutex::new(String::new()));
        let (tx, rx) = mpsc::channel::<Option<String>>();
        {
            let out = child.stdout.take().unwrap();
            let stdout_log = stdout_log.clone();
            thread::spawn(move || {
                let mut r = BufReader::new(out);
                let mut line = String::new();
                loop {
                    line.clear();
                    match r.read_line(&mut line) {
                        Ok(0) | Err(_) => {
                            let _ = tx.send(None);
                            break;
                        }
                        Ok(_) => {
                            stdout_log.lock().unwrap().push_str(&line);
                            // The receiver may be gone once we are ready; keep draining.
                            let _ = tx.send(Some(line.clone()));
                        }
                    }
                }
            });
        }
        let deadline = Instant::now() + READY_TIMEOUT;
        let mut addrs = Vec::new();
        let mut reason = String::new();
        while addrs.len() < expected {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(Some(line)) => {
                    if let Some(a) = parse_listening(&line) {
                        addrs.push(a);
                    }
                }
                Ok(None) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    reason = "stdout closed before readiness".into();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    reason = format!("no `listening` line within {READY_TIMEOUT:?}");
                    break;
                }
            }
        }
        if addrs.len() == expected {
            return Ok(Relay {
                addr: addrs[0],
                child,
                stderr,
                stdout: stdout_log,
                exited: None,
            });
        }
        // Not ready: collect exit status (bounded), kill if still running.
        let status = wait_child(&mut child, Duration::from_secs(5));
        let status = match status {
            Some(s) => Some(s),
            None => {
                let _ = child.kill();
                let _ = child.wait();
                None
            }
        };
        let _ = stderr_thread.join();
        let stderr = stderr.lock().unwrap().clone();
        let stdout = stdout_log.lock().unwrap().clone();
        Err(StartFailure {
            status,
            stderr,
            stdout,
            reason,
        })
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Where `--metrics 127.0.0.1:0` listens: the relay's `metrics ADDR` line.
    pub fn metrics_addr(&self) -> SocketAddr {
        let out = self.stdout.lock().unwrap().clone();
        out.lines()
            .find_map(|l| l.strip_prefix("metrics ")?.trim().parse().ok())
            .unwrap_or_else(|| panic!("no `metrics ADDR` line on stdout:\n{out}"))
    }

    /// Everything the relay wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().clone()
    }

    /// Send a signal by name (`TERM`, `INT`) to the PID we spawned, via `kill(1)`.
    pub fn signal(&self, sig: &str) {
        let st = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.pid().to_string())
            .status()
            .expect("run kill(1)");
        assert!(st.success(), "kill -{sig} {} failed: {st}", self.pid());
    }

    /// Wait (bounded) for the relay to exit on its own.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.exited.is_none() {
            self.exited = wait_child(&mut self.child, timeout);
        }
        self.exited
    }

    /// Is the process still running?
    pub fn is_running(&mut self) -> bool {
        if self.exited.is_some() {
            return false;
        }
        match self.child.try_wait() {
            Ok(Some(s)) => {
                self.exited = Some(s);
                false
            }
            _ => true,
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        if self.exited.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
        if thread::panicking() {
            eprintln!(
                "---- relay (pid {}) stderr ----\n{}\n---- end relay stderr ----",
                self.child.id(),
                self.stderr()
            );
        }
    }
}

fn wait_child(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(s)) = child.try_wait() {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// Wait for an arbitrary child with a deadline; kills it (it is ours) on timeout.
pub fn wait_child_or_kill(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let r = wait_child(child, timeout);
    if r.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    r
}

// ---------------------------------------------------------------------------
// Deterministic data
// ---------------------------------------------------------------------------

/// xorshift64* stream: deterministic pseudo-random bytes for a seed.
pub fn prng_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        out.extend_from_slice(&x.wrapping_mul(0x2545_F491_4F6C_DD1D).to_le_bytes());
    }
    out.truncate(len);
    out
}

pub const BIG_LEN: usize = 10 * 1024 * 1024;

/// The 10 MB body served at `/big`.
pub fn big_body() -> &'static [u8] {
    static BODY: OnceLock<Vec<u8>> = OnceLock::new();
    BODY.get_or_init(|| prng_bytes(0xB16_B0D7, BIG_LEN))
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(data);
    d.iter().map(|b| format!("{b:02x}")).collect()
}

// ---------------------------------------------------------------------------
// Servers
// ---------------------------------------------------------------------------

/// A background accept loop; stops (and joins) on drop.
pub struct Server {
    pub addr: SocketAddr,
    stop: Arc<AtomicBool>,
    handle: Option<JoinHandle<()>>,
    /// Number of accepted connections.
    pub accepted: Arc<AtomicUsize>,
}

impl Server {
    pub fn spawn<F>(bind: &str, handler: F) -> io::Result<Server>
    where
        F: Fn(TcpStream) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind(bind)?;
        let addr = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let accepted = Arc::new(AtomicUsize::new(0));
        let handler = Arc::new(handler);
        let handle = {
            let stop = stop.clone();
            let accepted = accepted.clone();
            thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(s) = conn else { continue };
                    accepted.fetch_add(1, Ordering::SeqCst);
                    let h = handler.clone();
                    let _ = thread::Builder::new()
                        .stack_size(128 * 1024)
                        .spawn(move || h(s));
                }
            })
        };
        Ok(Server {
            addr,
            stop,
            handle: Some(handle),
            accepted,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the blocking accept.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

/// Echo server: copies everything back, then half-closes after the client's EOF.
pub fn echo_server(bind: &str) -> Server {
    Server::spawn(bind, |mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(120)));
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
        let _ = s.shutdown(Shutdown::Write);
    })
    .expect("bind echo server")
}

/// What a reply-after-EOF server received, one entry per connection that reached EOF.
pub type Received = Arc<Mutex<Vec<Vec<u8>>>>;

/// Reads until EOF, then replies `got <n> bytes sha256=<hex>\n` and closes.
pub fn reply_after_eof_server(bind: &str) -> (Server, Received) {
    let received: Received = Arc::new(Mutex::new(Vec::new()));
    let rec = received.clone();
    let server = Server::spawn(bind, move |mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let mut data = Vec::new();
        if s.read_to_end(&mut data).is_err() {
            return;
        }
        rec.lock().unwrap().push(data.clone());
        let reply = reply_after_eof_text(&data);
        let _ = s.write_all(reply.as_bytes());
        let _ = s.shutdown(Shutdown::Both);
    })
    .expect("bind reply-after-eof server");
    (server, received)
}

pub fn reply_after_eof_text(data: &[u8]) -> String {
    format!("got {} bytes sha256={}\n", data.len(), sha256_hex(data))
}

/// Writes the peer address it sees (`ip:port\n`) then echoes.
pub fn peer_server(bind: &str) -> Server {
    Server::spawn(bind, |mut s| {
        let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
        let p = match s.peer_addr() {
            Ok(p) => p,
            Err(_) => return,
        };
        if s.write_all(format!("{p}\n").as_bytes()).is_err() {
            return;
        }
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if s.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            }
        }
    })
    .expect("bind peer server")
}

/// Minimal HTTP/1.1 server: `GET /big` -> the 10 MB body, anything else -> `hello\n`.
pub fn http_server(bind: &str) -> io::Result<Server> {
    Server::spawn(bind, serve_http)
}

/// HTTP server reachable on 127.0.0.1 and (if available) [::1] on the same port,
/// so `localhost` works whatever order the resolver returns.
pub fn http_server_localhost() -> (Server, Option<Server>) {
    for _ in 0..20 {
        let v4 = http_server("127.0.0.1:0").expect("bind http 127.0.0.1");
        if !has_ipv6_loopback() {
            return (v4, None);
        }
        if let Ok(v6) = http_server(&format!("[::1]:{}", v4.port())) {
            return (v4, Some(v6));
        }
    }
    panic!("could not bind an HTTP server on the same port on 127.0.0.1 and [::1]");
}

fn serve_http(mut s: TcpStream) {
    let _ = s.set_read_timeout(Some(Duration::from_secs(30)));
    // Read the request head (bounded).
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() > 64 * 1024 {
            return;
        }
        match s.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head);
    let path = text
        .lines()
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .unwrap_or("/")
        .to_string();
    let body: &[u8] = if path == "/big" {
        big_body()
    } else {
        b"hello\n"
    };
    let hdr = format!(
        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if s.write_all(hdr.as_bytes()).is_ok() {
        let _ = s.write_all(body);
    }
    let _ = s.shutdown(Shutdown::Write);
    // Let the client read everything before the socket is dropped (avoids RST on unread data).
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.read(&mut buf);
}

// ---------------------------------------------------------------------------
// Raw SOCKS5 client
// ---------------------------------------------------------------------------

pub const CMD_CONNECT: u8 = 0x01;
pub const CMD_BIND: u8 = 0x02;
pub const CMD_UDP_ASSOCIATE: u8 = 0x03;

/// Destination of a SOCKS5 request.
#[derive(Clone, Debug)]
pub enum Target {
    Addr(SocketAddr),
    Domain(String, u16),
}

impl From<SocketAddr> for Target {
    fn from(a: SocketAddr) -> Self {
        Target::Addr(a)
    }
}

/// `05 n methods...`
pub fn greeting(methods: &[u8]) -> Vec<u8> {
    let mut v = vec![0x05, methods.len() as u8];
    v.extend_from_slice(methods);
    v
}

/// RFC 1929 `01 ulen user plen pass`.
pub fn auth_request(user: &str, pass: &str) -> Vec<u8> {
    let mut v = vec![0x01, user.len() as u8];
    v.extend_from_slice(user.as_bytes());
    v.push(pass.len() as u8);
    v.extend_from_slice(pass.as_bytes());
    v
}

/// `05 cmd 00 atyp addr port`.
pub fn request(cmd: u8, target: &Target) -> Vec<u8> {
    let mut v = vec![0x05, cmd, 0x00];
    match target {
        Target::Addr(SocketAddr::V4(a)) => {
            v.push(0x01);
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
        }
        Target::Addr(SocketAddr::V6(a)) => {
            v.push(0x04);
            v.extend_from_slice(&a.ip().octets());
            v.extend_from_slice(&a.port().to_be_bytes());
        }
        Target::Domain(d, port) => {
            v.push(0x03);
            v.push(d.len() as u8);
            v.extend_from_slice(d.as_bytes());
            v.extend_from_slice(&port.to_be_bytes());
        }
    }
    v
}

/// A parsed SOCKS5 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub rep: u8,
    pub bnd: BndAddr,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BndAddr {
    Addr(SocketAddr),
    Domain(String, u16),
}

/// Read one SOCKS5 reply (`05 rep 00 atyp addr port`).
pub fn read_reply<R: Read>(s: &mut R) -> io::Result<Reply> {
    let mut h = [0u8; 4];
    s.read_exact(&mut h)?;
    if h[0] != 0x05 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("reply version {:#04x} (header {:02x?})", h[0], h),
        ));
    }
    let bnd = match h[3] {
        0x01 => {
            let mut a = [0u8; 6];
            s.read_exact(&mut a)?;
            let ip = Ipv4Addr::new(a[0], a[1], a[2], a[3]);
            BndAddr::Addr(SocketAddr::new(
                IpAddr::V4(ip),
                u16::from_be_bytes([a[4], a[5]]),
            ))
        }
        0x04 => {
            let mut a = [0u8; 18];
            s.read_exact(&mut a)?;
            let mut o = [0u8; 16];
            o.copy_from_slice(&a[..16]);
            BndAddr::Addr(SocketAddr::new(
                IpAddr::V6(Ipv6Addr::from(o)),
                u16::from_be_bytes([a[16], a[17]]),
            ))
        }
        0x03 => {
            let mut l = [0u8; 1];
            s.read_exact(&mut l)?;
            let mut d = vec![0u8; l[0] as usize + 2];
            s.read_exact(&mut d)?;
            let n = d.len();
            let port = u16::from_be_bytes([d[n - 2], d[n - 1]]);
            BndAddr::Domain(String::from_utf8_lossy(&d[..n - 2]).into_owned(), port)
        }
        t => {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("reply ATYP {t:#04x} (header {h:02x?})"),
            ))
        }
    };
    Ok(Reply { rep: h[1], bnd })
}

/// Connect to the relay with test timeouts set.
pub fn connect(relay: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&relay, IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect to relay {relay}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Method negotiation (+ RFC 1929 if `auth`), returning the method the server chose.
pub fn negotiate(s: &mut TcpStream, auth: Option<(&str, &str)>) -> io::Result<u8> {
    let methods: &[u8] = if auth.is_some() {
        &[0x00, 0x02]
    } else {
        &[0x00]
    };
    s.write_all(&greeting(methods))?;
    let mut m = [0u8; 2];
    s.read_exact(&mut m)?;
    if m[0] != 0x05 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("method reply {m:02x?}"),
        ));
    }
    if m[1] == 0x02 {
        let (u, p) = auth.ok_or_else(|| io::Error::other("server wants auth"))?;
        s.write_all(&auth_request(u, p))?;
        let mut r = [0u8; 2];
        s.read_exact(&mut r)?;
        if r != [0x01, 0x00] {
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("auth reply {r:02x?}"),
            ));
        }
    }
    Ok(m[1])
}

/// Full SOCKS5 handshake for `cmd` to `target`; returns the stream and the reply.
pub fn socks_request(
    relay: SocketAddr,
    auth: Option<(&str, &str)>,
    cmd: u8,
    target: &Target,
) -> io::Result<(TcpStream, Reply)> {
    let mut s = connect(relay);
    let m = negotiate(&mut s, auth)?;
    if m == 0xFF {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "no acceptable method (05 FF)",
        ));
    }
    s.write_all(&request(cmd, target))?;
    let r = read_reply(&mut s)?;
    Ok((s, r))
}

/// CONNECT through the relay; panics unless REP is 0x00.
pub fn socks_connect(relay: SocketAddr, target: impl Into<Target>) -> TcpStream {
    let target = target.into();
    let (s, r) = socks_request(relay, None, CMD_CONNECT, &target)
        .unwrap_or_else(|e| panic!("SOCKS CONNECT {target:?} via {relay}: {e}"));
    assert_eq!(r.rep, 0x00, "CONNECT {target:?} via {relay}: reply {r:?}");
    s
}

/// Outcome of waiting for the peer to close.
#[derive(Debug, PartialEq, Eq)]
pub enum CloseOutcome {
    /// read() returned 0 or ECONNRESET after `elapsed`; `extra` is any data seen first.
    Closed { extra: Vec<u8> },
    /// Still open at the deadline.
    StillOpen { extra: Vec<u8> },
}

/// Read until EOF/reset or `within` elapses. Data read on the way is collected.
pub fn wait_closed(s: &mut TcpStream, within: Duration) -> (CloseOutcome, Duration) {
    let start = Instant::now();
    let deadline = start + within;
    let mut extra = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return (CloseOutcome::StillOpen { extra }, start.elapsed());
        }
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match s.read(&mut buf) {
            Ok(0) => return (CloseOutcome::Closed { extra }, start.elapsed()),
            Ok(n) => {
                extra.extend_from_slice(&buf[..n]);
                if extra.len() > 1 << 20 {
                    return (CloseOutcome::StillOpen { extra }, start.elapsed());
                }
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                return (CloseOutcome::Closed { extra }, start.elapsed())
            }
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) => {}
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => panic!("unexpected read error while waiting for close: {e}"),
        }
    }
}

/// Assert the relay closes `s` within `within` with no further data.
pub fn assert_closed(s: &mut TcpStream, within: Duration, what: &str) {
    let (o, el) = wait_closed(s, within);
    assert_eq!(
        o,
        CloseOutcome::Closed { extra: vec![] },
        "{what}: expected the relay to close the connection within {within:?} (waited {el:?})"
    );
}

/// Echo `data` through `s` (write all from a helper thread, read it back) and compare.
pub fn echo_roundtrip(s: &TcpStream, data: &[u8]) {
    let mut w = s.try_clone().unwrap();
    let owned = data.to_vec();
    let writer = thread::spawn(move || w.write_all(&owned));
    let mut got = vec![0u8; data.len()];
    let mut r = s.try_clone().unwrap();
    r.read_exact(&mut got)
        .unwrap_or_else(|e| panic!("reading {} echoed bytes: {e}", data.len()));
    writer.join().unwrap().expect("write to relay");
    assert!(got == data, "echoed data differs from what was sent");
}

// ---------------------------------------------------------------------------
// Misc
// ---------------------------------------------------------------------------

pub fn has_ipv6_loopback() -> bool {
    TcpListener::bind("[::1]:0").is_ok()
}

/// A port on 127.0.0.1 that nothing listens on (bound then released).
pub fn closed_port() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let a = l.local_addr().unwrap();
    drop(l);
    a
}

/// A fresh path under cargo's per-test tmp dir.
pub fn tmp_path(name: &str) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR"));
    std::fs::create_dir_all(dir).unwrap();
    dir.join(format!(
        "{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::SeqCst),
        name
    ))
}

/// Require an external tool: fail (not skip) when it is missing.
pub fn require_tool(name: &str) {
    let ok = Command::new(name)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok();
    assert!(
        ok,
        "`{name}` is required on PATH for this test (CI installs it)"
    );
}

/// Run curl with bounded time; returns its output.
pub fn curl(args: &[&str]) -> Output {
    require_tool("curl");
    let child = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--connect-timeout", "10"])
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn curl");
    // curl's own --max-time bounds this.
    child.wait_with_output().expect("wait curl")
}

/// curl through `relay` (plain `--socks5`) for `url`, asserting success; returns the body.
pub fn curl_ok(relay: SocketAddr, url: &str) -> Vec<u8> {
    let proxy = relay.to_string();
    let out = curl(&["--socks5", &proxy, url]);
    assert!(
        out.status.success(),
        "curl --socks5 {proxy} {url} failed: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The two forwarding modes every forwarding test runs under.
pub const FORWARD_MODES: [&str; 3] = ["splice", "copy", "auto"];

// ---------------------------------------------------------------------------
// UDP ASSOCIATE: datagram headers, associations, UDP targets
// ---------------------------------------------------------------------------

/// Is the binary under test ringsocks itself (no `RINGSOCKS_TEST_BIN` wrapper)?
pub fn testing_ringsocks() -> bool {
    std::env::var_os("RINGSOCKS_TEST_BIN").is_none_or(|p| p.is_empty())
}

/// For tests of ringsocks-specific behaviour (flags, log lines, FRAG): true, with a printed
/// note, when another server is under test, so that the caller can `return` early.
pub fn skip_unless_ringsocks(test: &str) -> bool {
    if testing_ringsocks() {
        return false;
    }
    println!(
        "note: {test}: skipped, ringsocks-specific (RINGSOCKS_TEST_BIN={:?})",
        relay_bin()
    );
    true
}

/// Receive and send buffers of `bytes` on any socket: SO_RCVBUFFORCE/SO_SNDBUFFORCE
/// (root), else the plain options (capped by rmem_max/wmem_max).
// socket2 has no setter for the FORCE options; the crate's lints deny raw calls elsewhere.
#[allow(unsafe_code)]
pub fn set_socket_buffers<S: std::os::fd::AsRawFd>(s: &S, bytes: usize) {
    let fd = s.as_raw_fd();
    let v = bytes.min(i32::MAX as usize) as libc::c_int;
    for (force, plain) in [
        (libc::SO_RCVBUFFORCE, libc::SO_RCVBUF),
        (libc::SO_SNDBUFFORCE, libc::SO_SNDBUF),
    ] {
        let set = |opt| {
            // SAFETY: setsockopt with a valid fd and a pointer to a live c_int of that size.
            unsafe {
                libc::setsockopt(
                    fd,
                    libc::SOL_SOCKET,
                    opt,
                    (&v as *const libc::c_int).cast(),
                    std::mem::size_of::<libc::c_int>() as libc::socklen_t,
                )
            }
        };
        if set(force) != 0 {
            set(plain);
        }
    }
}

/// A UDP socket bound to `bind`, with the test I/O timeouts and 4 MiB buffers.
pub fn udp_bind(bind: &str) -> UdpSocket {
    let s = UdpSocket::bind(bind).unwrap_or_else(|e| panic!("bind UDP {bind}: {e}"));
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    set_socket_buffers(&s, 4 << 20);
    s
}

/// RFC 1928 §7 header `00 00 FRAG ATYP DST.ADDR DST.PORT` for `dst`.
pub fn udp_header(frag: u8, dst: &Target) -> Vec<u8> {
    // Same address encoding as a request: `05 cmd 00 atyp ...` with the first three replaced.
    let mut v = request(0, dst);
    v[..3].copy_from_slice(&[0, 0, frag]);
    v
}

/// Header + payload.
pub fn udp_datagram(frag: u8, dst: &Target, payload: &[u8]) -> Vec<u8> {
    let mut v = udp_header(frag, dst);
    v.extend_from_slice(payload);
    v
}

/// A datagram from the relay to the client, parsed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UdpReply {
    pub frag: u8,
    /// ATYP as sent (1, 3 or 4).
    pub atyp: u8,
    /// The replying host's address (DST.ADDR/DST.PORT of the reply header).
    pub src: BndAddr,
    pub data: Vec<u8>,
}

/// Parse a datagram the relay sent to the client.
pub fn parse_udp_reply(d: &[u8]) -> io::Result<UdpReply> {
    if d.len() < 4 || d[0] != 0 || d[1] != 0 {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "UDP reply header {:02x?} (len {})",
                &d[..d.len().min(8)],
                d.len()
            ),
        ));
    }
    // Reuse the reply parser: `05 00 00 atyp addr port` has the same address layout.
    let mut tmp = d.to_vec();
    tmp[..3].copy_from_slice(&[0x05, 0x00, 0x00]);
    let mut cur = io::Cursor::new(&tmp[..]);
    let r = read_reply(&mut cur)?;
    let off = cur.position() as usize;
    Ok(UdpReply {
        frag: d[2],
        atyp: d[3],
        src: r.bnd,
        data: d[off..].to_vec(),
    })
}

/// UDP ASSOCIATE handshake (no auth) with `dst` in the request.
pub fn udp_associate_raw(relay: SocketAddr, dst: &Target) -> io::Result<(TcpStream, Reply)> {
    socks_request(relay, None, CMD_UDP_ASSOCIATE, dst)
}

/// The address a client sends datagrams to: BND from a successful reply. Panics unless
/// REP is 0x00 and BND is an IP address with a port, not the unspecified address.
pub fn usable_bnd(r: &Reply, what: &str) -> SocketAddr {
    assert_eq!(r.rep, 0x00, "{what}: UDP ASSOCIATE reply {r:?}");
    match r.bnd {
        BndAddr::Addr(a) => {
            assert!(
                !a.ip().is_unspecified() && a.port() != 0,
                "{what}: BND {a} is not an address a client can send to"
            );
            a
        }
        BndAddr::Domain(ref d, p) => panic!("{what}: BND is a domain {d}:{p}"),
    }
}

/// One UDP association: the control connection and the client's UDP socket.
pub struct UdpAssoc {
    pub control: TcpStream,
    pub sock: UdpSocket,
    /// Where datagrams go: BND from the reply.
    pub relay_udp: SocketAddr,
    pub reply: Reply,
}

impl UdpAssoc {
    /// Associate with `dst` in the request, using `sock` as the client's UDP socket.
    pub fn open_with(relay: SocketAddr, sock: UdpSocket, dst: &Target) -> UdpAssoc {
        let (control, reply) = udp_associate_raw(relay, dst)
            .unwrap_or_else(|e| panic!("UDP ASSOCIATE via {relay} (DST {dst:?}): {e}"));
        let relay_udp = usable_bnd(&reply, &format!("UDP ASSOCIATE via {relay}"));
        UdpAssoc {
            control,
            sock,
            relay_udp,
            reply,
        }
    }

    /// A UDP socket bound on `bind`, associated with its own address as DST (what a client
    /// that knows its endpoint sends).
    pub fn open(relay: SocketAddr, bind: &str) -> UdpAssoc {
        let sock = udp_bind(bind);
        let me = sock.local_addr().unwrap();
        UdpAssoc::open_with(relay, sock, &Target::Addr(me))
    }

    pub fn send_raw(&self, datagram: &[u8]) {
        let n = self
            .sock
            .send_to(datagram, self.relay_udp)
            .unwrap_or_else(|e| panic!("send {} bytes to {}: {e}", datagram.len(), self.relay_udp));
        assert_eq!(n, datagram.len());
    }

    pub fn send(&self, frag: u8, dst: &Target, payload: &[u8]) {
        self.send_raw(&udp_datagram(frag, dst, payload));
    }

    /// Next datagram from the relay within `within` (None on timeout). Datagrams from any
    /// other source are ignored.
    pub fn recv(&self, within: Duration) -> Option<UdpReply> {
        recv_reply(&self.sock, self.relay_udp, within)
    }

    /// Send `payload` to `target` and expect the echo back from `target`.
    pub fn expect_echo(&self, target: SocketAddr, payload: &[u8]) {
        self.send(0, &Target::Addr(target), payload);
        let r = self.recv(Duration::from_secs(5)).unwrap_or_else(|| {
            panic!(
                "no echo of {} bytes from {target} via {} within 5 s",
                payload.len(),
                self.relay_udp
            )
        });
        assert_eq!(
            r.src,
            BndAddr::Addr(target),
            "reply header must carry the replying host"
        );
        assert_eq!(r.frag, 0, "reply FRAG");
        assert!(
            r.data == payload,
            "echoed payload differs: sent {} bytes, got {}",
            payload.len(),
            r.data.len()
        );
    }
}

/// Receive one datagram from `relay_udp` on `sock` within `within`; others are skipped.
pub fn recv_reply(sock: &UdpSocket, relay_udp: SocketAddr, within: Duration) -> Option<UdpReply> {
    let deadline = Instant::now() + within;
    let mut buf = vec![0u8; 70_000];
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        sock.set_read_timeout(Some(left.max(Duration::from_millis(1))))
            .unwrap();
        match sock.recv_from(&mut buf) {
            Ok((n, from)) if from == relay_udp => {
                let r = parse_udp_reply(&buf[..n])
                    .unwrap_or_else(|e| panic!("bad datagram from the relay {from}: {e}"));
                return Some(r);
            }
            Ok((_, from)) => eprintln!("ignoring a datagram from {from} (not {relay_udp})"),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock
                        | io::ErrorKind::TimedOut
                        | io::ErrorKind::Interrupted
                ) => {}
            // ICMP port unreachable from an earlier send (e.g. the relay closed the port).
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {}
            Err(e) => panic!("recv on {:?}: {e}", sock.local_addr()),
        }
    }
}

/// Datagrams a [`UdpServer`] received: (source, payload), in arrival order.
pub type UdpLog = Arc<Mutex<Vec<(SocketAddr, Vec<u8>)>>>;

/// A UDP target on loopback: records every datagram and optionally echoes it.
/// Stops (and joins its threads) on drop.
pub struct UdpServer {
    pub addr: SocketAddr,
    pub log: UdpLog,
    pub count: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    handles: Vec<JoinHandle<()>>,
}

impl UdpServer {
    /// Echo server with one thread.
    pub fn echo(bind: &str) -> UdpServer {
        UdpServer::start(bind, true, 1, 4 << 20, true)
    }

    /// Records but never answers.
    pub fn sink(bind: &str) -> UdpServer {
        UdpServer::start(bind, false, 1, 4 << 20, true)
    }

    /// `threads` threads on one socket with `rcvbuf` bytes of receive buffer; `record`
    /// keeps every datagram in `log` (else only `count`).
    pub fn start(bind: &str, echo: bool, threads: usize, rcvbuf: usize, record: bool) -> UdpServer {
        UdpServer::try_start(bind, echo, threads, rcvbuf, record)
            .unwrap_or_else(|e| panic!("bind UDP target {bind}: {e}"))
    }

    pub fn try_start(
        bind: &str,
        echo: bool,
        threads: usize,
        rcvbuf: usize,
        record: bool,
    ) -> io::Result<UdpServer> {
        let sock = UdpSocket::bind(bind)?;
        set_socket_buffers(&sock, rcvbuf);
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        sock.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
        let addr = sock.local_addr().unwrap();
        let log: UdpLog = Arc::new(Mutex::new(Vec::new()));
        let count = Arc::new(AtomicUsize::new(0));
        let stop = Arc::new(AtomicBool::new(false));
        let handles = (0..threads.max(1))
            .map(|_| {
                let sock = sock.try_clone().unwrap();
                let (log, count, stop) = (log.clone(), count.clone(), stop.clone());
                thread::spawn(move || {
                    let mut buf = vec![0u8; 65_536];
                    while !stop.load(Ordering::SeqCst) {
                        let (n, from) = match sock.recv_from(&mut buf) {
                            Ok(x) => x,
                            Err(_) => continue,
                        };
                        // Recorded before the echo leaves, so a client that got the echo
                        // finds its datagram in the log.
                        if record {
                            log.lock().unwrap().push((from, buf[..n].to_vec()));
                        }
                        count.fetch_add(1, Ordering::SeqCst);
                        if echo {
                            let _ = sock.send_to(&buf[..n], from);
                        }
                    }
                })
            })
            .collect();
        Ok(UdpServer {
            addr,
            log,
            count,
            stop,
            handles,
        })
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    pub fn received(&self) -> usize {
        self.count.load(Ordering::SeqCst)
    }

    pub fn payloads(&self) -> Vec<Vec<u8>> {
        self.log
            .lock()
            .unwrap()
            .iter()
            .map(|(_, d)| d.clone())
            .collect()
    }
}

impl Drop for UdpServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for h in self.handles.drain(..) {
            let _ = h.join();
        }
    }
}

/// TCP connection to `relay` from a chosen local IP (e.g. 127.0.0.5), with test timeouts.
pub fn connect_from(local: IpAddr, relay: SocketAddr) -> TcpStream {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(relay), Type::STREAM, None).unwrap();
    s.bind(&SocketAddr::new(local, 0).into())
        .unwrap_or_else(|e| panic!("bind {local}: {e}"));
    s.connect_timeout(&relay.into(), IO_TIMEOUT)
        .unwrap_or_else(|e| panic!("connect {local} -> {relay}: {e}"));
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_write_timeout(Some(IO_TIMEOUT)).unwrap();
    s.set_nodelay(true).unwrap();
    s
}

/// Close with an RST (SO_LINGER 0) instead of a FIN.
pub fn close_with_rst(s: TcpStream) {
    socket2::SockRef::from(&s)
        .set_linger(Some(Duration::ZERO))
        .unwrap();
    drop(s);
}

// ---------------------------------------------------------------------------
// Relay logs
// ---------------------------------------------------------------------------

/// Wait until the relay's stderr has at least `n` lines containing `needle`; returns them
/// (fewer if the deadline passed).
pub fn wait_log_lines(relay: &Relay, needle: &str, n: usize, within: Duration) -> Vec<String> {
    let deadline = Instant::now() + within;
    loop {
        let lines: Vec<String> = relay
            .stderr()
            .lines()
            .filter(|l| l.contains(needle))
            .map(str::to_string)
            .collect();
        if lines.len() >= n || Instant::now() >= deadline {
            return lines;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// `key=N` in a log line.
pub fn log_field(line: &str, key: &str) -> Option<u64> {
    let pat = format!("{key}=");
    let mut rest = line;
    while let Some(i) = rest.find(&pat) {
        // Must start a field: at the line start or after a space.
        let start_ok = i == 0 || rest.as_bytes()[i - 1] == b' ';
        let after = &rest[i + pat.len()..];
        if start_ok {
            let digits: String = after.chars().take_while(|c| c.is_ascii_digit()).collect();
            return digits.parse().ok();
        }
        rest = after;
    }
    None
}

/// Raise RLIMIT_NOFILE as far as allowed; returns the soft limit now in force.
pub fn raise_nofile_limit() -> u64 {
    let want = 1u64 << 20;
    if rlimit::setrlimit(rlimit::Resource::NOFILE, want, want).is_err() {
        let (_, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap();
        let _ = rlimit::setrlimit(rlimit::Resource::NOFILE, hard, hard);
    }
    rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap().0
}

// ---------------------------------------------------------------------------
// Python helpers (tests/support/*.py)
// ---------------------------------------------------------------------------

/// A Python 3 interpreter that can `import socks` (PySocks): `python3` on PATH, else
/// Debian's /usr/bin/python3 (python3-socks installs there; PATH may hold another Python).
pub fn python_with_socks() -> PathBuf {
    static FOUND: OnceLock<Option<PathBuf>> = OnceLock::new();
    FOUND
        .get_or_init(|| {
            ["python3", "/usr/bin/python3"].iter().find_map(|p| {
                let ok = Command::new(p)
                    .args(["-c", "import socks"])
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok_and(|s| s.success());
                ok.then(|| PathBuf::from(p))
            })
        })
        .clone()
        .expect("a python3 with PySocks (`import socks`) is required (CI installs python3-socks)")
}

/// Path of a script in tests/support.
pub fn support_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/support")
        .join(name)
}

/// Starts `prog args` with stdin closed and stdout and stderr piped.
fn spawn_piped(prog: &Path, args: &[String]) -> Child {
    Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {prog:?}: {e}"))
}

/// Run `prog args` with captured output, killed after `timeout`. Returns the exit status
/// (None: killed at the deadline), stdout and stderr.
pub fn run_bounded(
    prog: &Path,
    args: &[String],
    timeout: Duration,
) -> (Option<ExitStatus>, String, String) {
    let mut child = spawn_piped(prog, args);
    let out = Arc::new(Mutex::new(String::new()));
    let err = Arc::new(Mutex::new(String::new()));
    let t1 = spawn_reader(child.stdout.take().unwrap(), out.clone());
    let t2 = spawn_reader(child.stderr.take().unwrap(), err.clone());
    let status = wait_child_or_kill(&mut child, timeout);
    let _ = t1.join();
    let _ = t2.join();
    let out = out.lock().unwrap().clone();
    let err = err.lock().unwrap().clone();
    (status, out, err)
}

/// A helper process (e.g. the DNS stub) that prints one readiness line; killed on drop.
pub struct Helper {
    pub child: Child,
    /// The first stdout line.
    pub ready_line: String,
    pub output: Arc<Mutex<String>>,
}

impl Helper {
    pub fn start(prog: &Path, args: &[String]) -> Helper {
        let mut child = spawn_piped(prog, args);
        let output = Arc::new(Mutex::new(String::new()));
        spawn_reader(child.stderr.take().unwrap(), output.clone());
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().unwrap();
        let log = output.clone();
        thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut line = String::new();
            let mut first = true;
            loop {
                line.clear();
                match r.read_line(&mut line) {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {
                        if first {
                            let _ = tx.send(line.trim().to_string());
                            first = false;
                        } else {
                            log.lock().unwrap().push_str(&line);
                        }
                    }
                }
            }
        });
        match rx.recv_timeout(READY_TIMEOUT) {
            Ok(ready_line) => Helper {
                child,
                ready_line,
                output,
            },
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "{prog:?} {args:?} printed no readiness line; output:\n{}",
                    output.lock().unwrap()
                );
            }
        }
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `ss -tnH[o] state established sport = :PORT`: one line per established TCP socket whose
/// local port is `port` (the relay's side of its clients; the relay keeps sockets in
/// io_uring's fixed-file table, so /proc/PID/fd does not show them). `timers` adds `-o`.
pub fn ss_established(port: u16, timers: bool) -> String {
    require_tool("ss");
    let out = Command::new("ss")
        .args([
            if timers { "-tnoH" } else { "-tnH" },
            "state",
            "established",
            "sport",
            "=",
        ])
        .arg(format!(":{port}"))
        .output()
        .expect("run ss");
    assert!(
        out.status.success(),
        "ss: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Starts the relay in a private mount namespace (`unshare --mount`) in which each
/// `(file, over)` pair bind-mounts `file` over the system file `over` (say, a hosts file
/// over /etc/hosts); the relay execs in place, so its PID is the one we started.
pub fn relay_with_mounts(mounts: &[(&Path, &str)], args: &[&str]) -> Relay {
    require_tool("unshare");
    let binds: Vec<String> = mounts
        .iter()
        .map(|(file, over)| format!("mount --bind {} {over}", file.display()))
        .collect();
    let script = format!("{} && exec \"$0\" \"$@\"", binds.join(" && "));
    Relay::start_wrapped(
        &[
            "unshare",
            "--mount",
            "--propagation",
            "private",
            "sh",
            "-c",
            &script,
        ],
        args,
    )
}
