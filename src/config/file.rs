//! The `--config` file: TOML whose top-level keys are the command-line flags (dashes turned to
//! underscores: `connect_timeout = "10s"`), plus the `[[rule]]` and `[policy]` tables of the
//! access rules (`crate::rules`).
//!
//! A flag's key is derived from clap's definition of the flag, so every flag has a key and no
//! list of keys can drift from the flags. This file turns each key into the argument words
//! the flag would have had (`listen = ["a", "b"]` becomes `--listen a --listen b`) and
//! remembers the key's line; `cli` then parses those words through the same clap definition
//! and validation as the command line, and names the key and line of any error. Rules are
//! parsed here, field by field, with the line of the offending value.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::path::Path;

use clap::ArgAction;
use toml::{Spanned, Value};

use crate::rules::{self, Action, Command, Dest, Policy, RuleSpec};

type Table = BTreeMap<Spanned<String>, Spanned<Value>>;

/// Flags that make no sense inside the file they would name.
const NOT_IN_FILE: &[&str] = &["config", "check_config", "help", "version"];

/// One flag set by the file.
#[derive(Debug)]
pub(super) struct Item {
    /// The key as written (`connect_timeout`).
    pub key: String,
    /// 1-based line of the key.
    pub line: usize,
    /// clap's id of the flag, to ask whether the command line gave it too.
    pub id: String,
    /// The flag as typed (`--connect-timeout`).
    pub long: String,
    /// The words the flag stands for: `--connect-timeout 10s`, or `--ipv6-only`, or nothing
    /// for `ipv6_only = false`.
    pub words: Vec<OsString>,
}

/// What a config file says.
#[derive(Debug, Default)]
pub(super) struct FileConfig {
    pub items: Vec<Item>,
    pub rules: Vec<RuleSpec>,
    pub policy: Policy,
    pub upstreams: Vec<super::Upstream>,
}

/// Reads and parses `path`; errors read `PATH:LINE: KEY: what is wrong`.
pub(super) fn read(path: &Path, cmd: &clap::Command) -> Result<FileConfig, String> {
    let text = std::fs::read_to_string(path).map_err(|e| format!("{}: {e}", path.display()))?;
    parse(&text, cmd).map_err(|e| format!("{}:{e}", path.display()))
}

/// An error at a byte offset of the file, as `LINE: KEY: message`.
struct At<'t> {
    text: &'t str,
}

impl At<'_> {
    fn line(&self, offset: usize) -> usize {
        let offset = offset.min(self.text.len());
        self.text.as_bytes()[..offset]
            .iter()
            .filter(|&&b| b == b'\n')
            .count()
            + 1
    }

    fn err(&self, offset: usize, key: &str, msg: impl std::fmt::Display) -> String {
        format!("{}: {key}: {msg}", self.line(offset))
    }
}

/// Parses a config file's text; errors read `LINE: KEY: message`.
pub(super) fn parse(text: &str, cmd: &clap::Command) -> Result<FileConfig, String> {
    let at = At { text };
    let top: Table = toml::from_str(text).map_err(|e| {
        let line = e.span().map_or(1, |s| at.line(s.start));
        // toml's own message repeats the line and draws a caret; its last line says what.
        let what = e.message().trim();
        format!("{line}: {what}")
    })?;
    let mut out = FileConfig::default();
    // Upstreams first: rules name them.
    if let Some((_, value)) = top.iter().find(|(k, _)| k.get_ref() == "upstream") {
        out.upstreams = parse_upstreams(&at, value)?;
    }
    for (key, value) in &top {
        let name = key.get_ref().as_str();
        let offset = key.span().start;
        match name {
            "upstream" => {}
            "rule" => out.rules = parse_rules(&at, value, &out.upstreams)?,
            "policy" => out.policy = parse_policy(&at, value)?,
            _ => out.items.push(flag_item(&at, cmd, name, offset, value)?),
        }
    }
    // BTreeMap orders keys by name; keep the file's order, which errors should follow.
    out.items.sort_by_key(|i| i.line);
    Ok(out)
}

