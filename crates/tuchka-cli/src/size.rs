//! Sizes as people type and read them.
//!
//! Input: `256M`, `1G`, `1.5G`, `512MiB`, `2048` (a bare number is MiB). `M`/`MB`/`MiB` all
//! mean MiB and `G`/`GB`/`GiB` GiB (1024-based, like qemu-img), `T`/`TB`/`TiB` TiB; units are
//! case-insensitive. The result must be a whole, positive number of MiB that fits in a `u64`.
//! Output: the shortest 1024-based form with at most one decimal (`256M`, `1.5G`, `3K`).

/// Why a size could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SizeError {
    /// Not a number with a known unit.
    #[error("invalid size {0:?}: use a number with M or G, e.g. 256M")]
    Invalid(String),
    /// Zero (or rounds to zero).
    #[error("invalid size {0:?}: must be more than 0")]
    Zero(String),
    /// Not a whole number of MiB, e.g. `0.3M`.
    #[error("invalid size {0:?}: must be a whole number of MiB")]
    Fraction(String),
    /// Larger than tuchka can represent.
    #[error("invalid size {0:?}: too large")]
    TooLarge(String),
}

/// Parse a size into MiB (see the module docs for the accepted forms).
pub fn parse_size_mib(input: &str) -> Result<u64, SizeError> {
    let text = input.trim();
    let invalid = || SizeError::Invalid(input.to_string());
    let split = text
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(text.len());
    let (number, unit) = text.split_at(split);
    let unit_mib: u128 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => 1,
        "g" | "gb" | "gib" => 1024,
        "t" | "tb" | "tib" => 1024 * 1024,
        _ => return Err(invalid()),
    };
    let (whole, frac) = match number.split_once('.') {
        Some((w, f)) => (w, f),
        None => (number, ""),
    };
    let digits_ok = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits_ok(whole) || !digits_ok(frac) {
        return Err(invalid());
    }
    // Exact arithmetic: value = mantissa / 10^scale units.
    let too_large = || SizeError::TooLarge(input.to_string());
    let mantissa: u128 = format!("{whole}{frac}").parse().map_err(|_| too_large())?;
    let scale = u32::try_from(frac.len()).map_err(|_| too_large())?;
    let divisor = 10u128.checked_pow(scale).ok_or_else(too_large)?;
    let numerator = mantissa.checked_mul(unit_mib).ok_or_else(too_large)?;
    if numerator == 0 {
        return Err(SizeError::Zero(input.to_string()));
    }
    if numerator % divisor != 0 {
        return Err(SizeError::Fraction(input.to_string()));
    }
    u64::try_from(numerator / divisor).map_err(|_| too_large())
}

/// [`parse_size_mib`] for clap's `value_parser`.
pub fn parse_size_arg(input: &str) -> Result<u64, String> {
    parse_size_mib(input).map_err(|e| e.to_string())
}

/// A duration in whole seconds: `90`, `90s`, `10m`, `1h` (for clap's `value_parser`).
pub fn parse_duration_arg(input: &str) -> Result<u32, String> {
    let t = input.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, 's')) => (&t[..i], 1),
        Some((i, 'm')) => (&t[..i], 60),
        Some((i, 'h')) => (&t[..i], 3600),
        _ => (t, 1),
    };
    let bad = || format!("{input:?} is not a duration: use e.g. 90s, 10m or 1h");
    let n: u32 = num.parse().map_err(|_| bad())?;
    match n.checked_mul(mult) {
        Some(0) | None => Err(bad()),
        Some(s) => Ok(s),
    }
}

/// A byte count for people: `512B`, `3K`, `1.5G`, `350.2M`.
pub fn format_bytes(bytes: u64) -> String {
    const UNITS: [&str; 6] = ["B", "K", "M", "G", "T", "P"];
    let mut unit = 0;
    let mut divisor = 1u64;
    while unit + 1 < UNITS.len() && bytes / divisor >= 1024 {
        divisor *= 1024;
        unit += 1;
    }
    if unit == 0 {
        return format!("{bytes}B");
    }
    // One decimal, computed in integers so it never shows "1024.0K".
    let tenths = (u128::from(bytes) * 10 + u128::from(divisor) / 2) / u128::from(divisor);
    let (whole, tenth) = (tenths / 10, tenths % 10);
    if whole >= 1024 && unit + 1 < UNITS.len() {
        return format!("1{}", UNITS[unit + 1]);
    }
    if tenth == 0 {
        format!("{whole}{}", UNITS[unit])
    } else {
        format!("{whole}.{tenth}{}", UNITS[unit])
    }
}

