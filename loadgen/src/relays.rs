//! The systems `loadgen compare` measures: starting each relay pinned to a
//! CPU (with the configuration it is measured with, generated for 3proxy,
//! hev-socks5-server and Dante), waiting until it accepts, finding the
//! processes whose CPU counts as the relay's, and stopping it again.

use std::fs;
use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::Result;
use crate::sys;

pub const DANTED: &str = "/usr/sbin/danted";
pub const MICROSOCKS: &str = "/usr/bin/microsocks";
/// Paths of the peers built from source (not packaged): 3proxy's `bin/3proxy`
/// and hev-socks5-server's `bin/hev-socks5-server` (loadgen/README.md says how
/// to build them).
pub const PEER_3PROXY_ENV: &str = "RINGSOCKS_PEER_3PROXY";
pub const PEER_HEV_ENV: &str = "RINGSOCKS_PEER_HEV";
/// 3proxy's connection limit per service (its default is 100; the UDP
/// suite holds 2000 associations, one TCP connection each).
pub const THREEPROXY_MAXCONN: u32 = 4096;

/// How long a relay may take to start accepting.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Direct,
    RingsocksSplice,
    RingsocksCopy,
    RingsocksAuto,
    /// ringsocks with its default options (the UDP suite: the forwarding
    /// path does not matter for datagrams).
    Ringsocks,
    Dante,
    Microsocks,
    /// 3proxy's `socks` service (one process, a thread per connection).
    ThreeProxy,
    /// hev-socks5-server with one worker thread.
    Hev,
}

impl Kind {
    pub const ALL: [Kind; 9] = [
        Kind::RingsocksAuto,
        Kind::RingsocksSplice,
        Kind::RingsocksCopy,
        Kind::Ringsocks,
        Kind::Direct,
        Kind::Dante,
        Kind::Microsocks,
        Kind::ThreeProxy,
        Kind::Hev,
    ];

    /// The systems of the full TCP suite.
    pub const TCP: [Kind; 8] = [
        Kind::RingsocksAuto,
        Kind::RingsocksSplice,
        Kind::RingsocksCopy,
        Kind::Direct,
        Kind::Dante,
        Kind::Microsocks,
        Kind::ThreeProxy,
        Kind::Hev,
    ];

    /// The systems of the UDP suite: microsocks has no UDP ASSOCIATE
    /// (`NO_UDP` says so in the suite's output).
    pub const UDP: [Kind; 5] = [
        Kind::Ringsocks,
        Kind::Direct,
        Kind::Dante,
        Kind::ThreeProxy,
        Kind::Hev,
    ];

