//! The access log (`--access-log PATH|-`): one line per finished tunnel, association or
//! refused request, as text or JSON (`--access-log-format`).
//!
//! A shard never waits for the disk: it formats the line and hands it to a bounded queue
//! (`try_send`); one writer thread owns the file. When the queue is full the line is dropped
//! and counted (`ringsocks_access_log_dropped_total`), never waited for. SIGUSR1 asks the
//! writer to reopen the file, for logrotate.

use std::fmt::Write as _;
use std::fs::OpenOptions;
use std::io::{BufWriter, Write};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use tracing::warn;

/// Lines that may wait for the writer; past it they are dropped.
const QUEUE: usize = 65_536;

/// `--access-log-format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// `key=value` pairs, strings quoted
    Text,
    /// One JSON object per line
    Json,
}

/// What one line says.
#[derive(Debug)]
pub struct Entry<'a> {
    pub end: SystemTime,
    pub client: Option<SocketAddr>,
    pub user: Option<&'a [u8]>,
    /// "connect", "udp" or "bind".
    pub command: &'static str,
    /// The target as the client wrote it (a name or an address; `0.0.0.0:0` for UDP).
    pub target: &'a str,
    /// The address connected to (CONNECT), or the association's address (UDP).
    pub connected: Option<SocketAddr>,
    pub rep: u8,
    /// Payload bytes client -> target and back.
    pub up: u64,
    pub down: u64,
    pub duration: Duration,
    pub reason: &'a str,
}

enum Msg {
    Line(String),
    Reopen,
}

/// A shard's handle on the access log (each shard holds its own clone).
#[derive(Clone)]
pub struct AccessLog {
    tx: SyncSender<Msg>,
    format: Format,
    dropped: Arc<AtomicU64>,
}

impl std::fmt::Debug for AccessLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLog")
            .field("format", &self.format)
            .finish()
    }
}

/// The writer thread, joined at exit so the last lines reach the file.
pub struct Writer {
    thread: std::thread::JoinHandle<()>,
}

impl Writer {
    pub fn join(self) {
        let _ = self.thread.join();
    }
}

/// Where lines go.
enum Sink {
    Stdout,
    File(PathBuf),
}

impl Sink {
    fn open(&self) -> std::io::Result<Box<dyn Write + Send>> {
        Ok(match self {
            Sink::Stdout => Box::new(std::io::stdout()),
            Sink::File(p) => Box::new(
                OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(p)
                    .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", p.display())))?,
            ),
        })
    }
}