/// A MiB count for people (`256M`, `1.5G`).
pub fn format_mib(mib: u64) -> String {
    format_bytes(mib.saturating_mul(1024 * 1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepted_forms() {
        assert_eq!(parse_size_mib("256M"), Ok(256));
        assert_eq!(parse_size_mib("1G"), Ok(1024));
        assert_eq!(parse_size_mib("1.5G"), Ok(1536));
        assert_eq!(parse_size_mib("512MiB"), Ok(512));
        assert_eq!(parse_size_mib("2048"), Ok(2048));
        assert_eq!(parse_size_mib("2gb"), Ok(2048));
        assert_eq!(parse_size_mib(" 64 MB "), Ok(64));
        assert_eq!(parse_size_mib("1T"), Ok(1024 * 1024));
        assert_eq!(parse_size_mib(".5G"), Ok(512));
        assert_eq!(parse_size_mib("2."), Ok(2));
    }

    #[test]
    fn garbage_is_rejected_with_the_hint() {
        for bad in [
            "12X", "", "M", "abc", "-1G", "1..5G", "1.5.G", "1 G B", "0x10", "+5M",
        ] {
            let err = parse_size_mib(bad).expect_err(bad);
            assert_eq!(err, SizeError::Invalid(bad.to_string()), "{bad}");
        }
        assert_eq!(
            parse_size_mib("12X").expect_err("12X").to_string(),
            "invalid size \"12X\": use a number with M or G, e.g. 256M"
        );
    }

    #[test]
    fn zero_fractions_and_overflow_are_rejected() {
        assert_eq!(
            parse_size_mib("0").expect_err("0").to_string(),
            "invalid size \"0\": must be more than 0"
        );
        assert!(matches!(parse_size_mib("0.0G"), Err(SizeError::Zero(_))));
        assert!(matches!(
            parse_size_mib("0.3M"),
            Err(SizeError::Fraction(_))
        ));
        assert!(matches!(
            parse_size_mib("1.0001G"),
            Err(SizeError::Fraction(_))
        ));
        assert!(matches!(
            parse_size_mib("99999999999999999999999T"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size_mib("18446744073709551616"),
            Err(SizeError::TooLarge(_))
        ));
        assert!(matches!(
            parse_size_mib(&"9".repeat(60)),
            Err(SizeError::TooLarge(_))
        ));
        assert_eq!(parse_size_mib("18446744073709551615"), Ok(u64::MAX));
    }

    #[test]
    fn formats_for_people() {
        assert_eq!(format_bytes(0), "0B");
        assert_eq!(format_bytes(1023), "1023B");
        assert_eq!(format_bytes(3 * 1024), "3K");
        assert_eq!(format_bytes(1024 * 1024 - 1), "1M");
        assert_eq!(format_bytes(367_001_600), "350M");
        assert_eq!(format_bytes(367_211_315), "350.2M");
        assert_eq!(format_mib(256), "256M");
        assert_eq!(format_mib(1536), "1.5G");
        assert_eq!(format_mib(1024), "1G");
        assert_eq!(format_mib(1000), "1000M");
        assert_eq!(format_mib(8000), "7.8G");
    }

    #[test]
    fn durations_in_seconds() {
        assert_eq!(parse_duration_arg("90"), Ok(90));
        assert_eq!(parse_duration_arg("90s"), Ok(90));
        assert_eq!(parse_duration_arg("10m"), Ok(600));
        assert_eq!(parse_duration_arg("1h"), Ok(3600));
        for bad in ["", "0", "m", "1.5m", "-1s", "10d"] {
            assert!(parse_duration_arg(bad).is_err(), "{bad}");
        }
    }
}