    /// Peers left out of the UDP suite, and why.
    pub const NO_UDP: [(Kind, &'static str); 1] = [(Kind::Microsocks, "no UDP ASSOCIATE")];

    pub fn name(self) -> &'static str {
        match self {
            Kind::Direct => "direct",
            Kind::RingsocksSplice => "ringsocks-splice",
            Kind::RingsocksCopy => "ringsocks-copy",
            Kind::RingsocksAuto => "ringsocks-auto",
            Kind::Ringsocks => "ringsocks",
            Kind::Dante => "dante",
            Kind::Microsocks => "microsocks",
            Kind::ThreeProxy => "3proxy",
            Kind::Hev => "hev",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Kind::Direct => "direct loopback",
            Kind::RingsocksSplice => "ringsocks --forward splice",
            Kind::RingsocksCopy => "ringsocks --forward copy",
            Kind::RingsocksAuto => "ringsocks --forward auto (default)",
            Kind::Ringsocks => "ringsocks",
            Kind::Dante => "Dante (danted -N 1)",
            Kind::Microsocks => "microsocks",
            Kind::ThreeProxy => "3proxy (socks, auth none)",
            Kind::Hev => "hev-socks5-server (workers: 1)",
        }
    }

    pub fn from_name(s: &str) -> Option<Kind> {
        Kind::ALL.into_iter().find(|k| k.name() == s)
    }

    pub fn is_ringsocks(self) -> bool {
        matches!(
            self,
            Kind::RingsocksSplice | Kind::RingsocksCopy | Kind::RingsocksAuto | Kind::Ringsocks
        )
    }

    /// Direct loopback and the other relays: what ringsocks is compared to.
    pub fn is_reference(self) -> bool {
        matches!(
            self,
            Kind::Direct | Kind::Dante | Kind::Microsocks | Kind::ThreeProxy | Kind::Hev
        )
    }

    /// The peer's binary, or why it is missing (the suite skips it with
    /// that note). Not for ringsocks nor direct loopback.
    pub fn peer_binary(self) -> std::result::Result<PathBuf, String> {
        let packaged = |path: &str, package: &str| {
            if Path::new(path).exists() {
                Ok(PathBuf::from(path))
            } else {
                Err(format!("{path} not installed; apt-get install {package}"))
            }
        };
        let from_env = |var: &str| peer_from_env(var, std::env::var_os(var));
        match self {
            Kind::Dante => packaged(DANTED, "dante-server"),
            Kind::Microsocks => packaged(MICROSOCKS, "microsocks"),
            Kind::ThreeProxy => from_env(PEER_3PROXY_ENV),
            Kind::Hev => from_env(PEER_HEV_ENV),
            _ => Err(format!("{} is not a peer", self.name())),
        }
    }
}

/// A peer's binary named by environment variable `var` (whose value is
/// `value`), or why it is missing.
fn peer_from_env(
    var: &str,
    value: Option<std::ffi::OsString>,
) -> std::result::Result<PathBuf, String> {
    match value {
        None => Err(format!("{var} not set")),
        Some(p) if p.is_empty() => Err(format!("{var} not set")),
        Some(p) => {
            let p = PathBuf::from(p);
            if p.is_file() {
                Ok(p)
            } else {
                Err(format!("{var}={}: no such file", p.display()))
            }
        }
    }
}

/// A relay process started for the suite; stopped (by its PID) on drop.
pub struct Relay {
    pub kind: Kind,
    pub addr: SocketAddr,
    child: Child,
    pub command: Vec<String>,
    pub version: String,
    _tmp: Option<TempDir>,
}

/// A directory removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Result<TempDir> {
        let p = std::env::temp_dir().join(format!("loadgen-{tag}-{}", std::process::id()));
        fs::create_dir_all(&p)?;
        Ok(TempDir(p))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// `taskset -c CPU` if taskset exists, else nothing (with a warning once).
pub fn pinned(cpu: Option<usize>, bin: &Path, args: &[String]) -> (Command, Vec<String>) {
    let mut argv: Vec<String> = Vec::new();
    if let Some(cpu) = cpu {
        if Path::new("/usr/bin/taskset").exists() {
            argv.extend(["taskset".into(), "-c".into(), cpu.to_string()]);
        } else {
            eprintln!(
                "compare: warning: no taskset; {} runs unpinned",
                bin.display()
            );
        }
    }
    argv.push(bin.display().to_string());
    argv.extend(args.iter().cloned());
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    // The relay dies with us even if we are killed before Drop runs.
    // SAFETY: prctl is async-signal-safe and touches no memory of ours.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGTERM as libc::c_ulong,
                0,
                0,
                0,
            );
            Ok(())
        });
    }
    (cmd, argv)
}

/// A free loopback port (bound, then released for the server to take).
fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn pkg_version(pkg: &str) -> String {
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Version}", pkg])
        .output()
        .ok()
        .filter(|o| o.status.success())
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .filter(|v| !v.is_empty())
        .unwrap_or_else(|| "unknown".into())
}

/// The version a binary carries as `<prefix><digits and dots>` (3proxy has
/// no version option but embeds `3proxy-1.0.0(<build date>)`).
fn version_in_binary(bin: &Path, prefix: &[u8]) -> String {
    let Ok(bytes) = fs::read(bin) else {
        return "unknown".into();
    };
    bytes
        .windows(prefix.len() + 1)
        .enumerate()
        .find(|(_, w)| w.starts_with(prefix) && w[prefix.len()].is_ascii_digit())
        .map(|(i, _)| {
            let rest = &bytes[i + prefix.len()..];
            let n = rest
                .iter()
                .take_while(|b| b.is_ascii_digit() || **b == b'.')
                .count();
            String::from_utf8_lossy(&rest[..n]).into_owned()
        })
        .unwrap_or_else(|| "unknown".into())
}

/// hev-socks5-server's `--version` prints `Version: 2.13.1 <commit>`.
fn hev_version(bin: &Path) -> String {
    Command::new(bin)
        .arg("--version")
        .stdin(Stdio::null())
        .output()
        .ok()
        .and_then(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned()
                + &String::from_utf8_lossy(&o.stderr);
            text.lines()
                .find_map(|l| l.trim().strip_prefix("Version:"))
                .and_then(|v| v.split_whitespace().next())
                .map(String::from)
        })
        .unwrap_or_else(|| "unknown".into())
}

