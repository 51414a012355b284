//! Hybrid-logical-clock timestamps as changefeeds print them:
//! wall nanoseconds, a dot, and a ten-digit logical counter.

use std::fmt;
use std::str::FromStr;

/// A hybrid logical clock timestamp. Orders by wall time, then logical counter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Hlc {
    /// Nanoseconds since the Unix epoch.
    pub nanos: i64,
    /// Logical counter that orders events within one nanosecond.
    pub logical: i32,
}

impl Hlc {
    pub fn new(nanos: i64, logical: i32) -> Self {
        Hlc { nanos, logical }
    }

    /// The wall time as seconds since the epoch (for lag metrics).
    pub fn seconds(&self) -> f64 {
        self.nanos as f64 / 1e9
    }
}

impl fmt::Display for Hlc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{:010}", self.nanos, self.logical)
    }
}

/// Why a timestamp string could not be read.
#[derive(Debug, thiserror::Error, PartialEq)]
#[error("invalid HLC timestamp {0:?}: expected <nanoseconds>.<logical>, e.g. 1700000000123456789.0000000000")]
pub struct HlcParseError(pub String);

impl FromStr for Hlc {
    type Err = HlcParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || HlcParseError(s.to_string());
        let (wall, logical) = match s.split_once('.') {
            Some((w, l)) => (w, l),
            None => (s, "0"),
        };
        if wall.is_empty() || !wall.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        if logical.is_empty() || !logical.bytes().all(|b| b.is_ascii_digit()) {
            return Err(err());
        }
        let nanos = wall.parse::<i64>().map_err(|_| err())?;
        let logical = logical.parse::<i32>().map_err(|_| err())?;
        Ok(Hlc { nanos, logical })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        let h: Hlc = "1700000000123456789.0000000002".parse().unwrap();
        assert_eq!(h, Hlc::new(1_700_000_000_123_456_789, 2));
        assert_eq!(h.to_string(), "1700000000123456789.0000000002");
        let bare: Hlc = "5".parse().unwrap();
        assert_eq!(bare, Hlc::new(5, 0));
    }

    #[test]
    fn rejects_garbage() {
        for bad in [
            "",
            ".",
            "abc",
            "1.x",
            "-1.0",
            "1.",
            "99999999999999999999.0",
        ] {
            assert!(bad.parse::<Hlc>().is_err(), "{bad:?} should not parse");
        }
    }

    #[test]
    fn orders_by_wall_then_logical() {
        assert!(Hlc::new(1, 5) < Hlc::new(2, 0));
        assert!(Hlc::new(2, 0) < Hlc::new(2, 1));
    }
}
