//! The RFC 1929 user table and credential check.
//!
//! Verification compares passwords in constant time and does the same work
//! for unknown users, so response timing reveals neither how much of a
//! password matched nor which user names exist.

use std::collections::HashMap;
use std::fmt;

/// Compared against when the user is unknown, so that path costs the same
/// as a wrong password for a real user.
const DUMMY_PASSWORD: &[u8] = b"ringsocks-dummy-password-for-unknown-users";

/// User name -> password.
#[derive(Clone, Default)]
pub struct Users {
    map: HashMap<Box<[u8]>, Box<[u8]>>,
}

// Hand-written so passwords never reach a log line via `{:?}`.
impl fmt::Debug for Users {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Users")
            .field("len", &self.map.len())
            .finish()
    }
}

impl Users {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds or replaces a user.
    pub fn insert(&mut self, uname: &[u8], passwd: &[u8]) {
        self.map.insert(uname.into(), passwd.into());
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// The usernames, in no particular order.
    pub fn names(&self) -> impl Iterator<Item = &[u8]> {
        self.map.keys().map(|k| &k[..])
    }

    pub fn verify(&self, uname: &[u8], passwd: &[u8]) -> bool {
        match self.map.get(uname) {
            Some(expected) => ct_eq(expected, passwd),
            None => {
                // Result deliberately ignored: only the work matters.
                std::hint::black_box(ct_eq(DUMMY_PASSWORD, passwd));
                false
            }
        }
    }

    /// Parses one `name:password` entry, split at the first `:` so that
    /// passwords may contain colons. Both parts must be 1..=255 bytes, the
    /// limits of the RFC 1929 length bytes. Errors never quote the password.
    pub fn parse_entry(line: &str) -> Result<(Vec<u8>, Vec<u8>), String> {
        let Some((name, passwd)) = line.split_once(':') else {
            return Err("expected \"name:password\" but there is no ':'".to_string());
        };
        if name.is_empty() {
            return Err("the user name before ':' is empty".to_string());
        }
        if name.len() > 255 {
            return Err(format!(
                "the user name is {} bytes long; at most 255 are allowed",
                name.len()
            ));
        }
        if passwd.is_empty() {
            return Err(format!("the password of user {name:?} is empty"));
        }
        if passwd.len() > 255 {
            return Err(format!(
                "the password of user {name:?} is {} bytes long; at most 255 are allowed",
                passwd.len()
            ));
        }
        Ok((name.as_bytes().to_vec(), passwd.as_bytes().to_vec()))
    }
}

/// Constant-time equality. The loop runs over every byte of `given` (whose
/// length the attacker already knows) whatever the contents or the length
/// of `expected`, folding all differences into one accumulator with no
/// early exit.
fn ct_eq(expected: &[u8], given: &[u8]) -> bool {
    let mut diff = expected.len() ^ given.len();
    // Index cyclically so a length mismatch still reads real bytes; guard
    // the (never configured) empty password against division by zero.
    let elen = expected.len().max(1);
    for (i, &g) in given.iter().enumerate() {
        let e = expected.get(i % elen).copied().unwrap_or(0);
        diff |= usize::from(e ^ g);
    }
    std::hint::black_box(diff) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ct_eq_cases() {
        assert!(ct_eq(b"secret", b"secret"));
        assert!(!ct_eq(b"secret", b"secreT"));
        assert!(!ct_eq(b"secret", b"secret!"));
        assert!(!ct_eq(b"secret", b"secre"));
        assert!(!ct_eq(b"secret", b""));
        assert!(!ct_eq(b"ab", b"abab"));
        assert!(ct_eq(b"", b""));
        assert!(!ct_eq(b"", b"x"));
    }

    #[test]
    fn verify() {
        let mut u = Users::new();
        assert!(u.is_empty());
        u.insert(b"alice", b"pw1");
        u.insert(b"bob", b"p:w");
        assert_eq!(u.len(), 2);
        assert!(u.verify(b"alice", b"pw1"));
        assert!(!u.verify(b"alice", b"pw2"));
        assert!(!u.verify(b"alice", b""));
        assert!(!u.verify(b"bob", b"pw1"));
        assert!(u.verify(b"bob", b"p:w"));
        assert!(!u.verify(b"carol", b"pw1"));
        assert!(!u.verify(b"carol", DUMMY_PASSWORD));
        assert!(!u.verify(b"", b""));
        u.insert(b"alice", b"new");
        assert!(u.verify(b"alice", b"new"));
        assert_eq!(u.len(), 2);
        assert!(!format!("{u:?}").contains("new"));
    }

    #[test]
    fn parse_entry() {
        assert_eq!(
            Users::parse_entry("a:b"),
            Ok((b"a".to_vec(), b"b".to_vec()))
        );
        assert_eq!(
            Users::parse_entry("user:pa:ss:"),
            Ok((b"user".to_vec(), b"pa:ss:".to_vec()))
        );
        let long = "x".repeat(255);
        assert!(Users::parse_entry(&format!("{long}:{long}")).is_ok());
        for bad in [
            "nocolon".to_string(),
            ":pw".to_string(),
            "user:".to_string(),
            format!("{long}x:pw"),
            format!("u:{long}x"),
            String::new(),
        ] {
            let err = Users::parse_entry(&bad).unwrap_err();
            assert!(!err.is_empty());
        }
        let err = Users::parse_entry(&format!("u:{long}SECRET")).unwrap_err();
        assert!(!err.contains("SECRET"), "{err}");
    }
}