impl Relay {
    /// A peer spawned on 127.0.0.1:`port`, once it accepts and is the binary we meant to run.
    fn ready(
        kind: Kind,
        port: u16,
        child: Child,
        command: Vec<String>,
        version: String,
        tmp: Option<TempDir>,
    ) -> Result<Relay> {
        let mut relay = Relay {
            kind,
            addr: SocketAddr::from(([127, 0, 0, 1], port)),
            child,
            command,
            version,
            _tmp: tmp,
        };
        if let Err(e) = relay.wait_accepting() {
            // A peer that exited at once says why in its log.
            if let (Ok(Some(_)), Some(tmp)) = (relay.child.try_wait(), &relay._tmp) {
                let log = fs::read_to_string(tmp.0.join("stderr.log")).unwrap_or_default();
                if let Some(last) = log.lines().rev().find(|l| !l.trim().is_empty()) {
                    return Err(format!("{e}; it exited: {}", last.trim()).into());
                }
            }
            return Err(e);
        }
        relay.check_is_exec()?;
        Ok(relay)
    }

    /// Starts `kind` pinned to `cpu`. A peer whose binary is missing is an
    /// error here: the suite asks `Kind::peer_binary` first and skips it
    /// with that note. Direct loopback has no relay.
    pub fn start(kind: Kind, ringsocks: &Path, cpu: Option<usize>) -> Result<Relay> {
        match kind {
            Kind::Direct => Err("direct loopback has no relay".into()),
            Kind::RingsocksSplice | Kind::RingsocksCopy | Kind::RingsocksAuto | Kind::Ringsocks => {
                Relay::start_ringsocks(kind, ringsocks, cpu)
            }
            Kind::Microsocks => {
                let bin = kind.peer_binary()?;
                let port = free_port()?;
                let args = vec![
                    "-i".into(),
                    "127.0.0.1".into(),
                    "-p".into(),
                    port.to_string(),
                ];
                let (mut cmd, argv) = pinned(cpu, &bin, &args);
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?;
                Relay::ready(kind, port, child, argv, pkg_version("microsocks"), None)
            }
            Kind::Dante => {
                let bin = kind.peer_binary()?;
                let tmp = TempDir::new("dante")?;
                let port = free_port()?;
                let conf = tmp.0.join("danted.conf");
                fs::write(&conf, dante_config(port))?;
                let conf_s = conf.display().to_string();
                let v = Command::new(&bin).args(["-V", "-f", &conf_s]).output()?;
                if !v.status.success() {
                    return Err(format!(
                        "danted -V rejects the config: {}",
                        String::from_utf8_lossy(&v.stderr).trim()
                    )
                    .into());
                }
                let args = vec![
                    "-f".into(),
                    conf_s,
                    "-N".into(),
                    "1".into(),
                    "-p".into(),
                    tmp.0.join("danted.pid").display().to_string(),
                ];
                let (mut cmd, argv) = pinned(cpu, &bin, &args);
                let log = fs::File::create(tmp.0.join("stderr.log"))?;
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?;
                let version = pkg_version("dante-server");
                Relay::ready(kind, port, child, argv, version, Some(tmp))
            }
            Kind::ThreeProxy | Kind::Hev => {
                let bin = kind.peer_binary()?;
                let tmp = TempDir::new(kind.name())?;
                let port = free_port()?;
                let (file, text, version) = if kind == Kind::ThreeProxy {
                    let v = version_in_binary(&bin, b"3proxy-");
                    ("3proxy.cfg", threeproxy_config(port), v)
                } else {
                    ("hev-socks5-server.yml", hev_config(port), hev_version(&bin))
                };
                let conf = tmp.0.join(file);
                fs::write(&conf, text)?;
                // Both run in the foreground and take the config file as
                // their only argument.
                let (mut cmd, argv) = pinned(cpu, &bin, &[conf.display().to_string()]);
                let log = fs::File::create(tmp.0.join("stderr.log"))?;
                let child = cmd
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(log)
                    .spawn()?;
                Relay::ready(kind, port, child, argv, version, Some(tmp))
            }
        }
    }

