//! Users for RFC 1929 authentication: `--user NAME:PASS` entries and the
//! `--users` file, merged into one [`Users`] table.
//!
//! Owns the checks specific to a secrets file (it must be a regular file
//! that group and others cannot access) and the line-numbered errors for
//! bad or duplicate entries, so the command-line code only sees a table.

use std::collections::HashMap;
use std::fmt;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use super::{invalid, ConfigError};
use crate::proto::Users;

/// Where a user was defined, for duplicate errors.
#[derive(Clone, Copy)]
enum Origin {
    Flag,
    Line(usize),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Flag => f.write_str("by --user"),
            Origin::Line(n) => write!(f, "on line {n}"),
        }
    }
}

/// Builds the user table from `--user` entries and the `--users` file.
/// `None` when neither is given. A name defined twice is an error rather
/// than "last wins": with two sources, a silent override is more likely a
/// mistake than an intent.
pub(super) fn load_users(
    flags: &[String],
    file: Option<&Path>,
) -> Result<Option<Users>, ConfigError> {
    if flags.is_empty() && file.is_none() {
        return Ok(None);
    }
    let mut users = Users::new();
    let mut seen: HashMap<Vec<u8>, Origin> = HashMap::new();

    for entry in flags {
        // Quote only the name part: the rest is (meant to be) a password.
        let shown = entry.split_once(':').map_or(entry.as_str(), |(n, _)| n);
        let (name, pass) =
            Users::parse_entry(entry).map_err(|e| invalid(format!("--user {shown:?}: {e}")))?;
        if let Some(first) = seen.insert(name.clone(), Origin::Flag) {
            return Err(invalid(format!(
                "--user {shown:?}: user defined more than once (first {first})"
            )));
        }
        users.insert(&name, &pass);
    }

    if let Some(path) = file {
        let text = read_private_file(path)?;
        for (i, line) in text.lines().enumerate() {
            let lineno = i + 1;
            let trimmed = line.trim_start();
            if trimmed.is_empty() || trimmed.starts_with('#') {
                continue;
            }
            let at = || format!("--users {} line {lineno}", path.display());
            let (name, pass) =
                Users::parse_entry(line).map_err(|e| invalid(format!("{}: {e}", at())))?;
            if let Some(first) = seen.insert(name.clone(), Origin::Line(lineno)) {
                return Err(invalid(format!(
                    "{}: user {:?} defined more than once (first {first})",
                    at(),
                    String::from_utf8_lossy(&name)
                )));
            }
            users.insert(&name, &pass);
        }
    }

    if users.is_empty() {
        // Asking for authentication and getting an open proxy because the
        // file was empty would be the worst possible failure mode.
        let path = file.map_or_else(String::new, |p| p.display().to_string());
        return Err(invalid(format!(
            "--users {path}: no users defined; refusing to run without authentication"
        )));
    }
    Ok(Some(users))
}

/// Reads a secrets file, refusing it if group or others have any access.
/// The mode is checked on the opened file, so it is the file actually read.
fn read_private_file(path: &Path) -> Result<String, ConfigError> {
    use std::io::Read;
    let err = |what: String| invalid(format!("--users {}: {what}", path.display()));
    let mut file = std::fs::File::open(path).map_err(|e| err(e.to_string()))?;
    let meta = file.metadata().map_err(|e| err(e.to_string()))?;
    if !meta.is_file() {
        return Err(err("not a regular file".into()));
    }
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o077 != 0 {
        let how = if mode & 0o044 != 0 {
            "readable"
        } else if mode & 0o022 != 0 {
            "writable"
        } else {
            "accessible"
        };
        return Err(err(format!(
            "file is {how} by group or others (mode {mode:04o}); run chmod 600"
        )));
    }
    let mut text = String::new();
    file.read_to_string(&mut text)
        .map_err(|e| err(e.to_string()))?;
    Ok(text)
}

#[cfg(test)]
mod tests {
    use crate::config::test_support::{parse, parse_err, TempFile};

    #[test]
    fn user_flag() {
        assert_eq!(
            parse_err(&["--user", "bob"]),
            "--user \"bob\": expected \"name:password\" but there is no ':'"
        );
        let e = parse_err(&["--user", "bob:"]);
        assert!(e.starts_with("--user \"bob\": "), "{e}");
        let e = parse_err(&["--user", ":hunter2"]);
        assert!(
            e.starts_with("--user \"\": ") && !e.contains("hunter2"),
            "{e}"
        );
        let e = parse_err(&["--user", "bob:a", "--user", "bob:b"]);
        assert!(e.contains("more than once"), "{e}");
        let c = parse(&["--user", "bob:pw"]).unwrap();
        assert!(c.users.unwrap().verify(b"bob", b"pw"));
    }

    #[test]
    fn users_file_private_ok_with_comments() {
        let f = TempFile::new(
            "# ringsocks users\n\nalice:one\n   \n  # indented comment\nbob:two words \r\n",
            0o600,
        );
        let users = parse(&["--users", f.path()]).unwrap().users.unwrap();
        assert_eq!(users.len(), 2);
        assert!(users.verify(b"alice", b"one"));
        // Verbatim: the trailing space belongs to the password.
        assert!(users.verify(b"bob", b"two words "));
        let f = TempFile::new("alice:one\n", 0o400);
        assert!(parse(&["--users", f.path()]).is_ok());
    }

    #[test]
    fn users_file_group_readable_refused() {
        let f = TempFile::new("alice:one\n", 0o644);
        assert_eq!(
            parse_err(&["--users", f.path()]),
            format!(
                "--users {}: file is readable by group or others (mode 0644); run chmod 600",
                f.path()
            )
        );
        let f = TempFile::new("alice:one\n", 0o602);
        assert!(parse_err(&["--users", f.path()]).contains("writable by group or others"));
    }

    #[test]
    fn users_file_missing() {
        let e = parse_err(&["--users", "/nonexistent/ringsocks-users"]);
        assert!(
            e.starts_with("--users /nonexistent/ringsocks-users: ") && e.contains("No such file"),
            "{e}"
        );
        assert!(parse_err(&["--users", "/"]).contains("not a regular file"));
    }

    #[test]
    fn users_file_bad_line() {
        let f = TempFile::new("# header\nalice:one\nbob\n", 0o600);
        let e = parse_err(&["--users", f.path()]);
        assert!(
            e.starts_with(&format!("--users {} line 3: ", f.path())) && e.contains("':'"),
            "{e}"
        );
    }

    #[test]
    fn users_file_duplicates() {
        let f = TempFile::new("alice:one\nbob:x\nalice:two\n", 0o600);
        assert_eq!(
            parse_err(&["--users", f.path()]),
            format!(
                "--users {} line 3: user \"alice\" defined more than once (first on line 1)",
                f.path()
            )
        );
        let f = TempFile::new("alice:one\n", 0o600);
        let e = parse_err(&["--user", "alice:zero", "--users", f.path()]);
        assert!(e.contains("line 1") && e.contains("first by --user"), "{e}");
    }

    #[test]
    fn users_file_without_users_refused() {
        let f = TempFile::new("# nobody yet\n\n", 0o600);
        assert!(parse_err(&["--users", f.path()]).contains("no users defined"));
    }
}
