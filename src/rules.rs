//! Access rules: which client (and user) may reach which target, with which command.
//!
//! This file owns the operator's access policy once it has been read from the config file:
//! the rule vocabulary ([`RuleSpec`], [`Dest`], the small parsers for CIDRs, targets and port
//! ranges), the compiled matcher ([`Rules`]) and its answer ([`Verdict`]). Turning TOML into
//! `RuleSpec`s is the config's job; asking at the right moments is the relay's. Like
//! [`proto`](crate::proto) it is sans-IO: pure functions over addresses and bytes, so every
//! decision is unit- and property-tested without sockets.
//!
//! # Semantics
//!
//! Rules are ordered and the **first rule that matches decides**. A rule matches a request when
//! every field it has matches: an absent field (an empty `Vec`) matches anything, a list
//! matches when any entry does. A rule with `users` never matches an unauthenticated request.
//! When no rule matches, the policy's `default` decides; left unset it is *allow* while there are
//! no rules and *deny* as soon as there is one (writing rules means writing an allow list).
//!
//! Target names compare ASCII-case-insensitively and ignoring one trailing dot. An exact entry
//! (`example.com`) matches only that name; a suffix entry (`*.example.com`) matches names
//! *below* `example.com` at any depth (`www.example.com`, `a.b.example.com`) but **not
//! `example.com` itself**: write both when both are meant. Names are bytes off the wire and are
//! compared as bytes (a name that is not ASCII can still end in `.example.com`).
//!
//! # Two phases for a name target (DNS rebinding)
//!
//! A name is checked twice. Before resolution the request carries only the name, which CIDR
//! entries cannot match; this refuses denied names without a lookup. After resolution *each*
//! address is checked with the name still attached, and a `to` entry then matches the name or
//! the address: a `deny to = ["10.0.0.0/8"]` rule catches `evil.example` once it resolves to
//! `10.1.2.3`, so a name cannot smuggle a client to a network the rules close.
//!
//! # Private targets
//!
//! With [`Policy::deny_private_targets`], addresses in the ranges of [`is_private`] (loopback,
//! link-local, RFC 1918, CGNAT, ULA, unspecified) are refused unless the deciding rule is an
//! allow rule whose `to` field matched this target, by a CIDR covering the address or by the
//! name. An allow rule without `to`, or the default policy, does not open them: "allow this
//! client everything" should not mean "and the metadata service at 169.254.169.254". Note that
//! a name entry vouches for whatever the name resolves to (`allow to = ["*.corp.example"]`
//! trusts that zone's DNS). IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) are turned into
//! IPv4 before any check, for targets, clients and rule CIDRs alike, so they cannot slip past
//! an IPv4 rule or the private check.
//!
//! # Cost
//!
//! The rules are compiled once ([`Rules::new`]) into indexes, so that checking a request costs
//! a few hash lookups however many rules there are, in the common cases. Each rule is indexed
//! on exactly one dimension, the first of `to`, `from`, `users` that it has, and otherwise
//! joins the short "wildcard" list:
//!
//! - CIDRs (`to` and `from` separately): one hash map per prefix length present, keyed by the
//!   masked address, so a lookup probes each length in use (a handful in practice) and finds
//!   *every* covering prefix, not only the longest;
//! - names: exact names in one map; suffixes in another, probed with each label suffix of the
//!   request's name (`a.b.example.com` probes `b.example.com`, `example.com`, `com`);
//! - users: one map from name to rules.
//!
//! Every hit is a list of rule indices in ascending order; the lists are merged in rule order,
//! each candidate is checked against all its fields (once, even when several lists hold it),
//! and the first full match decides. Ten thousand `deny to = ["198.51.x.y/32"]` rules thus
//! cost one probe, not ten thousand comparisons. What still grows with the rule count is a
//! long wildcard list, or many rules indexed under the same key, and
//! [`Rules::check_open`], which runs once per association and scans the rules that could
//! decide it.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;

use ipnet::{IpNet, Ipv4Net};

/// What a rule (or the default policy) does with a request it decides.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    Allow,
    Deny,
}

impl Action {
    /// `"allow"` or `"deny"`.
    pub fn parse(s: &str) -> Option<Action> {
        match s {
            "allow" => Some(Action::Allow),
            "deny" => Some(Action::Deny),
            _ => None,
        }
    }

    /// The config spelling, inverse of [`parse`](Self::parse).
    pub fn name(self) -> &'static str {
        match self {
            Action::Allow => "allow",
            Action::Deny => "deny",
        }
    }
}

/// The SOCKS command a request is for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command {
    Connect,
    /// UDP ASSOCIATE.
    Udp,
    Bind,
}

impl Command {
    /// `"connect"`, `"udp"` or `"bind"`.
    pub fn parse(s: &str) -> Option<Command> {
        match s {
            "connect" => Some(Command::Connect),
            "udp" => Some(Command::Udp),
            "bind" => Some(Command::Bind),
            _ => None,
        }
    }

    /// The config spelling, inverse of [`parse`](Self::parse).
    pub fn name(self) -> &'static str {
        match self {
            Command::Connect => "connect",
            Command::Udp => "udp",
            Command::Bind => "bind",
        }
    }

    /// This command's bit in a rule's command mask.
    fn bit(self) -> u8 {
        match self {
            Command::Connect => 1,
            Command::Udp => 2,
            Command::Bind => 4,
        }
    }
}

/// One entry of a rule's `to` list.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Dest {
    /// Addresses in a network (a bare address is a /32 or /128).
    Net(IpNet),
    /// Exactly this host name.
    Host(String),
    /// Names strictly below this domain. Holds the domain without the `*.`
    /// (`*.example.com` is `Suffix("example.com")`).
    Suffix(String),
}

impl Dest {
    /// Parses `10.0.0.0/8`, `192.0.2.1`, `2001:db8::/32`, `example.com` or `*.example.com`.
    /// Names are stored lowercased and without a trailing dot. A name whose last label is all
    /// digits is refused as a bad IP address (`192.168.1.300`), so typos are not taken for
    /// names.
    pub fn parse(s: &str) -> Result<Dest, String> {
        if s.contains(['/', ':']) {
            return parse_net(s).map(Dest::Net);
        }
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Dest::Net(canonical_net(ip.into())));
        }
        let (host, suffix) = match s.strip_prefix("*.") {
            Some(rest) => (rest, true),
            None => (s, false),
        };
        let host = host.strip_suffix('.').unwrap_or(host);
        let not_a_name = || format!("not a host name, CIDR or *.suffix: {s:?}");
        if !is_host_name(host) {
            return Err(not_a_name());
        }
        // No top-level domain is all digits: this is an IP address gone wrong.
        if host
            .rsplit('.')
            .next()
            .is_some_and(|l| l.bytes().all(|b| b.is_ascii_digit()))
        {
            return Err(if suffix {
                not_a_name()
            } else {
                format!("bad IP address {s:?}")
            });
        }
        let host = host.to_ascii_lowercase();
        Ok(if suffix {
            Dest::Suffix(host)
        } else {
            Dest::Host(host)
        })
    }
}

impl fmt::Display for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Dest::Net(net) => write!(f, "{net}"),
            Dest::Host(host) => f.write_str(host),
            Dest::Suffix(domain) => write!(f, "*.{domain}"),
        }
    }
}

/// Labels of `[A-Za-z0-9_-]`, 1 to 63 bytes each, at most 253 bytes in all (no trailing dot).
fn is_host_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 253
        && s.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// Parses a network for `from` (or `to`): `10.0.0.0/8`, `2001:db8::/32`, or a bare address
/// (a /32 or /128). A network with host bits set (`10.1.2.3/8`) is an error naming the
/// network it would be, since it is most likely a typo. IPv4-mapped networks
/// (`::ffff:10.0.0.0/104`) come back as IPv4 (`10.0.0.0/8`).
pub fn parse_net(s: &str) -> Result<IpNet, String> {
    if let Ok(ip) = s.parse::<IpAddr>() {
        return Ok(canonical_net(ip.into()));
    }
    let net: IpNet = s.parse().map_err(|_| format!("bad CIDR {s:?}"))?;
    let network = net.trunc();
    if network != net {
        return Err(format!(
            "CIDR {s:?} has host bits set (the network is {network})"
        ));
    }
    Ok(canonical_net(net))
}