impl AccessLog {
    /// Opens `path` (`-`: standard output) for appending and starts the writer thread.
    pub fn open(path: &str, format: Format) -> std::io::Result<(AccessLog, Writer)> {
        let sink = if path == "-" {
            Sink::Stdout
        } else {
            Sink::File(PathBuf::from(path))
        };
        let out = sink.open()?;
        let (tx, rx) = std::sync::mpsc::sync_channel(QUEUE);
        let thread = std::thread::Builder::new()
            .name("ringsocks-access-log".into())
            .spawn(move || write_lines(rx, sink, out))?;
        let log = AccessLog {
            tx,
            format,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        Ok((log, Writer { thread }))
    }

    /// Lines dropped because the queue was full.
    pub fn dropped(&self) -> Arc<AtomicU64> {
        self.dropped.clone()
    }

    /// Queues one line; never blocks.
    pub fn log(&self, e: &Entry<'_>) {
        let line = match self.format {
            Format::Text => text(e),
            Format::Json => json(e),
        };
        if let Err(TrySendError::Full(_)) = self.tx.try_send(Msg::Line(line)) {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Asks the writer to reopen the file (SIGUSR1, after logrotate moved it).
    pub fn reopen(&self) {
        let _ = self.tx.send(Msg::Reopen);
    }
}

fn write_lines(rx: Receiver<Msg>, sink: Sink, out: Box<dyn Write + Send>) {
    let mut out = BufWriter::with_capacity(64 * 1024, out);
    while let Ok(first) = rx.recv() {
        let mut next = Some(first);
        // Write everything queued, then flush once.
        while let Some(msg) = next {
            match msg {
                Msg::Line(l) => {
                    if let Err(e) = out.write_all(l.as_bytes()) {
                        warn!(error = %e, "access log write failed");
                    }
                }
                Msg::Reopen => {
                    let _ = out.flush();
                    match sink.open() {
                        Ok(w) => out = BufWriter::with_capacity(64 * 1024, w),
                        Err(e) => {
                            warn!(error = %e, "access log reopen failed; writing to the old file")
                        }
                    }
                }
            }
            next = rx.try_recv().ok();
        }
        let _ = out.flush();
    }
    let _ = out.flush();
}

fn time(t: SystemTime) -> String {
    humantime::format_rfc3339_millis(t).to_string()
}

fn user(u: Option<&[u8]>) -> Option<String> {
    u.map(|u| String::from_utf8_lossy(u).into_owned())
}

fn text(e: &Entry<'_>) -> String {
    let mut s = String::with_capacity(200);
    let _ = write!(
        s,
        "{} client={} user={} command={} target={:?} connected={} rep=0x{:02x} up={} down={} duration={:.3}s reason={:?}",
        time(e.end),
        e.client.map_or_else(|| "-".into(), |c| c.to_string()),
        user(e.user).map_or_else(|| "-".into(), |u| format!("{u:?}")),
        e.command,
        e.target,
        e.connected.map_or_else(|| "-".into(), |c| c.to_string()),
        e.rep,
        e.up,
        e.down,
        e.duration.as_secs_f64(),
        e.reason,
    );
    s.push('\n');
    s
}

fn json(e: &Entry<'_>) -> String {
    let v = serde_json::json!({
        "time": time(e.end),
        "client": e.client.map(|c| c.to_string()),
        "user": user(e.user),
        "command": e.command,
        "target": e.target,
        "connected": e.connected.map(|c| c.to_string()),
        "rep": e.rep,
        "bytes_up": e.up,
        "bytes_down": e.down,
        "duration_ms": e.duration.as_secs_f64() * 1000.0,
        "reason": e.reason,
    });
    let mut s = v.to_string();
    s.push('\n');
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry() -> Entry<'static> {
        Entry {
            end: SystemTime::UNIX_EPOCH + Duration::from_millis(1_764_650_000_123),
            client: Some("127.0.0.2:5555".parse().unwrap()),
            user: Some(b"al ice"),
            command: "connect",
            target: "example.com:443",
            connected: Some("192.0.2.1:443".parse().unwrap()),
            rep: 0,
            up: 10,
            down: 20,
            duration: Duration::from_millis(1500),
            reason: "target closed",
        }
    }

    #[test]
    fn text_line() {
        assert_eq!(
            text(&entry()),
            "2025-12-02T04:33:20.123Z client=127.0.0.2:5555 user=\"al ice\" command=connect \
             target=\"example.com:443\" connected=192.0.2.1:443 rep=0x00 up=10 down=20 \
             duration=1.500s reason=\"target closed\"\n"
        );
    }

    #[test]
    fn json_line() {
        let v: serde_json::Value = serde_json::from_str(&json(&entry())).unwrap();
        assert_eq!(v["client"], "127.0.0.2:5555");
        assert_eq!(v["user"], "al ice");
        assert_eq!(v["bytes_down"], 20);
        assert_eq!(v["rep"], 0);
        assert_eq!(v["duration_ms"], 1500.0);
    }

    #[test]
    fn a_full_queue_drops_and_counts() {
        let (tx, _rx) = std::sync::mpsc::sync_channel(1);
        let log = AccessLog {
            tx,
            format: Format::Text,
            dropped: Arc::new(AtomicU64::new(0)),
        };
        log.log(&entry());
        log.log(&entry());
        log.log(&entry());
        assert_eq!(log.dropped.load(Ordering::Relaxed), 2);
    }
}