    fn start_ringsocks(kind: Kind, ringsocks: &Path, cpu: Option<usize>) -> Result<Relay> {
        let mode = match kind {
            Kind::RingsocksSplice => Some("splice"),
            Kind::RingsocksCopy => Some("copy"),
            Kind::RingsocksAuto => Some("auto"),
            _ => None,
        };
        if !ringsocks.exists() {
            return Err(
                format!("{}: not built (cargo build --release)", ringsocks.display()).into(),
            );
        }
        let mut args: Vec<String> = ["--listen", "127.0.0.1:0", "--shards", "1"]
            .map(String::from)
            .to_vec();
        if let Some(mode) = mode {
            args.extend(["--forward".into(), mode.into()]);
        }
        args.extend(["--log-level".into(), "warn".into()]);
        // Extra flags for every ringsocks this run starts (the CI check runs with metrics and
        // the access log on); they show in the report's command.
        if let Ok(extra) = std::env::var("RINGSOCKS_EXTRA_ARGS") {
            args.extend(extra.split_whitespace().map(String::from));
        }
        let (mut cmd, argv) = pinned(cpu, ringsocks, &args);
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()?;
        let out = child.stdout.take().expect("piped stdout");
        let (tx, rx) = mpsc::channel();
        // Drains the relay's stdout until it exits.
        thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(|l| l.ok()) {
                let _ = tx.send(line);
            }
        });
        let mut relay = Relay {
            kind,
            addr: "127.0.0.1:1".parse().expect("literal"),
            child,
            command: argv,
            version: format!("git {}", sys::git_revision()),
            _tmp: None,
        };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(left) {
                Ok(line) => {
                    if let Some(a) = line.strip_prefix("listening ") {
                        relay.addr = a.trim().parse()?;
                        break;
                    }
                }
                Err(_) => return Err("ringsocks did not print `listening`".into()),
            }
        }
        relay.check_is_exec()?;
        Ok(relay)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Every process whose CPU counts as the relay's: the relay itself and
    /// (for Dante, which forks workers) its descendants. Threads are
    /// included by /proc/PID/stat itself.
    pub fn pids(&self) -> Vec<u32> {
        let mut all = vec![self.pid()];
        all.extend(sys::descendants(self.pid()));
        all
    }

    /// The PID we hold must be the relay, not a wrapper: taskset execs, so
    /// once the relay accepts, /proc/PID/exe is the relay binary.
    fn check_is_exec(&self) -> Result<()> {
        let exe = sys::exe(self.pid())?;
        let name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if name.starts_with("taskset") {
            return Err(format!("pid {} is still taskset", self.pid()).into());
        }
        Ok(())
    }

    fn wait_accepting(&self) -> Result<()> {
        let deadline = Instant::now() + READY_TIMEOUT;
        // Bounded by READY_TIMEOUT.
        while Instant::now() < deadline {
            if TcpStream::connect_timeout(&self.addr, Duration::from_millis(200)).is_ok() {
                return Ok(());
            }
            thread::sleep(Duration::from_millis(50));
        }
        Err(format!("{} did not accept on {}", self.kind.name(), self.addr).into())
    }

    pub fn json(&self) -> Value {
        json!({
            "name": self.kind.name(),
            "label": self.kind.label(),
            "command": self.command,
            "version": self.version,
            "address": self.addr.to_string(),
        })
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        let kids = sys::descendants(self.pid());
        // SAFETY: kill(2) with a PID we spawned; no memory is touched.
        unsafe {
            libc::kill(self.pid() as libc::pid_t, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        // Bounded: 5 s, then SIGKILL.
        loop {
            match self.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
                Ok(None) => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    break;
                }
            }
        }
        // Dante's workers normally exit with their parent; any left over
        // are ours (we started their parent): stop them by PID.
        for k in kids {
            if sys::exists(k) {
                // SAFETY: as above.
                unsafe {
                    libc::kill(k as libc::pid_t, libc::SIGTERM);
                }
            }
        }
    }
}

/// Most TIME_WAIT sockets the suite's private network namespace keeps.
pub const NETNS_MAX_TW: u32 = 4096;

/// Moves this thread (and every process it spawns afterwards) into a new,
/// private network namespace with only `lo`, up, and at most
/// `NETNS_MAX_TW` TIME_WAIT sockets. Relayed tcp-cps runs leave one
/// TIME_WAIT socket per connection on the relay's upstream side (the relay
/// closes first); tens of thousands of them cover every ephemeral port for
/// 60 s, and the next run's in-process target cannot bind port 0. The
/// namespace's own sysctl keeps that from happening without touching the
/// host's settings, and no other traffic of the machine shares its loopback.
pub fn enter_private_netns() -> Result<()> {
    // SAFETY: unshare(2) takes a flag word and touches no memory of ours.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(format!("unshare(CLONE_NEWNET): {}", std::io::Error::last_os_error()).into());
    }
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .ok_or("no `ip` (iproute2) to bring lo up")?;
    let st = Command::new(ip)
        .args(["link", "set", "lo", "up"])
        .status()?;
    if !st.success() {
        return Err("ip link set lo up failed".into());
    }
    sys::set_tcp_max_tw_buckets(NETNS_MAX_TW)?;
    Ok(())
}