/// Parses a port (`443`) or an inclusive range (`8000-8999`) of ports 1 to 65535.
pub fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| match p.parse::<u16>() {
        Ok(0) => Err(format!("port 0 in {s:?} (ports are 1-65535)")),
        Ok(n) if p.bytes().all(|b| b.is_ascii_digit()) => Ok(n),
        _ => Err(format!("bad port {s:?} (want 443 or 8000-8999)")),
    };
    let (lo, hi) = match s.split_once('-') {
        Some((lo, hi)) => (port(lo)?, port(hi)?),
        None => {
            let p = port(s)?;
            (p, p)
        }
    };
    if lo > hi {
        return Err(format!("bad port range {s:?} ({lo} is above {hi})"));
    }
    Ok((lo, hi))
}

/// One rule as the config file states it. An empty `Vec` is an absent field (matches
/// anything).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RuleSpec {
    pub action: Action,
    /// Client networks.
    pub from: Vec<IpNet>,
    /// Target networks, names and name suffixes.
    pub to: Vec<Dest>,
    /// Inclusive ranges of target ports.
    pub ports: Vec<(u16, u16)>,
    /// RFC 1929 user names (raw bytes, compared exactly).
    pub users: Vec<Vec<u8>>,
    pub commands: Vec<Command>,
    /// Where the rule is in the config file, for logs.
    pub line: usize,
    /// An allow rule's upstream proxy (its index in the config's `[[upstream]]` list): the
    /// requests it allows go through that proxy instead of directly.
    pub via: Option<u16>,
}

impl RuleSpec {
    /// A rule with only an action (it matches everything), at line 0.
    pub fn new(action: Action) -> RuleSpec {
        RuleSpec {
            action,
            from: Vec::new(),
            to: Vec::new(),
            ports: Vec::new(),
            users: Vec::new(),
            commands: Vec::new(),
            line: 0,
            via: None,
        }
    }
}

/// What happens to requests no rule decides, and the private-target guard.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// `None`: allow when there are no rules, deny once there is one.
    pub default: Option<Action>,
    /// Refuse targets in the [`is_private`] ranges unless a rule allows them explicitly.
    pub deny_private_targets: bool,
}

/// What is being asked. For a name target, `name` is set, and `ip` too once resolved (one
/// request per resolved address); for an address target only `ip` is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Request<'a> {
    pub client: IpAddr,
    /// The RFC 1929 user, `None` when the client did not authenticate.
    pub user: Option<&'a [u8]>,
    pub command: Command,
    /// The target name as the client sent it.
    pub name: Option<&'a [u8]>,
    pub ip: Option<IpAddr>,
    pub port: u16,
}

/// The answer to a check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Allow,
    /// Allowed, through upstream proxy number N (a rule's `via`). The private-target guard
    /// does not apply: the relay does not connect to the target itself.
    Via(u16),
    Deny(DeniedBy),
}

impl Verdict {
    pub fn is_allowed(self) -> bool {
        !matches!(self, Verdict::Deny(_))
    }
}

/// Why a request was refused, for the log line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeniedBy {
    /// A deny rule: `index` counts rules from 1 in file order; `line` is where it is.
    Rule { index: usize, line: usize },
    /// No rule matched and the default policy is deny.
    Default,
    /// The target is private and no rule allowed it explicitly.
    PrivateTarget,
}

impl fmt::Display for DeniedBy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeniedBy::Rule { index, line } => write!(f, "rule {index} (line {line})"),
            DeniedBy::Default => f.write_str("policy default = \"deny\""),
            DeniedBy::PrivateTarget => f.write_str("policy deny_private_targets"),
        }
    }
}

/// The addresses `deny_private_targets` refuses: loopback (127.0.0.0/8, ::1), link-local
/// (169.254.0.0/16, fe80::/10), RFC 1918 (10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16), CGNAT
/// (100.64.0.0/10), ULA (fc00::/7) and unspecified (0.0.0.0/8, ::). IPv4-mapped IPv6
/// addresses are judged as the IPv4 address they carry.
pub fn is_private(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            matches!(a, 0 | 10 | 127)
                || (a == 169 && b == 254)
                || (a == 172 && b & 0xf0 == 16)
                || (a == 192 && b == 168)
                || (a == 100 && b & 0xc0 == 64)
        }
        IpAddr::V6(v6) => {
            let first = v6.segments()[0];
            v6.is_loopback()
                || v6.is_unspecified()
                || first & 0xffc0 == 0xfe80
                || first & 0xfe00 == 0xfc00
        }
    }
}

/// `net` without host bits, and IPv4 if it lies within ::ffff:0:0/96. (Other IPv6 networks,
/// even ::/0, never match an IPv4 address: the families are separate.)
fn canonical_net(net: IpNet) -> IpNet {
    match net.trunc() {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.network().to_ipv4_mapped() {
            Some(v4) => IpNet::V4(Ipv4Net::new(v4, v6.prefix_len() - 96).expect("at most 32")),
            None => IpNet::V6(v6),
        },
        net => net,
    }
}

/// A rule name (exact or suffix) as the index keeps it: lowercase, no trailing dot.
fn rule_name(name: &str) -> Box<[u8]> {
    let name = name.strip_suffix('.').unwrap_or(name);
    name.to_ascii_lowercase().into_bytes().into_boxed_slice()
}

/// Whether `name` lies strictly below `domain` (both lowercase, no trailing dot).
fn is_below(name: &[u8], domain: &[u8]) -> bool {
    name.len() > domain.len()
        && name.ends_with(domain)
        && name[name.len() - domain.len() - 1] == b'.'
}

/// A compiled rule: the spec's fields in the form the checks want.
#[derive(Debug)]
struct Rule {
    action: Action,
    line: usize,
    via: Option<u16>,
    /// Bits of [`Command::bit`]; 0 when the field is absent.
    commands: u8,
    from: Box<[IpNet]>,
    to_nets: Box<[IpNet]>,
    to_hosts: Box<[Box<[u8]>]>,
    to_suffixes: Box<[Box<[u8]>]>,
    ports: Box<[(u16, u16)]>,
    users: Box<[Box<[u8]>]>,
}

impl Rule {
    fn compile(spec: RuleSpec) -> Rule {
        let (mut to_nets, mut to_hosts, mut to_suffixes) = (Vec::new(), Vec::new(), Vec::new());
        for dest in spec.to {
            match dest {
                Dest::Net(net) => to_nets.push(canonical_net(net)),
                Dest::Host(host) => to_hosts.push(rule_name(&host)),
                // Tolerate a spec built by hand with the `*.` left on.
                Dest::Suffix(domain) => {
                    to_suffixes.push(rule_name(domain.strip_prefix("*.").unwrap_or(&domain)))
                }
            }
        }
        Rule {
            action: spec.action,
            line: spec.line,
            via: spec.via,
            commands: spec.commands.iter().fold(0, |mask, c| mask | c.bit()),
            from: spec.from.into_iter().map(canonical_net).collect(),
            to_nets: to_nets.into(),
            to_hosts: to_hosts.into(),
            to_suffixes: to_suffixes.into(),
            ports: spec.ports.into(),
            users: spec.users.into_iter().map(Vec::into_boxed_slice).collect(),
        }
    }

    fn has_to(&self) -> bool {
        !(self.to_nets.is_empty() && self.to_hosts.is_empty() && self.to_suffixes.is_empty())
    }

    /// The fields about who asks: `from`, `users`, `commands`.
    fn matches_client(&self, client: IpAddr, user: Option<&[u8]>, command: Command) -> bool {
        (self.commands == 0 || self.commands & command.bit() != 0)
            && (self.from.is_empty() || self.from.iter().any(|net| net.contains(&client)))
            && (self.users.is_empty()
                || user.is_some_and(|user| self.users.iter().any(|u| **u == *user)))
    }

