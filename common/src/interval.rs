//! Intervals in config files: `"never"`, or a number with a unit (`"500ms"`, `"30s"`,
//! `"5m"`, `"1h"`), or a plain integer of milliseconds.

use std::time::Duration;

use serde::{Deserialize, Deserializer};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Interval(pub Option<Duration>);

impl Interval {
    pub const NEVER: Interval = Interval(None);

    pub fn parse(s: &str) -> Result<Self, String> {
        let s = s.trim();
        if s.eq_ignore_ascii_case("never") {
            return Ok(Interval::NEVER);
        }
        let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
        let (num, unit) = s.split_at(split);
        let n: u64 = num.parse().map_err(|_| {
            format!("`{s}` is not an interval (examples: \"never\", \"30s\", \"5m\")")
        })?;
        let d = match unit.trim() {
            "" | "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n * 60),
            "h" => Duration::from_secs(n * 3600),
            other => {
                return Err(format!(
                    "unknown interval unit `{other}` in `{s}` (ms, s, m, h)"
                ))
            }
        };
        Ok(Interval(Some(d)))
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Millis(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Millis(ms) => Ok(Interval(Some(Duration::from_millis(ms)))),
            Raw::Text(s) => Interval::parse(&s).map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_never() {
        assert_eq!(Interval::parse("never").unwrap(), Interval::NEVER);
        assert_eq!(
            Interval::parse("30s").unwrap().0,
            Some(Duration::from_secs(30))
        );
        assert_eq!(
            Interval::parse("5m").unwrap().0,
            Some(Duration::from_secs(300))
        );
        assert_eq!(
            Interval::parse("250").unwrap().0,
            Some(Duration::from_millis(250))
        );
        assert!(Interval::parse("5 parsecs").is_err());
        assert!(Interval::parse("soon").is_err());
    }
}
