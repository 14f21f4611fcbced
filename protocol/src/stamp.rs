//! Time: seconds since the epoch, RFC 3339 time stamps, and the archive names' stamp. All
//! through the `time` crate.

use std::fmt;

use serde::{Deserialize, Deserializer, Serialize};
use time::format_description::well_known::Rfc3339;
use time::macros::format_description;
use time::OffsetDateTime;

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Seconds since the epoch of an RFC 3339 time (`2026-09-20T12:00:00Z`,
/// `2026-09-20T12:00:00.5+02:00`); None when it is not one, or is before the epoch.
pub fn parse_rfc3339(s: &str) -> Option<u64> {
    let t = OffsetDateTime::parse(s, &Rfc3339).ok()?;
    u64::try_from(t.unix_timestamp()).ok()
}

/// A time stamp in RFC 3339 form, kept as written and as seconds since the epoch.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(transparent)]
pub struct Timestamp {
    text: String,
    #[serde(skip)]
    epoch: u64,
}

impl Timestamp {
    /// Seconds since the epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }
    /// As written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The time `epoch` seconds after 1970-01-01T00:00:00Z, written `2026-09-20T12:00:00Z`.
    pub fn from_epoch(epoch: u64) -> Self {
        let t = i64::try_from(epoch)
            .ok()
            .and_then(|e| OffsetDateTime::from_unix_timestamp(e).ok())
            .unwrap_or(OffsetDateTime::UNIX_EPOCH);
        Timestamp {
            text: t
                .format(format_description!(
                    "[year]-[month]-[day]T[hour]:[minute]:[second]Z"
                ))
                .expect("a UTC time formats"),
            epoch,
        }
    }

    /// Now.
    pub fn now() -> Self {
        Self::from_epoch(now())
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        match parse_rfc3339(&text) {
            Some(epoch) => Ok(Timestamp { text, epoch }),
            None => Err(serde::de::Error::custom(format!(
                "{text:?} is not an RFC 3339 time such as 2026-09-20T00:00:00Z"
            ))),
        }
    }
}

/// A moment in the two spellings archives use.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Stamp {
    /// `YYYYMMDD_HHMMSS`, UTC: the original's archive naming.
    pub file: String,
    /// RFC 3339, UTC, whole seconds.
    pub rfc3339: String,
}

impl Stamp {
    /// Now.
    pub fn now() -> Self {
        let now = OffsetDateTime::now_utc();
        Stamp {
            file: now
                .format(format_description!(
                    "[year][month][day]_[hour][minute][second]"
                ))
                .expect("a UTC time formats"),
            rfc3339: now
                .replace_nanosecond(0)
                .unwrap_or(now)
                .format(&Rfc3339)
                .expect("a UTC time formats"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_from_epoch_read_back() {
        for t in [0, 951_827_415, 1_789_862_400, 4_102_444_799, 1_136_214_245] {
            let ts = Timestamp::from_epoch(t);
            assert_eq!(parse_rfc3339(ts.as_str()), Some(t), "{}", ts.as_str());
            assert_eq!(ts.epoch(), t);
        }
        assert_eq!(
            Timestamp::from_epoch(1_789_862_400).as_str(),
            "2026-09-20T00:00:00Z"
        );
        assert_eq!(
            Timestamp::from_epoch(951_827_415).as_str(),
            "2000-02-29T12:30:15Z"
        );
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-09-20T00:00:00Z"), Some(1_789_862_400));
        assert_eq!(parse_rfc3339("2000-02-29T12:30:15.250Z"), Some(951_827_415));
        assert_eq!(
            parse_rfc3339("2026-09-20T02:00:00+02:00"),
            parse_rfc3339("2026-09-20T00:00:00Z")
        );
        assert_eq!(
            parse_rfc3339("2026-09-19T22:30:00-01:30"),
            parse_rfc3339("2026-09-20T00:00:00Z")
        );
        for bad in [
            "2026-09-20",
            "2026-09-20T00:00:00",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-09-20T24:00:00Z",
            "2026-09-20T00:00:00.Z",
            "yesterday at noon, UTC!",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn archive_stamps() {
        let s = Stamp::now();
        assert_eq!(s.file.len(), 15, "{}", s.file);
        assert!(parse_rfc3339(&s.rfc3339).is_some(), "{}", s.rfc3339);
    }
}