fn flag_item(
    at: &At<'_>,
    cmd: &clap::Command,
    key: &str,
    offset: usize,
    value: &Spanned<Value>,
) -> Result<Item, String> {
    let arg = cmd
        .get_arguments()
        .find(|a| a.get_long().is_some_and(|l| l.replace('-', "_") == key))
        .filter(|a| !NOT_IN_FILE.contains(&a.get_id().as_str()))
        .ok_or_else(|| {
            let hint = if NOT_IN_FILE.contains(&key) {
                "not allowed in a config file".to_string()
            } else {
                "unknown key (keys are the command-line flags with '_' for '-', plus [[rule]] \
                 and [policy]; see `ringsocks --help`)"
                    .to_string()
            };
            at.err(offset, key, hint)
        })?;
    let long = format!("--{}", arg.get_long().expect("found by its long name"));
    let line = at.line(offset);
    let vline = value.span().start;
    let mut words = Vec::new();
    match (arg.get_action(), value.get_ref()) {
        (ArgAction::SetTrue, Value::Boolean(b)) => {
            if *b {
                words.push(OsString::from(&long));
            }
        }
        (ArgAction::SetTrue, _) => return Err(at.err(vline, key, "expected true or false")),
        (action, Value::Array(items)) => {
            if !matches!(action, ArgAction::Append) {
                return Err(at.err(vline, key, "takes one value, not a list"));
            }
            for v in items {
                words.push(OsString::from(&long));
                words.push(
                    scalar(v).ok_or_else(|| {
                        at.err(vline, key, "list items must be strings or numbers")
                    })?,
                );
            }
        }
        (_, v) => {
            words.push(OsString::from(&long));
            words.push(
                scalar(v).ok_or_else(|| at.err(vline, key, "expected a string or a number"))?,
            );
        }
    }
    Ok(Item {
        key: key.to_string(),
        line,
        id: arg.get_id().to_string(),
        long,
        words,
    })
}

/// A value as the word a command line would have: strings as they are, numbers printed.
fn scalar(v: &Value) -> Option<OsString> {
    match v {
        Value::String(s) => Some(s.into()),
        Value::Integer(i) => Some(i.to_string().into()),
        Value::Float(f) => Some(f.to_string().into()),
        _ => None,
    }
}

const RULE_FIELDS: &str = "action, from, to, ports, users, commands, via";

fn parse_rules(
    at: &At<'_>,
    value: &Spanned<Value>,
    upstreams: &[super::Upstream],
) -> Result<Vec<RuleSpec>, String> {
    let Value::Array(_) = value.get_ref() else {
        return Err(at.err(value.span().start, "rule", "expected [[rule]] tables"));
    };
    // Re-read with spans per field (a `Value` keeps none inside).
    #[derive(serde::Deserialize)]
    struct Rules {
        #[serde(default)]
        rule: Vec<Spanned<Table>>,
    }
    let doc: Rules = toml::from_str(at.text).map_err(|e| {
        let line = e.span().map_or(1, |s| at.line(s.start));
        format!("{line}: rule: {}", e.message().trim())
    })?;
    doc.rule
        .iter()
        .enumerate()
        .map(|(i, r)| parse_rule(at, i + 1, r, upstreams))
        .collect()
}