/// The Dante configuration of the suites: one internal and external address
/// on loopback, no authentication, every command allowed (UDP ASSOCIATE and
/// the UDP replies included; listing them is the same as Dante's default,
/// but says so).
pub fn dante_config(port: u16) -> String {
    format!(
        "logoutput: stderr\n\
         internal: 127.0.0.1 port = {port}\n\
         external: 127.0.0.1\n\
         clientmethod: none\n\
         socksmethod: none\n\
         user.privileged: root\n\
         user.unprivileged: nobody\n\
         client pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 }}\n\
         socks pass {{ from: 0.0.0.0/0 to: 0.0.0.0/0 \
         command: bind connect udpassociate bindreply udpreply }}\n"
    )
}

/// The 3proxy configuration of the suites: its SOCKS service (SOCKS4/5,
/// CONNECT and UDP ASSOCIATE) on loopback only, without authentication
/// (`auth none` also skips the ACLs), connecting out from 127.0.0.1. No
/// `daemon`: it stays in the foreground; no `log`: it logs nothing. Its
/// default of 100 connections per service would refuse most of the UDP
/// suite's 2000 associations, hence `maxconn`.
pub fn threeproxy_config(port: u16) -> String {
    format!(
        "maxconn {THREEPROXY_MAXCONN}\n\
         auth none\n\
         socks -p{port} -i127.0.0.1 -e127.0.0.1\n"
    )
}

/// The hev-socks5-server configuration of the suites: one worker thread,
/// TCP and UDP ASSOCIATE on 127.0.0.1 only (the default listens on `::`;
/// UDP relay sockets on a random port of 127.0.0.1), no authentication, in
/// the foreground (no `pid-file`), warnings to stderr.
pub fn hev_config(port: u16) -> String {
    format!(
        "main:\n  \
           workers: 1\n  \
           port: {port}\n  \
           listen-address: '127.0.0.1'\n  \
           udp-port: 0\n  \
           udp-listen-address: '127.0.0.1'\n\
         misc:\n  \
           log-file: stderr\n  \
           log-level: warn\n"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_configs_listen_on_loopback_only() {
        let t = threeproxy_config(1234);
        assert!(t.contains("auth none\n"));
        assert!(t.contains("socks -p1234 -i127.0.0.1 -e127.0.0.1\n"));
        assert!(!t.contains("daemon"));
        let h = hev_config(1234);
        assert!(h.starts_with("main:\n  workers: 1\n  port: 1234\n"), "{h}");
        assert!(h.contains("  listen-address: '127.0.0.1'\n"));
        assert!(h.contains("  udp-listen-address: '127.0.0.1'\n"));
        assert!(h.contains("misc:\n  log-file: stderr\n"));
    }

    #[test]
    fn version_embedded_in_a_binary() {
        let tmp = TempDir::new("version-test").unwrap();
        let f = tmp.0.join("bin");
        fs::write(&f, b"\x00ab3proxy-x\x003proxy-1.0.0(20260101)\x00").unwrap();
        assert_eq!(version_in_binary(&f, b"3proxy-"), "1.0.0");
        assert_eq!(version_in_binary(&f, b"nothing-"), "unknown");
    }

    #[test]
    fn missing_peers_say_why() {
        let v = PEER_3PROXY_ENV;
        assert_eq!(
            peer_from_env(v, None),
            Err("RINGSOCKS_PEER_3PROXY not set".into())
        );
        assert_eq!(
            peer_from_env(v, Some("".into())),
            Err(format!("{v} not set"))
        );
        assert_eq!(
            peer_from_env(v, Some("/nonexistent/3proxy".into())),
            Err(format!("{v}=/nonexistent/3proxy: no such file"))
        );
        let exe = std::env::current_exe().unwrap();
        assert_eq!(peer_from_env(v, Some(exe.clone().into())), Ok(exe));
        assert!(Kind::Direct.peer_binary().is_err());
        for k in [Kind::ThreeProxy, Kind::Hev] {
            assert!(k.is_reference() && !k.is_ringsocks());
            assert!(Kind::TCP.contains(&k) && Kind::UDP.contains(&k));
        }
    }

    #[test]
    fn dante_config_has_the_essentials() {
        let c = dante_config(1234);
        assert!(c.contains("internal: 127.0.0.1 port = 1234"));
        assert!(c.contains("socksmethod: none"));
        assert!(c.contains("client pass {"));
        assert!(c.contains("udpassociate") && c.contains("udpreply"));
    }

    #[test]
    fn names_round_trip() {
        for k in Kind::ALL {
            assert_eq!(Kind::from_name(k.name()), Some(k));
        }
    }
}
