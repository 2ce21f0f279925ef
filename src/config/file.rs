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
    for (key, value) in &top {
        let name = key.get_ref().as_str();
        let offset = key.span().start;
        match name {
            "rule" => out.rules = parse_rules(&at, value)?,
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

const RULE_FIELDS: &str = "action, from, to, ports, users, commands";

fn parse_rules(at: &At<'_>, value: &Spanned<Value>) -> Result<Vec<RuleSpec>, String> {
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
        .map(|(i, r)| parse_rule(at, i + 1, r))
        .collect()
}

fn parse_rule(at: &At<'_>, index: usize, rule: &Spanned<Table>) -> Result<RuleSpec, String> {
    let line = at.line(rule.span().start);
    let mut spec = RuleSpec {
        action: Action::Deny,
        from: Vec::new(),
        to: Vec::new(),
        ports: Vec::new(),
        users: Vec::new(),
        commands: Vec::new(),
        line,
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