fn parse_rule(
    at: &At<'_>,
    index: usize,
    rule: &Spanned<Table>,
    upstreams: &[super::Upstream],
) -> Result<RuleSpec, String> {
    let line = at.line(rule.span().start);
    let mut spec = RuleSpec {
        action: Action::Deny,
        from: Vec::new(),
        to: Vec::new(),
        ports: Vec::new(),
        users: Vec::new(),
        commands: Vec::new(),
        line,
        via: None,
    };
    let mut action = None;
    for (k, v) in rule.get_ref() {
        let field = k.get_ref().as_str();
        let key = format!("rule {index}: {field}");
        let off = v.span().start;
        match field {
            "action" => action = Some(parse_action(at, &key, v)?),
            "from" => {
                for s in strings(at, &key, v)? {
                    spec.from
                        .push(rules::parse_net(s).map_err(|e| at.err(off, &key, e))?);
                }
            }
            "to" => {
                for s in strings(at, &key, v)? {
                    spec.to
                        .push(Dest::parse(s).map_err(|e| at.err(off, &key, e))?);
                }
            }
            "ports" => spec.ports = ports(at, &key, v)?,
            "users" => {
                spec.users = strings(at, &key, v)?
                    .into_iter()
                    .map(|s| s.as_bytes().to_vec())
                    .collect();
            }
            "via" => {
                let name = v
                    .get_ref()
                    .as_str()
                    .ok_or_else(|| at.err(off, &key, "expected an [[upstream]] name"))?;
                let i = upstreams
                    .iter()
                    .position(|u| u.name == name)
                    .ok_or_else(|| {
                        at.err(
                            off,
                            &key,
                            format!("{name:?}: no [[upstream]] has this name"),
                        )
                    })?;
                spec.via = Some(i as u16);
            }
            "commands" => {
                for s in strings(at, &key, v)? {
                    spec.commands.push(Command::parse(s).ok_or_else(|| {
                        at.err(off, &key, format!("{s:?}: expected connect, udp or bind"))
                    })?);
                }
            }
            _ => {
                return Err(at.err(
                    k.span().start,
                    &key,
                    format!("unknown key (a rule has {RULE_FIELDS})"),
                ))
            }
        }
        let empty = match field {
            "from" => spec.from.is_empty(),
            "to" => spec.to.is_empty(),
            "ports" => spec.ports.is_empty(),
            "users" => spec.users.is_empty(),
            "commands" => spec.commands.is_empty(),
            _ => false,
        };
        if empty {
            // An empty list would read as "anything", the opposite of what it says.
            return Err(at.err(
                off,
                &key,
                "empty list (leave the key out to match anything)",
            ));
        }
    }
    if spec.via.is_some() && action == Some(Action::Deny) {
        return Err(at.err(
            rule.span().start,
            &format!("rule {index}"),
            "via is for allow rules",
        ));
    }
    spec.action = action.ok_or_else(|| {
        at.err(
            rule.span().start,
            &format!("rule {index}"),
            "needs action = \"allow\" or \"deny\"",
        )
    })?;
    Ok(spec)
}

fn parse_action(at: &At<'_>, key: &str, v: &Spanned<Value>) -> Result<Action, String> {
    match v.get_ref().as_str() {
        Some("allow") => Ok(Action::Allow),
        Some("deny") => Ok(Action::Deny),
        _ => Err(at.err(v.span().start, key, "expected \"allow\" or \"deny\"")),
    }
}

/// A string, or a list of strings.
fn strings<'v>(at: &At<'_>, key: &str, v: &'v Spanned<Value>) -> Result<Vec<&'v str>, String> {
    let bad = || {
        at.err(
            v.span().start,
            key,
            "expected a string or a list of strings",
        )
    };
    match v.get_ref() {
        Value::String(s) => Ok(vec![s.as_str()]),
        Value::Array(items) => items.iter().map(|i| i.as_str().ok_or_else(bad)).collect(),
        _ => Err(bad()),
    }
}

/// A port, a `"LO-HI"` range, or a list of them.
fn ports(at: &At<'_>, key: &str, v: &Spanned<Value>) -> Result<Vec<(u16, u16)>, String> {
    let off = v.span().start;
    let one = |item: &Value| -> Result<(u16, u16), String> {
        match item {
            Value::Integer(n) => match u16::try_from(*n) {
                Ok(p) if p > 0 => Ok((p, p)),
                _ => Err(at.err(off, key, format!("port {n}: expected 1 to 65535"))),
            },
            Value::String(s) => rules::parse_ports(s).map_err(|e| at.err(off, key, e)),
            _ => Err(at.err(
                off,
                key,
                "expected a port, a \"LO-HI\" range, or a list of them",
            )),
        }
    };
    match v.get_ref() {
        Value::Array(items) => items.iter().map(one).collect(),
        item => Ok(vec![one(item)?]),
    }
}