    /// Every field.
    fn matches(&self, t: &Target<'_>) -> bool {
        self.matches_client(t.client, t.user, t.command)
            && (self.ports.is_empty()
                || self
                    .ports
                    .iter()
                    .any(|&(lo, hi)| (lo..=hi).contains(&t.port)))
            && (!self.has_to() || self.matches_to(t))
    }

    fn matches_to(&self, t: &Target<'_>) -> bool {
        t.ip.is_some_and(|ip| self.to_nets.iter().any(|net| net.contains(&ip)))
            || t.name.is_some_and(|name| {
                self.to_hosts.iter().any(|host| **host == *name)
                    || self.to_suffixes.iter().any(|domain| is_below(name, domain))
            })
    }
}

/// A request with its addresses canonical and its name lowercased, without a trailing dot.
struct Target<'a> {
    client: IpAddr,
    user: Option<&'a [u8]>,
    command: Command,
    name: Option<&'a [u8]>,
    ip: Option<IpAddr>,
    port: u16,
}

/// Adds `rule` to an index list. Rules are added in ascending order, so the list stays sorted
/// and a rule listing the same key twice is kept once.
fn add(list: &mut Vec<u32>, rule: u32) {
    if list.last() != Some(&rule) {
        list.push(rule);
    }
}

/// The map for prefix length `len`, created if this is its first network.
fn level<K>(levels: &mut Vec<(u8, HashMap<K, Vec<u32>>)>, len: u8) -> &mut HashMap<K, Vec<u32>> {
    let i = match levels.iter().position(|(l, _)| *l == len) {
        Some(i) => i,
        None => {
            levels.push((len, HashMap::new()));
            levels.len() - 1
        }
    };
    &mut levels[i].1
}

/// Rules indexed by networks: per prefix length, masked address -> rules.
#[derive(Debug, Default)]
struct NetIndex {
    v4: Vec<(u8, HashMap<u32, Vec<u32>>)>,
    v6: Vec<(u8, HashMap<u128, Vec<u32>>)>,
}

impl NetIndex {
    fn insert(&mut self, net: IpNet, rule: u32) {
        match net {
            IpNet::V4(net) => {
                let key = u32::from(net.network());
                add(
                    level(&mut self.v4, net.prefix_len())
                        .entry(key)
                        .or_default(),
                    rule,
                );
            }
            IpNet::V6(net) => {
                let key = u128::from(net.network());
                add(
                    level(&mut self.v6, net.prefix_len())
                        .entry(key)
                        .or_default(),
                    rule,
                );
            }
        }
    }

    /// Adds the rule list of every network containing `ip` to `out`.
    fn lookup<'a>(&'a self, ip: IpAddr, out: &mut Vec<&'a [u32]>) {
        match ip {
            IpAddr::V4(ip) => {
                let ip = u32::from(ip);
                for (len, map) in &self.v4 {
                    let mask = u32::MAX.checked_shl(32 - u32::from(*len)).unwrap_or(0);
                    out.extend(map.get(&(ip & mask)).map(Vec::as_slice));
                }
            }
            IpAddr::V6(ip) => {
                let ip = u128::from(ip);
                for (len, map) in &self.v6 {
                    let mask = u128::MAX.checked_shl(128 - u32::from(*len)).unwrap_or(0);
                    out.extend(map.get(&(ip & mask)).map(Vec::as_slice));
                }
            }
        }
    }
}

/// The compiled rules and policy: what the relay asks. Immutable once built, so shards share
/// one behind an `Arc`.
pub struct Rules {
    rules: Vec<Rule>,
    policy: Policy,
    /// No rules, default allow, no private check: every check allows.
    open: bool,
    to_nets: NetIndex,
    to_hosts: HashMap<Box<[u8]>, Vec<u32>>,
    to_suffixes: HashMap<Box<[u8]>, Vec<u32>>,
    from_nets: NetIndex,
    users: HashMap<Box<[u8]>, Vec<u32>>,
    /// Rules with none of `to`, `from`, `users`.
    wildcard: Vec<u32>,
    /// Rules that can decide [`check_open`](Self::check_open): all but deny rules with `to`
    /// or `ports`.
    openers: Vec<u32>,
    /// How many rules each dimension indexes (`to`, `from`, `users`), for `Debug`.
    indexed: [usize; 3],
}

impl Rules {
    /// Compiles `specs` (in file order) and `policy`.
    pub fn new(specs: Vec<RuleSpec>, policy: Policy) -> Rules {
        let mut rules = Rules {
            rules: Vec::with_capacity(specs.len()),
            open: specs.is_empty()
                && policy.default != Some(Action::Deny)
                && !policy.deny_private_targets,
            policy,
            to_nets: NetIndex::default(),
            to_hosts: HashMap::new(),
            to_suffixes: HashMap::new(),
            from_nets: NetIndex::default(),
            users: HashMap::new(),
            wildcard: Vec::new(),
            openers: Vec::new(),
            indexed: [0; 3],
        };
        for (i, spec) in specs.into_iter().enumerate() {
            let i = u32::try_from(i).expect("fewer than 2^32 rules");
            let rule = Rule::compile(spec);
            if rule.has_to() {
                rules.indexed[0] += 1;
                for net in rule.to_nets.iter() {
                    rules.to_nets.insert(*net, i);
                }
                for host in rule.to_hosts.iter() {
                    add(rules.to_hosts.entry(host.clone()).or_default(), i);
                }
                for domain in rule.to_suffixes.iter() {
                    add(rules.to_suffixes.entry(domain.clone()).or_default(), i);
                }
            } else if !rule.from.is_empty() {
                rules.indexed[1] += 1;
                for net in rule.from.iter() {
                    rules.from_nets.insert(*net, i);
                }
            } else if !rule.users.is_empty() {
                rules.indexed[2] += 1;
                for user in rule.users.iter() {
                    add(rules.users.entry(user.clone()).or_default(), i);
                }
            } else {
                rules.wildcard.push(i);
            }
            // A deny rule that names targets or ports never decides whether to open.
            let targeted = rule.has_to() || !rule.ports.is_empty();
            if rule.action == Action::Allow || !targeted {
                rules.openers.push(i);
            }
            rules.rules.push(rule);
        }
        rules
    }

    /// No rules, default allow, no private-target check.
    pub fn allow_all() -> Rules {
        Rules::new(Vec::new(), Policy::default())
    }

    /// True when every check allows (no rules, default allow, no private-target check), so
    /// callers may skip checking.
    pub fn is_open(&self) -> bool {
        self.open
    }

    /// The number of rules.
    pub fn len(&self) -> usize {
        self.rules.len()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }

    fn default_action(&self) -> Action {
        self.policy.default.unwrap_or(if self.rules.is_empty() {
            Action::Allow
        } else {
            Action::Deny
        })
    }

    /// Decides one request: a connection's target, one resolved address of a name, a name
    /// before resolution, or one UDP datagram's destination.
    pub fn check(&self, req: &Request<'_>) -> Verdict {
        if self.open {
            return Verdict::Allow;
        }
        // Lowercase the name on the stack (SOCKS names are at most 255 bytes).
        let mut stack = [0u8; 256];
        let heap: Vec<u8>;
        let name = match req.name {
            None => None,
            Some(name) => {
                let name = name.strip_suffix(b".").unwrap_or(name);
                Some(if let Some(buf) = stack.get_mut(..name.len()) {
                    buf.copy_from_slice(name);
                    buf.make_ascii_lowercase();
                    &*buf
                } else {
                    heap = name.to_ascii_lowercase();
                    &heap[..]
                })
            }
        };
        let t = Target {
            client: req.client.to_canonical(),
            user: req.user,
            command: req.command,
            name,
            ip: req.ip.map(|ip| ip.to_canonical()),
            port: req.port,
        };
        match self.first_match(&t) {
            Some(i) if self.rules[i].action == Action::Deny => {
                let line = self.rules[i].line;
                return Verdict::Deny(DeniedBy::Rule { index: i + 1, line });
            }
            // It matched, so the `to` it has matched this target: an explicit allow, which
            // holds even for a private target.
            Some(i) if self.rules[i].via.is_some() => {
                return Verdict::Via(self.rules[i].via.unwrap_or_default());
            }
            Some(i) if self.rules[i].has_to() => return Verdict::Allow,
            Some(_) => {}
            None if self.default_action() == Action::Deny => {
                return Verdict::Deny(DeniedBy::Default);
            }
            None => {}
        }
        // Allowed by a rule without `to`, or by default: not enough for a private target.
        if self.policy.deny_private_targets && t.ip.is_some_and(is_private) {
            Verdict::Deny(DeniedBy::PrivateTarget)
        } else {
            Verdict::Allow
        }
    }

