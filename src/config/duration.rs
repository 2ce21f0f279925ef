//! Durations on the command line: [`parse_duration`] and the clap value
//! parsers built on it for flags that must be positive or may be "off".
//!
//! Kept on its own because it is pure string arithmetic with edge cases of
//! its own (units, fractions, overflow) and is exported for other code.

use std::time::Duration;

/// Longest accepted duration. Timeouts are added to `Instant`s, which panics
/// on overflow; a year is beyond any sensible timeout and far from overflow.
const MAX_DURATION: Duration = Duration::from_secs(365 * 24 * 60 * 60);

/// Parses `10s`, `500ms`, `2m`, `1h`, or a bare number of seconds (`3`,
/// `0.5`). Exact (integer arithmetic, to the nanosecond); at most a year.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    const HINT: &str = "expected a number with an optional unit (ms, s, m, h), e.g. 10s, 500ms, 2m";
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let unit_ns: u128 = match unit {
        "" | "s" => 1_000_000_000,
        "ms" => 1_000_000,
        "m" => 60_000_000_000,
        "h" => 3_600_000_000_000,
        _ if num.is_empty() => return Err(HINT.to_string()),
        _ => return Err(format!("unknown unit {unit:?}; {HINT}")),
    };
    let (int, frac) = num.split_once('.').unwrap_or((num, ""));
    if (int.is_empty() && frac.is_empty()) || frac.contains('.') {
        return Err(HINT.to_string());
    }
    let too_large = || {
        format!(
            "too large; at most {} days",
            MAX_DURATION.as_secs() / 86_400
        )
    };
    // Digits beyond the 12th fraction digit are below a nanosecond for every
    // unit up to hours; dropping them keeps 10^len within u128.
    let frac = &frac[..frac.len().min(12)];
    let int: u128 = if int.is_empty() {
        0
    } else {
        int.parse().map_err(|_| too_large())?
    };
    let frac_ns = if frac.is_empty() {
        0
    } else {
        let digits: u128 = frac.parse().map_err(|_| HINT.to_string())?;
        digits * unit_ns / 10u128.pow(frac.len() as u32)
    };
    let total = int
        .checked_mul(unit_ns)
        .and_then(|n| n.checked_add(frac_ns))
        .filter(|&n| n <= MAX_DURATION.as_nanos())
        .ok_or_else(too_large)?;
    // Fits: MAX_DURATION is far below u64::MAX nanoseconds (584 years).
    Ok(Duration::from_nanos(total as u64))
}

pub(super) fn parse_positive_duration(s: &str) -> Result<Duration, String> {
    let d = parse_duration(s)?;
    if d.is_zero() {
        return Err("must be greater than 0".to_string());
    }
    Ok(d)
}

/// Zero stands for "off" ([`off_if_zero`] turns it into `None`).
pub(super) fn parse_idle_timeout(s: &str) -> Result<Duration, String> {
    if s.eq_ignore_ascii_case("off") {
        return Ok(Duration::ZERO);
    }
    parse_duration(s).map_err(|e| format!("{e}, or \"off\""))
}

/// A duration from [`parse_idle_timeout`] as the `Config` field: zero is "off".
pub(super) fn off_if_zero(d: Duration) -> Option<Duration> {
    (!d.is_zero()).then_some(d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duration_parser() {
        let ok = |s: &str| parse_duration(s).unwrap();
        assert_eq!(ok("10s"), Duration::from_secs(10));
        assert_eq!(ok("500ms"), Duration::from_millis(500));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("3"), Duration::from_secs(3));
        assert_eq!(ok("0.5"), Duration::from_millis(500));
        assert_eq!(ok(".25s"), Duration::from_millis(250));
        assert_eq!(ok("1.5m"), Duration::from_secs(90));
        assert_eq!(ok("0.001"), Duration::from_millis(1));
        assert_eq!(ok("1.0000000001"), Duration::from_nanos(1_000_000_000));
        assert_eq!(ok("0"), Duration::ZERO);
        for bad in [
            "", "s", ".", "1..5", "1.2.3", "-1", "+1", " 1", "1 s", "10x", "10sec", "1e3", "inf",
            "nan", "10S", "1,5",
        ] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(parse_duration("10x").unwrap_err().contains("unknown unit"));
        assert!(parse_duration("9000h").unwrap_err().contains("too large"));
        assert!(parse_duration("99999999999999999999999999999999999999999")
            .unwrap_err()
            .contains("too large"));
    }
}