fn parse_policy(at: &At<'_>, value: &Spanned<Value>) -> Result<Policy, String> {
    #[derive(serde::Deserialize)]
    struct Doc {
        policy: Spanned<Table>,
    }
    if !value.get_ref().is_table() {
        return Err(at.err(value.span().start, "policy", "expected a [policy] table"));
    }
    let doc: Doc = toml::from_str(at.text).map_err(|e| {
        let line = e.span().map_or(1, |s| at.line(s.start));
        format!("{line}: policy: {}", e.message().trim())
    })?;
    let mut policy = Policy::default();
    for (k, v) in doc.policy.get_ref() {
        let field = k.get_ref().as_str();
        let key = format!("policy.{field}");
        match field {
            "default" => policy.default = Some(parse_action(at, &key, v)?),
            "deny_private_targets" => {
                policy.deny_private_targets = v
                    .get_ref()
                    .as_bool()
                    .ok_or_else(|| at.err(v.span().start, &key, "expected true or false"))?;
            }
            _ => {
                return Err(at.err(
                    k.span().start,
                    &key,
                    "unknown key ([policy] has default and deny_private_targets)",
                ))
            }
        }
    }
    Ok(policy)
}

const UPSTREAM_FIELDS: &str = "name, address, user, password, resolve";

/// `[[upstream]]` tables: SOCKS5 servers rules may send requests through (`via`).
fn parse_upstreams(at: &At<'_>, value: &Spanned<Value>) -> Result<Vec<super::Upstream>, String> {
    use std::net::ToSocketAddrs;
    let Value::Array(_) = value.get_ref() else {
        return Err(at.err(
            value.span().start,
            "upstream",
            "expected [[upstream]] tables",
        ));
    };
    #[derive(serde::Deserialize)]
    struct Doc {
        #[serde(default)]
        upstream: Vec<Spanned<Table>>,
    }
    let doc: Doc = toml::from_str(at.text).map_err(|e| {
        let line = e.span().map_or(1, |s| at.line(s.start));
        format!("{line}: upstream: {}", e.message().trim())
    })?;
    let mut out: Vec<super::Upstream> = Vec::new();
    for (i, t) in doc.upstream.iter().enumerate() {
        let here = format!("upstream {}", i + 1);
        let start = t.span().start;
        let (mut name, mut address, mut user, mut password, mut local) =
            (None, None, None, None, false);
        for (k, v) in t.get_ref() {
            let field = k.get_ref().as_str();
            let key = format!("{here}: {field}");
            let off = v.span().start;
            let text = || {
                v.get_ref()
                    .as_str()
                    .ok_or_else(|| at.err(off, &key, "expected a string"))
            };
            match field {
                "name" => name = Some(text()?.to_string()),
                "address" => {
                    let a = text()?;
                    let addr = a
                        .to_socket_addrs()
                        .map_err(|e| at.err(off, &key, format!("{a:?}: {e} (want HOST:PORT)")))?
                        .next()
                        .ok_or_else(|| at.err(off, &key, format!("{a:?}: no address")))?;
                    address = Some(addr);
                }
                "user" => user = Some(text()?.as_bytes().to_vec()),
                "password" => password = Some(text()?.as_bytes().to_vec()),
                "resolve" => {
                    local = match text()? {
                        "local" => true,
                        "remote" => false,
                        other => {
                            return Err(at.err(
                                off,
                                &key,
                                format!("{other:?}: expected \"remote\" or \"local\""),
                            ))
                        }
                    }
                }
                _ => {
                    return Err(at.err(
                        k.span().start,
                        &key,
                        format!("unknown key (an upstream has {UPSTREAM_FIELDS})"),
                    ))
                }
            }
        }
        let name = name.ok_or_else(|| at.err(start, &here, "needs a name"))?;
        if out.iter().any(|u| u.name == name) {
            return Err(at.err(start, &here, format!("{name:?} is defined more than once")));
        }
        let addr = address.ok_or_else(|| at.err(start, &here, "needs an address"))?;
        let creds = match (user, password) {
            (Some(u), Some(p)) if (1..=255).contains(&u.len()) && (1..=255).contains(&p.len()) => {
                Some((u, p))
            }
            (None, None) => None,
            (Some(_), Some(_)) => {
                return Err(at.err(start, &here, "user and password are 1 to 255 bytes"))
            }
            _ => return Err(at.err(start, &here, "user and password go together")),
        };
        out.push(super::Upstream {
            name,
            addr,
            creds,
            resolve_local: local,
        });
    }
    Ok(out)
}