    /// The index lists that may hold a rule matching `t`, each in ascending rule order.
    fn candidates<'a>(&'a self, t: &Target<'_>, out: &mut Vec<&'a [u32]>) {
        if let Some(ip) = t.ip {
            self.to_nets.lookup(ip, out);
        }
        if let Some(name) = t.name {
            out.extend(self.to_hosts.get(name).map(Vec::as_slice));
            if !self.to_suffixes.is_empty() {
                for (i, &b) in name.iter().enumerate() {
                    if b == b'.' {
                        out.extend(self.to_suffixes.get(&name[i + 1..]).map(Vec::as_slice));
                    }
                }
            }
        }
        self.from_nets.lookup(t.client, out);
        if let Some(user) = t.user {
            out.extend(self.users.get(user).map(Vec::as_slice));
        }
        if !self.wildcard.is_empty() {
            out.push(&self.wildcard);
        }
    }

    /// The index of the first rule matching `t`: merges the candidate lists in rule order and
    /// checks each candidate once.
    fn first_match(&self, t: &Target<'_>) -> Option<usize> {
        let mut lists = Vec::with_capacity(8);
        self.candidates(t, &mut lists);
        loop {
            let next = *lists.iter().filter_map(|list| list.first()).min()?;
            for list in &mut lists {
                if list.first() == Some(&next) {
                    *list = &list[1..];
                }
            }
            let next = next as usize;
            if self.rules[next].matches(t) {
                return Some(next);
            }
        }
    }

    /// Whether an association (UDP ASSOCIATE, BIND) may be opened at all, before any target
    /// is known. Among the rules whose `from`, `users` and `commands` match, in order: one
    /// with neither `to` nor `ports` decides; an allow rule with `to` or `ports` allows
    /// (some target may be allowed: each datagram is then [`check`](Self::check)ed); a deny
    /// rule with `to` or `ports` is passed over. When none decides, the default policy does.
    pub fn check_open(&self, client: IpAddr, user: Option<&[u8]>, command: Command) -> Verdict {
        let client = client.to_canonical();
        for &i in &self.openers {
            let rule = &self.rules[i as usize];
            if !rule.matches_client(client, user, command) {
                continue;
            }
            return match rule.action {
                // The rule that opens the association sends all of it through an upstream.
                Action::Allow if rule.via.is_some() && !rule.has_to() && rule.ports.is_empty() => {
                    Verdict::Via(rule.via.unwrap_or_default())
                }
                Action::Allow => Verdict::Allow,
                Action::Deny => Verdict::Deny(DeniedBy::Rule {
                    index: i as usize + 1,
                    line: rule.line,
                }),
            };
        }
        match self.default_action() {
            Action::Allow => Verdict::Allow,
            Action::Deny => Verdict::Deny(DeniedBy::Default),
        }
    }
}

impl fmt::Debug for Rules {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Rules")
            .field("rules", &self.rules.len())
            .field("policy", &self.policy)
            .field("by_to", &self.indexed[0])
            .field("by_from", &self.indexed[1])
            .field("by_users", &self.indexed[2])
            .field("wildcard", &self.wildcard.len())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::net::{Ipv4Addr, Ipv6Addr};

    use proptest::collection::vec;
    use proptest::prelude::*;

    use Action::{Allow, Deny};

