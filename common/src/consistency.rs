//! Read consistency levels for metadata reads served by any master of a group.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Deserialize)]
#[serde(try_from = "String")]
pub enum ReadConsistency {
    /// The serving member gets a read index confirmed by a leader quorum round and answers
    /// once it has applied it: the read sees every write acknowledged before it started.
    #[default]
    Linearizable,
    /// Like linearizable, but the leader answers the read index from its lease (check_quorum)
    /// without a quorum round: cheaper, relies on bounded clock drift.
    Lease,
    /// A follower answers from its own state if it heard from the leader within the bound;
    /// otherwise it falls back to linearizable. For immutable datasets.
    BoundedStaleness(Duration),
}

impl FromStr for ReadConsistency {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim() {
            "linearizable" => Ok(ReadConsistency::Linearizable),
            "lease" => Ok(ReadConsistency::Lease),
            other => match other.strip_prefix("bounded-staleness:") {
                Some(ms) => ms
                    .trim()
                    .parse::<u64>()
                    .map(|ms| ReadConsistency::BoundedStaleness(Duration::from_millis(ms)))
                    .map_err(|_| format!("`{other}`: the bound must be milliseconds, e.g. bounded-staleness:500")),
                None => Err(format!(
                    "`{other}` is not a read consistency (linearizable, lease, bounded-staleness:<ms>)"
                )),
            },
        }
    }
}

impl TryFrom<String> for ReadConsistency {
    type Error = String;
    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl fmt::Display for ReadConsistency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReadConsistency::Linearizable => write!(f, "linearizable"),
            ReadConsistency::Lease => write!(f, "lease"),
            ReadConsistency::BoundedStaleness(d) => {
                write!(f, "bounded-staleness:{}", d.as_millis())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints() {
        for s in ["linearizable", "lease", "bounded-staleness:250"] {
            assert_eq!(s.parse::<ReadConsistency>().unwrap().to_string(), s);
        }
        assert!("eventual".parse::<ReadConsistency>().is_err());
        assert!("bounded-staleness:soon".parse::<ReadConsistency>().is_err());
    }
}
