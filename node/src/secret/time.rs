//! Time in the forms users read and type: RFC 3339 timestamps and short
//! durations (`10s`, `5m`, `1d`, `1w`).

/// Formats milliseconds since the Unix epoch as RFC 3339 UTC with
/// milliseconds, e.g. `2026-11-22T04:05:06.789Z`.
pub fn rfc3339(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86_400, secs % 86_400);
    let (y, m, d) = civil_from_days(days as i64);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60,
        ms % 1000
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's
/// algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Parses `off` (None) or a duration such as `10s`, `1500ms`, `5m`, `2h`,
/// `1d`, `1w` into milliseconds.
pub fn parse_timer(s: &str) -> Result<Option<u64>, String> {
    let s = s.trim();
    if s.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let bad = || format!("cannot read the timer {s:?}: use e.g. 10s, 5m, 2h, 1d, 1w or off");
    let n: u64 = num.parse().map_err(|_| bad())?;
    let unit_ms: u64 = match unit {
        "ms" => 1,
        "s" | "" => 1000,
        "m" => 60_000,
        "h" => 3_600_000,
        "d" => 86_400_000,
        "w" => 7 * 86_400_000,
        _ => return Err(bad()),
    };
    let ms = n.checked_mul(unit_ms).ok_or_else(bad)?;
    if ms == 0 {
        return Err("a timer of zero would delete messages unread; use `off` for no timer".into());
    }
    Ok(Some(ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(rfc3339(951_782_400_123), "2000-02-29T00:00:00.123Z");
        assert_eq!(rfc3339(1_795_321_506_789), "2026-11-22T04:25:06.789Z");
    }

    #[test]
    fn timers_parse_like_people_write_them() {
        assert_eq!(parse_timer("10s"), Ok(Some(10_000)));
        assert_eq!(parse_timer("5m"), Ok(Some(300_000)));
        assert_eq!(parse_timer("1d"), Ok(Some(86_400_000)));
        assert_eq!(parse_timer("1w"), Ok(Some(604_800_000)));
        assert_eq!(parse_timer("off"), Ok(None));
        assert!(parse_timer("0s").is_err());
        assert!(parse_timer("ten").is_err());
        assert!(parse_timer("10x").is_err());
        assert!(parse_timer("99999999999999999999w").is_err());
    }
}