    const CLIENT: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10));

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn net(s: &str) -> IpNet {
        parse_net(s).unwrap()
    }

    fn dest(s: &str) -> Dest {
        Dest::parse(s).unwrap()
    }

    /// A rule at `line` with `set` applied to it.
    fn rule(action: Action, line: usize, set: impl FnOnce(&mut RuleSpec)) -> RuleSpec {
        let mut spec = RuleSpec {
            line,
            ..RuleSpec::new(action)
        };
        set(&mut spec);
        spec
    }

    fn rules(specs: Vec<RuleSpec>) -> Rules {
        Rules::new(specs, Policy::default())
    }

    #[test]
    fn an_allow_rule_with_via_routes_through_its_upstream() {
        let r = Rules::new(
            vec![
                rule(Allow, 1, |s| {
                    s.to = vec![dest("*.far.example")];
                    s.via = Some(2);
                }),
                rule(Allow, 2, |s| s.to = vec![dest("0.0.0.0/0")]),
            ],
            Policy {
                default: None,
                deny_private_targets: true,
            },
        );
        assert_eq!(r.check(&to_name("www.far.example")), Verdict::Via(2));
        assert!(Verdict::Via(2).is_allowed());
        assert_eq!(r.check(&to_ip("192.0.2.1")), Verdict::Allow);
    }

    fn guarded(specs: Vec<RuleSpec>, default: Option<Action>) -> Rules {
        Rules::new(
            specs,
            Policy {
                default,
                deny_private_targets: true,
            },
        )
    }

    /// A CONNECT from `CLIENT`, no user, to nothing yet.
    fn base() -> Request<'static> {
        Request {
            client: CLIENT,
            user: None,
            command: Command::Connect,
            name: None,
            ip: None,
            port: 443,
        }
    }

    fn to_ip(addr: &str) -> Request<'static> {
        Request {
            ip: Some(ip(addr)),
            ..base()
        }
    }

    fn to_name(name: &'static str) -> Request<'static> {
        Request {
            name: Some(name.as_bytes()),
            ..base()
        }
    }

    fn resolved(name: &'static str, addr: &str) -> Request<'static> {
        Request {
            name: Some(name.as_bytes()),
            ip: Some(ip(addr)),
            ..base()
        }
    }

    fn by_rule(index: usize, line: usize) -> Verdict {
        Verdict::Deny(DeniedBy::Rule { index, line })
    }

    const DEFAULT: Verdict = Verdict::Deny(DeniedBy::Default);
    const PRIVATE: Verdict = Verdict::Deny(DeniedBy::PrivateTarget);

    #[test]
    fn first_match_decides() {
        let r = rules(vec![
            rule(Deny, 10, |r| r.to = vec![dest("198.51.100.0/25")]),
            rule(Allow, 11, |r| r.to = vec![dest("198.51.100.0/24")]),
            rule(Deny, 12, |r| r.ports = vec![(22, 22)]),
            rule(Allow, 13, |_| {}),
        ]);
        assert_eq!(r.check(&to_ip("198.51.100.1")), by_rule(1, 10));
        assert_eq!(r.check(&to_ip("198.51.100.200")), Verdict::Allow);
        // An indexed rule earlier in the file beats a wildcard one later, and vice versa.
        assert_eq!(
            r.check(&Request {
                port: 22,
                ..to_ip("198.51.100.200")
            }),
            Verdict::Allow
        );
        assert_eq!(
            r.check(&Request {
                port: 22,
                ..to_ip("203.0.113.1")
            }),
            by_rule(3, 12)
        );
        assert_eq!(r.check(&to_ip("203.0.113.1")), Verdict::Allow);
        assert_eq!(r.len(), 4);
        assert!(!r.is_empty());
    }

    #[test]
    fn from_matches_client_networks_also_mapped() {
        let r = rules(vec![rule(Allow, 1, |r| {
            r.from = vec![net("192.0.2.0/24"), net("2001:db8::/32")]
        })]);
        for client in ["192.0.2.99", "::ffff:192.0.2.99", "2001:db8::7"] {
            assert_eq!(
                r.check(&Request {
                    client: ip(client),
                    ..to_ip("8.8.8.8")
                }),
                Verdict::Allow
            );
        }
        for client in ["198.51.100.1", "2001:db9::1", "::ffff:198.51.100.1"] {
            assert_eq!(
                r.check(&Request {
                    client: ip(client),
                    ..to_ip("8.8.8.8")
                }),
                DEFAULT
            );
        }
    }

    #[test]
    fn ports_are_inclusive_ranges() {
        let r = rules(vec![rule(Allow, 1, |r| {
            r.ports = vec![(443, 443), (8000, 8999)]
        })]);
        let cases = [
            (442, false),
            (443, true),
            (444, false),
            (7999, false),
            (8000, true),
        ];
        for (port, allowed) in cases.into_iter().chain([(8999, true), (9000, false)]) {
            let v = r.check(&Request {
                port,
                ..to_name("example.com")
            });
            assert_eq!(v.is_allowed(), allowed, "port {port}");
        }
    }

    #[test]
    fn users_need_an_authenticated_user() {
        let r = rules(vec![
            rule(Allow, 1, |r| {
                r.users = vec![b"alice".to_vec(), b"\xffraw".to_vec()]
            }),
            rule(Deny, 2, |r| r.users = vec![b"bob".to_vec()]),
        ]);
        let who = |user: Option<&'static [u8]>| {
            r.check(&Request {
                user,
                ..to_ip("8.8.8.8")
            })
        };
        assert_eq!(who(Some(b"alice")), Verdict::Allow);
        assert_eq!(who(Some(b"\xffraw")), Verdict::Allow);
        assert_eq!(who(Some(b"Alice")), DEFAULT, "user names are exact bytes");
        assert_eq!(who(Some(b"bob")), by_rule(2, 2));
        assert_eq!(who(None), DEFAULT);
        // Even a deny rule with users says nothing about unauthenticated clients.
        let r = Rules::new(
            vec![rule(Deny, 1, |r| r.users = vec![b"bob".to_vec()])],
            Policy {
                default: Some(Allow),
                ..Policy::default()
            },
        );
        assert_eq!(r.check(&to_ip("8.8.8.8")), Verdict::Allow);
    }

    #[test]
    fn commands_restrict_a_rule() {
        let r = rules(vec![
            rule(Deny, 1, |r| r.commands = vec![Command::Udp, Command::Bind]),
            rule(Allow, 2, |_| {}),
        ]);
        assert_eq!(r.check(&to_ip("8.8.8.8")), Verdict::Allow);
        for command in [Command::Udp, Command::Bind] {
            assert_eq!(
                r.check(&Request {
                    command,
                    ..to_ip("8.8.8.8")
                }),
                by_rule(1, 1)
            );
        }
    }

    #[test]
    fn names_exact_and_suffix() {
        let r = rules(vec![
            rule(Allow, 1, |r| r.to = vec![dest("Example.COM")]),
            rule(Allow, 2, |r| {
                r.to = vec![dest("*.corp.example"), dest("lone.test.")]
            }),
        ]);
        let allowed = |name| r.check(&to_name(name)).is_allowed();
        for name in [
            "example.com",
            "EXAMPLE.com",
            "example.com.",
            "lone.test",
            "LONE.TEST.",
        ] {
            assert!(allowed(name), "{name}");
        }
        for name in ["www.corp.example", "a.b.c.CORP.example.", "x.corp.example"] {
            assert!(allowed(name), "{name}");
        }
        // A suffix entry is strictly below its domain; an exact entry is exactly its name.
        for name in [
            "corp.example",
            "corp.example.",
            "xcorp.example",
            "www.example.com",
        ] {
            assert!(!allowed(name), "{name}");
        }
        // One trailing dot only; names are bytes (non-ASCII bytes are just other bytes).
        assert!(!allowed("example.com.."));
        assert!(!r
            .check(&Request {
                name: Some(b"ex\xffample.com"),
                ..base()
            })
            .is_allowed());
        assert!(r
            .check(&Request {
                name: Some(b"\xff.corp.example"),
                ..base()
            })
            .is_allowed());
        // A name rule says nothing about an IP-literal target.
        assert_eq!(r.check(&to_ip("93.184.216.34")), DEFAULT);
    }

    #[test]
    fn a_name_is_checked_again_once_resolved() {
        let r = rules(vec![
            rule(Deny, 1, |r| r.to = vec![dest("203.0.113.0/24")]),
            rule(Allow, 2, |r| r.to = vec![dest("*.example.com")]),
        ]);
        // Before resolution a CIDR cannot match the name.
        assert_eq!(r.check(&to_name("www.example.com")), Verdict::Allow);
        assert_eq!(
            r.check(&resolved("www.example.com", "198.51.100.1")),
            Verdict::Allow
        );
        assert_eq!(
            r.check(&resolved("www.example.com", "203.0.113.9")),
            by_rule(1, 1)
        );
        // A name match holds for any of its addresses; the CIDR match alone also decides.
        let r = rules(vec![rule(Allow, 1, |r| {
            r.to = vec![dest("example.com"), dest("198.51.100.0/24")]
        })]);
        assert_eq!(
            r.check(&resolved("example.com", "203.0.113.9")),
            Verdict::Allow
        );
        assert_eq!(
            r.check(&resolved("other.com", "198.51.100.7")),
            Verdict::Allow
        );
        assert_eq!(r.check(&resolved("other.com", "203.0.113.9")), DEFAULT);
    }

    #[test]
    fn private_ranges() {
        let private = [
            "127.0.0.1",
            "127.255.255.254",
            "::1",
            "169.254.169.254",
            "169.254.0.1",
            "fe80::1",
            "febf:ffff::1",
            "10.0.0.1",
            "10.255.255.255",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.0.1",
            "192.168.255.255",
            "100.64.0.1",
            "100.127.255.255",
            "fc00::1",
            "fdff::1",
            "0.0.0.0",
            "0.255.255.255",
            "::",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.1.2.3",
        ];
        let public = [
            "8.8.8.8",
            "11.0.0.1",
            "126.255.255.255",
            "128.0.0.1",
            "169.253.255.255",
            "169.255.0.1",
            "172.15.255.255",
            "172.32.0.0",
            "192.167.255.255",
            "192.169.0.0",
            "100.63.255.255",
            "100.128.0.0",
            "1.0.0.0",
            "2001:db8::1",
            "2606:4700::1111",
            "fec0::1",
            "fe00::1",
            "fb00::1",
            "fe00::",
            "::2",
            "::ffff:8.8.8.8",
        ];
        let r = guarded(Vec::new(), None);
        assert!(!r.is_open());
        for addr in private {
            assert!(is_private(ip(addr)), "{addr}");
            assert_eq!(r.check(&to_ip(addr)), PRIVATE, "{addr}");
            assert_eq!(r.check(&resolved("name.test", addr)), PRIVATE, "{addr}");
        }
        for addr in public {
            assert!(!is_private(ip(addr)), "{addr}");
            assert_eq!(r.check(&to_ip(addr)), Verdict::Allow, "{addr}");
        }
        // No address yet, nothing to judge.
        assert_eq!(r.check(&to_name("localhost")), Verdict::Allow);
    }

    #[test]
    fn only_an_explicit_allow_opens_private_targets() {
        let r = guarded(
            vec![
                rule(Allow, 1, |r| {
                    r.to = vec![dest("10.0.0.0/8"), dest("intranet.example")]
                }),
                rule(Allow, 2, |r| r.to = vec![dest("*.corp.example")]),
                rule(Allow, 3, |r| r.to = vec![dest("127.0.0.1")]),
                rule(Allow, 4, |r| r.ports = vec![(1, 65535)]),
            ],
            None,
        );
        assert_eq!(r.check(&to_ip("10.1.2.3")), Verdict::Allow);
        assert_eq!(r.check(&to_ip("::ffff:10.1.2.3")), Verdict::Allow);
        assert_eq!(
            r.check(&resolved("intranet.example", "192.168.1.1")),
            Verdict::Allow
        );
        assert_eq!(
            r.check(&resolved("db.corp.example", "172.16.0.5")),
            Verdict::Allow
        );
        assert_eq!(r.check(&to_ip("::ffff:127.0.0.1")), Verdict::Allow);
        // Rule 4 (no `to`) allows, but does not open private targets.
        assert_eq!(r.check(&to_ip("127.0.0.2")), PRIVATE);
        assert_eq!(r.check(&to_ip("::ffff:127.0.0.2")), PRIVATE);
        assert_eq!(r.check(&to_ip("169.254.169.254")), PRIVATE);
        assert_eq!(r.check(&resolved("evil.test", "192.168.1.1")), PRIVATE);
        assert_eq!(r.check(&to_ip("8.8.8.8")), Verdict::Allow);
        // Neither does the default policy, nor an allow rule with only `from`.
        let r = guarded(
            vec![rule(Allow, 1, |r| r.from = vec![net("0.0.0.0/0")])],
            Some(Allow),
        );
        assert_eq!(r.check(&to_ip("10.0.0.1")), PRIVATE);
        assert_eq!(
            r.check(&Request {
                client: ip("2001:db8::1"),
                ..to_ip("10.0.0.1")
            }),
            PRIVATE
        );
        // A deny rule still reports itself.
        let r = guarded(
            vec![rule(Deny, 7, |r| r.to = vec![dest("10.0.0.0/8")])],
            Some(Allow),
        );
        assert_eq!(r.check(&to_ip("10.0.0.1")), by_rule(1, 7));
        assert_eq!(r.check(&to_ip("192.168.0.1")), PRIVATE);
    }

    #[test]
    fn mapped_addresses_meet_ipv4_rules() {
        // A hand-built spec with a mapped network is canonicalised too.
        let mapped = IpNet::V6("::ffff:127.0.0.0/104".parse().unwrap());
        let r = rules(vec![
            rule(Deny, 1, |r| r.to = vec![Dest::Net(mapped)]),
            rule(Deny, 2, |r| r.to = vec![dest("::ffff:10.0.0.0/104")]),
            rule(Allow, 3, |_| {}),
        ]);
        assert_eq!(r.check(&to_ip("127.0.0.1")), by_rule(1, 1));
        assert_eq!(r.check(&to_ip("::ffff:127.0.0.1")), by_rule(1, 1));
        assert_eq!(r.check(&to_ip("::ffff:10.9.9.9")), by_rule(2, 2));
        assert_eq!(r.check(&to_ip("::ffff:11.0.0.1")), Verdict::Allow);
        // IPv6 networks outside ::ffff:0:0/96 never match IPv4, not even ::/0.
        let r = rules(vec![
            rule(Deny, 1, |r| r.to = vec![dest("::/0")]),
            rule(Allow, 2, |_| {}),
        ]);
        assert_eq!(r.check(&to_ip("::ffff:8.8.8.8")), Verdict::Allow);
        assert_eq!(r.check(&to_ip("2001:db8::1")), by_rule(1, 1));
    }

    #[test]
    fn default_policy() {
        let open = Rules::allow_all();
        assert!(open.is_open() && open.is_empty());
        assert_eq!(open.check(&to_ip("127.0.0.1")), Verdict::Allow);
        assert_eq!(open.check_open(CLIENT, None, Command::Udp), Verdict::Allow);

        let with_rule = rules(vec![rule(Allow, 1, |r| r.ports = vec![(80, 80)])]);
        assert!(!with_rule.is_open());
        assert_eq!(with_rule.check(&to_ip("8.8.8.8")), DEFAULT);
        assert_eq!(
            with_rule.check(&Request {
                port: 80,
                ..to_ip("8.8.8.8")
            }),
            Verdict::Allow
        );

        let allow = Policy {
            default: Some(Allow),
            deny_private_targets: false,
        };
        let explicit = Rules::new(vec![rule(Deny, 1, |r| r.ports = vec![(25, 25)])], allow);
        assert_eq!(explicit.check(&to_ip("8.8.8.8")), Verdict::Allow);
        assert_eq!(
            explicit.check(&Request {
                port: 25,
                ..to_ip("8.8.8.8")
            }),
            by_rule(1, 1)
        );

        let allow = Policy {
            default: Some(Allow),
            deny_private_targets: false,
        };
        assert!(Rules::new(Vec::new(), allow).is_open());
        let deny = Policy {
            default: Some(Deny),
            deny_private_targets: false,
        };
        let closed = Rules::new(Vec::new(), deny);
        assert!(!closed.is_open());
        assert_eq!(closed.check(&to_ip("8.8.8.8")), DEFAULT);
        assert_eq!(closed.check_open(CLIENT, None, Command::Udp), DEFAULT);
    }

    #[test]
    fn check_open_cases() {
        let udp = Command::Udp;
        // Deny rules with `to`/`ports` are passed over; the default then decides.
        let r = rules(vec![rule(Deny, 1, |r| {
            r.to = vec![dest("10.0.0.0/8")];
            r.ports = vec![(53, 53)];
        })]);
        assert_eq!(r.check_open(CLIENT, None, udp), DEFAULT);
        let r = Rules::new(
            vec![rule(Deny, 1, |r| r.ports = vec![(53, 53)])],
            Policy {
                default: Some(Allow),
                ..Policy::default()
            },
        );
        assert_eq!(r.check_open(CLIENT, None, udp), Verdict::Allow);

        let r = rules(vec![
            rule(Deny, 1, |r| r.from = vec![net("198.51.100.0/24")]),
            rule(Allow, 2, |r| {
                r.users = vec![b"alice".to_vec()];
                r.to = vec![dest("*.example.com")];
            }),
            rule(Deny, 3, |r| r.commands = vec![Command::Udp]),
            rule(Allow, 4, |r| r.commands = vec![Command::Bind]),
        ]);
        assert_eq!(
            r.check_open(ip("198.51.100.5"), Some(b"alice"), udp),
            by_rule(1, 1)
        );
        assert_eq!(
            r.check_open(ip("::ffff:198.51.100.5"), None, udp),
            by_rule(1, 1)
        );
        // An allow rule with `to`: some datagrams may pass.
        assert_eq!(r.check_open(CLIENT, Some(b"alice"), udp), Verdict::Allow);
        assert_eq!(r.check_open(CLIENT, Some(b"bob"), udp), by_rule(3, 3));
        assert_eq!(r.check_open(CLIENT, None, udp), by_rule(3, 3));
        assert_eq!(r.check_open(CLIENT, None, Command::Bind), Verdict::Allow);
        assert_eq!(r.check_open(CLIENT, None, Command::Connect), DEFAULT);
    }

    #[test]
    fn dest_parsing() {
        assert_eq!(dest("10.0.0.0/8"), Dest::Net(net("10.0.0.0/8")));
        assert_eq!(dest("192.0.2.1"), Dest::Net(net("192.0.2.1/32")));
        assert_eq!(dest("2001:db8::/32"), Dest::Net(net("2001:db8::/32")));
        assert_eq!(dest("2001:db8::1"), Dest::Net(net("2001:db8::1/128")));
        assert_eq!(dest("::ffff:10.0.0.0/104"), Dest::Net(net("10.0.0.0/8")));
        assert_eq!(dest("::ffff:10.1.2.3"), Dest::Net(net("10.1.2.3/32")));
        assert_eq!(dest("Example.COM"), Dest::Host("example.com".into()));
        assert_eq!(dest("example.com."), Dest::Host("example.com".into()));
        assert_eq!(dest("localhost"), Dest::Host("localhost".into()));
        assert_eq!(
            dest("_srv.my-host.test"),
            Dest::Host("_srv.my-host.test".into())
        );
        assert_eq!(dest("*.Example.com"), Dest::Suffix("example.com".into()));
        assert_eq!(dest("*.com"), Dest::Suffix("com".into()));
        assert_eq!(dest("*.Example.com").to_string(), "*.example.com");
        assert_eq!(dest("10.0.0.0/8").to_string(), "10.0.0.0/8");
        let long = [
            "a".repeat(63),
            "b".repeat(63),
            "c".repeat(63),
            "d".repeat(61),
        ]
        .join(".");
        assert_eq!(long.len(), 253);
        assert_eq!(dest(&long), Dest::Host(long.clone()));

        let err = |s: &str| Dest::parse(s).unwrap_err();
        assert_eq!(err("10.0.0.0/33"), "bad CIDR \"10.0.0.0/33\"");
        assert!(err("10.1.2.3/8").contains("host bits"));
        assert_eq!(err("192.168.1.300"), "bad IP address \"192.168.1.300\"");
        assert!(err("2001:db8::g").starts_with("bad CIDR"));
        for bad in [
            "*",
            "*foo.com",
            "*.",
            "*.*.com",
            "foo.*.com",
            "",
            ".",
            "a..b",
            ".example.com",
            "ex ample.com",
            "exa!mple.com",
            "*.10",
            "bücher.de",
            "a".repeat(64).as_str(),
            format!("{long}a").as_str(),
        ] {
            assert!(
                err(bad).starts_with("not a host name, CIDR or *.suffix"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn net_and_port_parsing() {
        assert_eq!(parse_net("0.0.0.0/0").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(parse_net("::/0").unwrap().to_string(), "::/0");
        assert_eq!(parse_net("192.0.2.7").unwrap().to_string(), "192.0.2.7/32");
        assert_eq!(parse_net("::ffff:0:0/96").unwrap().to_string(), "0.0.0.0/0");
        assert_eq!(
            parse_net("10.1.2.3/8").unwrap_err(),
            "CIDR \"10.1.2.3/8\" has host bits set (the network is 10.0.0.0/8)"
        );
        for bad in [
            "",
            "example.com",
            "10.0.0.0/",
            "10.0.0/8",
            "::/129",
            " 10.0.0.0/8",
        ] {
            assert!(
                parse_net(bad).unwrap_err().starts_with("bad CIDR"),
                "{bad:?}"
            );
        }

        assert_eq!(parse_ports("443"), Ok((443, 443)));
        assert_eq!(parse_ports("8000-8999"), Ok((8000, 8999)));
        assert_eq!(parse_ports("1-65535"), Ok((1, 65535)));
        assert_eq!(parse_ports("7-7"), Ok((7, 7)));
        assert!(parse_ports("0").unwrap_err().contains("port 0"));
        assert!(parse_ports("0-10").unwrap_err().contains("port 0"));
        assert!(parse_ports("9-1")
            .unwrap_err()
            .starts_with("bad port range"));
        for bad in ["", "65536", "+80", "80-", "-80", "1-2-3", "http", " 80"] {
            assert!(
                parse_ports(bad).unwrap_err().starts_with("bad port"),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn names_of_things() {
        for c in [Command::Connect, Command::Udp, Command::Bind] {
            assert_eq!(Command::parse(c.name()), Some(c));
        }
        for a in [Allow, Deny] {
            assert_eq!(Action::parse(a.name()), Some(a));
        }
        assert_eq!(Command::parse("UDP"), None);
        assert_eq!(Action::parse("permit"), None);
        assert_eq!(
            DeniedBy::Rule { index: 3, line: 17 }.to_string(),
            "rule 3 (line 17)"
        );
        assert_eq!(DeniedBy::Default.to_string(), "policy default = \"deny\"");
        assert_eq!(
            DeniedBy::PrivateTarget.to_string(),
            "policy deny_private_targets"
        );
        assert!(Verdict::Allow.is_allowed() && !DEFAULT.is_allowed());

        fn shared<T: Send + Sync>() {}
        shared::<Rules>();
        let r = rules(vec![
            rule(Deny, 1, |r| r.to = vec![dest("10.0.0.0/8")]),
            rule(Deny, 2, |r| r.from = vec![net("10.0.0.0/8")]),
            rule(Deny, 3, |_| {}),
        ]);
        let debug = format!("{r:?}");
        assert!(
            debug.contains("rules: 3") && debug.contains("by_to: 1"),
            "{debug}"
        );
    }

    #[test]
    fn ten_thousand_rules_one_probe() {
        let mut specs: Vec<RuleSpec> = (0..10_000u32)
            .map(|i| {
                let addr = Ipv4Addr::new(198, 51, (i / 256) as u8, (i % 256) as u8);
                rule(Deny, i as usize + 1, |r| {
                    r.to = vec![Dest::Net(IpAddr::V4(addr).into())]
                })
            })
            .collect();
        specs.push(rule(Allow, 10_001, |_| {}));
        let r = rules(specs);
        assert_eq!(r.len(), 10_001);
        assert_eq!(r.check(&to_ip("198.51.0.0")), by_rule(1, 1));
        assert_eq!(r.check(&to_ip("198.51.1.2")), by_rule(259, 259));
        assert_eq!(r.check(&to_ip("198.51.39.15")), by_rule(10_000, 10_000));
        assert_eq!(
            r.check(&resolved("x.test", "::ffff:198.51.39.15")),
            by_rule(10_000, 10_000)
        );
        assert_eq!(r.check(&to_ip("198.51.39.16")), Verdict::Allow);
        assert_eq!(r.check(&to_name("x.test")), Verdict::Allow);
        // The candidates are one /32 list and the wildcard list: two rules, not 10,001.
        let t = Target {
            client: CLIENT,
            user: None,
            command: Command::Connect,
            name: None,
            ip: Some(ip("198.51.1.2")),
            port: 443,
        };
        let mut lists = Vec::new();
        r.candidates(&t, &mut lists);
        assert_eq!(lists.iter().map(|l| l.len()).sum::<usize>(), 2);
    }

    // ---- the indexed matcher against a plain linear scan over the specs ----

    const ADDRS: &[&str] = &[
        "10.0.0.1",
        "10.1.2.3",
        "127.0.0.1",
        "192.0.2.7",
        "192.0.2.200",
        "198.51.100.1",
        "169.254.169.254",
        "0.0.0.0",
        "::ffff:10.1.2.3",
        "::ffff:127.0.0.1",
        "2001:db8::1",
        "2001:db8:1::5",
        "fe80::1",
        "::1",
        "::",
    ];
    const NAMES: &[&str] = &[
        "example.com",
        "www.example.com",
        "a.b.example.com",
        "WWW.Example.COM.",
        "example.com..",
        "other.org",
        "x.other.org",
        "\u{ff}.example.com",
        "localhost",
        "com",
        "",
    ];
    const RULE_NAMES: &[&str] = &["example.com", "WWW.example.com.", "other.org", "localhost"];
    const SUFFIXES: &[&str] = &["example.com", "com", "Other.org", "b.example.com", "*.org"];
    const USERS: &[&[u8]] = &[b"alice", b"bob", b"\xff"];

    fn arb_addr() -> impl Strategy<Value = IpAddr> {
        prop::sample::select(ADDRS).prop_map(ip)
    }

    /// A network around a pool address, any prefix length, possibly IPv4-mapped.
    fn arb_net() -> impl Strategy<Value = IpNet> {
        (arb_addr(), 0u8..=128).prop_map(|(addr, len)| {
            let max = if addr.is_ipv4() { 32 } else { 128 };
            IpNet::new(addr, len.min(max)).unwrap().trunc()
        })
    }

    fn arb_dest() -> impl Strategy<Value = Dest> {
        prop_oneof![
            arb_net().prop_map(Dest::Net),
            prop::sample::select(RULE_NAMES).prop_map(|s| Dest::Host(s.into())),
            prop::sample::select(SUFFIXES).prop_map(|s| Dest::Suffix(s.into())),
        ]
    }

    fn arb_command() -> impl Strategy<Value = Command> {
        prop::sample::select(&[Command::Connect, Command::Udp, Command::Bind][..])
    }

    fn arb_user() -> impl Strategy<Value = Vec<u8>> {
        prop::sample::select(USERS).prop_map(<[u8]>::to_vec)
    }

    fn arb_spec() -> impl Strategy<Value = RuleSpec> {
        (
            prop::bool::ANY,
            vec(arb_net(), 0..3),
            vec(arb_dest(), 0..4),
            vec((1u16..=10, 0u16..=4).prop_map(|(lo, n)| (lo, lo + n)), 0..3),
            vec(arb_user(), 0..3),
            vec(arb_command(), 0..3),
            0usize..1000,
        )
            .prop_map(|(allow, from, to, ports, users, commands, line)| RuleSpec {
                action: if allow { Allow } else { Deny },
                from,
                to,
                ports,
                users,
                commands,
                line,
                via: None,
            })
    }

    fn arb_policy() -> impl Strategy<Value = Policy> {
        (prop::option::of(prop::bool::ANY), prop::bool::ANY).prop_map(|(default, guard)| Policy {
            default: default.map(|allow| if allow { Allow } else { Deny }),
            deny_private_targets: guard,
        })
    }

    /// (client, user, command, name, ip, port); names and users as owned bytes.
    type ArbRequest = (
        IpAddr,
        Option<Vec<u8>>,
        Command,
        Option<Vec<u8>>,
        Option<IpAddr>,
        u16,
    );

    fn arb_request() -> impl Strategy<Value = ArbRequest> {
        let name = prop::sample::select(NAMES).prop_map(|s| {
            // "\u{ff}" stands for a raw 0xff byte, not its UTF-8 encoding.
            s.chars().map(|c| c as u32 as u8).collect::<Vec<u8>>()
        });
        (
            arb_addr(),
            prop::option::of(arb_user()),
            arb_command(),
            prop::option::of(name),
            prop::option::of(arb_addr()),
            1u16..=12,
        )
    }

    /// Mapped IPv4 back to IPv4, by looking at the bytes.
    fn naive_v4(addr: IpAddr) -> IpAddr {
        match addr {
            IpAddr::V6(v6) => match v6.octets() {
                [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, a, b, c, d] => {
                    IpAddr::V4(Ipv4Addr::new(a, b, c, d))
                }
                _ => addr,
            },
            v4 => v4,
        }
    }

    /// Containment computed in IPv6 space: IPv4 addresses and networks as ::ffff:0:0/96.
    /// Networks shorter than /96 hold only IPv6 addresses.
    fn naive_contains(net: &IpNet, addr: IpAddr) -> bool {
        let addr = naive_v4(addr);
        let bits = match addr {
            IpAddr::V4(v4) => u128::from(v4.to_ipv6_mapped()),
            IpAddr::V6(v6) => u128::from(v6),
        };
        let (base, len) = match net {
            IpNet::V4(n) => (u128::from(n.addr().to_ipv6_mapped()), n.prefix_len() + 96),
            IpNet::V6(n) => (u128::from(n.addr()), n.prefix_len()),
        };
        if addr.is_ipv4() && len < 96 {
            return false;
        }
        let shift = 128 - u32::from(len);
        len == 0 || (bits >> shift) == (base >> shift)
    }

    fn naive_name(s: &[u8]) -> Vec<u8> {
        s.strip_suffix(b".").unwrap_or(s).to_ascii_lowercase()
    }

    fn naive_to(spec: &RuleSpec, name: Option<&[u8]>, addr: Option<IpAddr>) -> bool {
        spec.to.iter().any(|d| match d {
            Dest::Net(n) => addr.is_some_and(|a| naive_contains(n, a)),
            Dest::Host(h) => name.is_some_and(|n| naive_name(n) == naive_name(h.as_bytes())),
            Dest::Suffix(s) => name.is_some_and(|n| {
                let s = s.strip_prefix("*.").unwrap_or(s);
                let mut tail = b".".to_vec();
                tail.extend(naive_name(s.as_bytes()));
                naive_name(n).ends_with(&tail)
            }),
        })
    }

    fn naive_client(spec: &RuleSpec, client: IpAddr, user: Option<&[u8]>, c: Command) -> bool {
        (spec.commands.is_empty() || spec.commands.contains(&c))
            && (spec.from.is_empty() || spec.from.iter().any(|n| naive_contains(n, client)))
            && (spec.users.is_empty() || user.is_some_and(|u| spec.users.iter().any(|x| x == u)))
    }

    fn naive_default(specs: &[RuleSpec], policy: &Policy) -> Action {
        policy
            .default
            .unwrap_or(if specs.is_empty() { Allow } else { Deny })
    }

    fn naive_check(specs: &[RuleSpec], policy: &Policy, req: &Request<'_>) -> Verdict {
        const RANGES: &[&str] = &[
            "127.0.0.0/8",
            "::1/128",
            "169.254.0.0/16",
            "fe80::/10",
            "10.0.0.0/8",
            "172.16.0.0/12",
            "192.168.0.0/16",
            "100.64.0.0/10",
            "fc00::/7",
            "0.0.0.0/8",
            "::/128",
        ];
        let private = policy.deny_private_targets
            && req.ip.is_some_and(|a| {
                RANGES
                    .iter()
                    .any(|r| naive_contains(&r.parse::<IpNet>().unwrap(), a))
            });
        for (i, spec) in specs.iter().enumerate() {
            let ports = spec.ports.is_empty()
                || spec
                    .ports
                    .iter()
                    .any(|&(lo, hi)| lo <= req.port && req.port <= hi);
            let to = spec.to.is_empty() || naive_to(spec, req.name, req.ip);
            if naive_client(spec, req.client, req.user, req.command) && ports && to {
                return match spec.action {
                    Deny => by_rule(i + 1, spec.line),
                    Allow if private && spec.to.is_empty() => PRIVATE,
                    Allow => Verdict::Allow,
                };
            }
        }
        match naive_default(specs, policy) {
            Deny => DEFAULT,
            Allow if private => PRIVATE,
            Allow => Verdict::Allow,
        }
    }

    fn naive_check_open(
        specs: &[RuleSpec],
        policy: &Policy,
        client: IpAddr,
        user: Option<&[u8]>,
        command: Command,
    ) -> Verdict {
        for (i, spec) in specs.iter().enumerate() {
            if !naive_client(spec, client, user, command) {
                continue;
            }
            let targeted = !spec.to.is_empty() || !spec.ports.is_empty();
            match spec.action {
                Allow => return Verdict::Allow,
                Deny if !targeted => return by_rule(i + 1, spec.line),
                Deny => {}
            }
        }
        match naive_default(specs, policy) {
            Allow => Verdict::Allow,
            Deny => DEFAULT,
        }
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(2000))]

        #[test]
        fn indexed_check_equals_linear_scan(
            specs in vec(arb_spec(), 0..12),
            policy in arb_policy(),
            requests in vec(arb_request(), 1..16),
        ) {
            let compiled = Rules::new(specs.clone(), policy.clone());
            for (client, user, command, name, addr, port) in &requests {
                let req = Request {
                    client: *client,
                    user: user.as_deref(),
                    command: *command,
                    name: name.as_deref(),
                    ip: *addr,
                    port: *port,
                };
                let expected = naive_check(&specs, &policy, &req);
                prop_assert_eq!(compiled.check(&req), expected, "{:?}", req);
                prop_assert_eq!(
                    compiled.check_open(*client, user.as_deref(), *command),
                    naive_check_open(&specs, &policy, *client, user.as_deref(), *command)
                );
            }
        }
    }

    #[test]
    fn naive_reference_sanity() {
        // The reference's own containment, so a shared misunderstanding shows up here.
        assert!(naive_contains(&net("10.0.0.0/8"), ip("::ffff:10.1.1.1")));
        assert!(!naive_contains(&"::/0".parse().unwrap(), ip("10.1.1.1")));
        assert!(naive_contains(&"::/0".parse().unwrap(), ip("2001:db8::1")));
        assert!(naive_contains(&net("0.0.0.0/0"), ip("1.2.3.4")));
        assert!(!naive_contains(
            &net("0.0.0.0/0"),
            IpAddr::V6(Ipv6Addr::LOCALHOST)
        ));
    }
}
