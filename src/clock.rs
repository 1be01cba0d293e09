//! Wall-clock time as the queue stores it (Unix microseconds) and the parsing of durations
//! and instants given on the command line.

use std::cell::RefCell;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::error::{Error, Result};

/// Now, in Unix microseconds.
pub fn now_micros() -> i64 {
    match SystemTime::now().duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_micros()).unwrap_or(i64::MAX),
        // A clock set before 1970: treat as the epoch rather than fail a whole enqueue.
        Err(_) => 0,
    }
}

/// Parses a duration in seconds as SPEC gives them on the command line: a non-negative,
/// finite decimal number, fractions allowed (`0.5`).
pub fn parse_seconds(what: &str, text: &str) -> Result<Duration> {
    let value: f64 = text.trim().parse().map_err(|_| {
        Error::bad_input(
            what,
            format!("{text:?} is not a number of seconds (e.g. 5 or 0.25)"),
        )
    })?;
    seconds(what, value)
}

/// Checks a number of seconds given as a number (a JSON `delay`, say).
pub fn seconds(what: &str, value: f64) -> Result<Duration> {
    if !value.is_finite() {
        return Err(Error::bad_input(
            what,
            format!("{value} is not a finite number of seconds"),
        ));
    }
    if value < 0.0 {
        return Err(Error::bad_input(
            what,
            format!("{value} is negative; give 0 or more seconds"),
        ));
    }
    Duration::try_from_secs_f64(value)
        .map_err(|_| Error::bad_input(what, format!("{value} seconds is too large")))
}

/// Parses an RFC 3339 instant (`2026-11-23T18:00:00Z`, `…+01:00`) into Unix microseconds.
pub fn parse_rfc3339_micros(what: &str, text: &str) -> Result<i64> {
    let at = OffsetDateTime::parse(text.trim(), &Rfc3339).map_err(|e| {
        Error::bad_input(
            what,
            format!("{text:?} is not an RFC 3339 time ({e}); write e.g. 2026-11-23T18:00:00Z"),
        )
    })?;
    let micros = at.unix_timestamp_nanos() / 1_000;
    i64::try_from(micros).map_err(|_| Error::bad_input(what, format!("{text:?} is out of range")))
}

/// Formats Unix microseconds as RFC 3339 in UTC, for people and JSON documents: the
/// fraction has as many digits as it needs (none for a whole second), as `time` writes it.
///
/// The live view formats two times a task during a burst, nearly all within the same
/// second: `time` formats the second once a thread and second, and the fraction is
/// appended here (a third of the cost of formatting it all each time).
pub fn format_micros(micros: i64) -> String {
    thread_local! {
        /// The last second formatted on this thread, without its `Z`.
        static SECOND: RefCell<(i64, String)> = const { RefCell::new((0, String::new())) };
    }
    let second = micros.div_euclid(1_000_000);
    let fraction = micros.rem_euclid(1_000_000);
    SECOND.with_borrow_mut(|(cached, prefix)| {
        if *cached != second || prefix.is_empty() {
            let Some(text) = OffsetDateTime::from_unix_timestamp(second)
                .ok()
                .and_then(|t| t.format(&Rfc3339).ok())
            else {
                return format!("@{micros}us");
            };
            *prefix = text.trim_end_matches('Z').to_owned();
            *cached = second;
        }
        let mut out = String::with_capacity(prefix.len() + 8);
        out.push_str(prefix);
        if fraction != 0 {
            // Six digits, less the trailing zeros.
            let (mut fraction, mut width) = (fraction, 6);
            while fraction % 10 == 0 {
                fraction /= 10;
                width -= 1;
            }
            let mut buffer = itoa::Buffer::new();
            let digits = buffer.format(fraction);
            out.push('.');
            for _ in digits.len()..width {
                out.push('0');
            }
            out.push_str(digits);
        }
        out.push('Z');
        out
    })
}

/// Converts a duration to whole microseconds, saturating.
pub fn micros_of(d: Duration) -> i64 {
    i64::try_from(d.as_micros()).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_accept_fractions_and_refuse_negatives() {
        assert_eq!(
            parse_seconds("--delay", "0.5").unwrap(),
            Duration::from_millis(500)
        );
        assert!(parse_seconds("--delay", "-1").is_err());
        assert!(parse_seconds("--delay", "NaN").is_err());
        assert!(parse_seconds("--delay", "soon").is_err());
    }

    #[test]
    fn rfc3339_with_offsets() {
        let utc = parse_rfc3339_micros("--at", "2026-01-01T00:00:00Z").unwrap();
        let plus_one = parse_rfc3339_micros("--at", "2026-01-01T01:00:00+01:00").unwrap();
        assert_eq!(utc, plus_one);
        assert_eq!(utc, 1_767_225_600_000_000);
        assert!(parse_rfc3339_micros("--at", "tomorrow").is_err());
        assert_eq!(format_micros(utc), "2026-01-01T00:00:00Z");
        assert_eq!(format_micros(utc + 500_000), "2026-01-01T00:00:00.5Z");
        assert_eq!(format_micros(utc + 17), "2026-01-01T00:00:00.000017Z");
        assert_eq!(format_micros(utc - 1), "2025-12-31T23:59:59.999999Z");
    }

    proptest::proptest! {
        /// The cached second and the fraction appended give what `time` gives for the
        /// whole instant, in any order of calls (years 0 to 9999, before 1970 too).
        #[test]
        fn formatting_matches_time_for_the_whole_instant(
            micros in -62_167_219_200_000_000i64..253_402_300_799_999_999,
            same_second in 0i64..1_000_000,
        ) {
            for at in [micros, micros - micros.rem_euclid(1_000_000) + same_second] {
                let whole = OffsetDateTime::from_unix_timestamp_nanos(i128::from(at) * 1_000)
                    .unwrap()
                    .format(&Rfc3339)
                    .unwrap();
                proptest::prop_assert_eq!(format_micros(at), whole);
            }
        }
    }
}
