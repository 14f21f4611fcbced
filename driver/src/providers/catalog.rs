//! The price catalog: what a machine type costs per hour where, and where that figure came
//! from. Providers without a price API (Paperspace) make their offers from it.
//!
//! The catalog is a JSON file, `~/.cedana/catalog.json` (`$CEDANA_CATALOG` names another one):
//!
//! ```json
//! { "entries": [
//!   { "provider": "paperspace", "instance_type": "A4000", "region": "ny2",
//!     "vcpus": 8, "memory_gb": 45, "gpu": "NVIDIA RTX A4000", "gpu_count": 1, "vram_gb": 16,
//!     "price_usd_hour": 0.76, "spot": false,
//!     "source": "my invoice of 2026-10", "updated_at": "2026-10-31T00:00:00Z" } ] }
//! ```
//!
//! `gpu`, `gpu_count`, `vram_gb` and `spot` may be left out (no GPU, on-demand). Regions are the
//! provider's API names (`ny2`, not `East Coast (NY2)`; `us-east-1`). `zone` (an availability
//! zone such as `us-east-1a`) may be given for prices that differ per zone (spot prices, as
//! `cedana-driver price --refresh` writes them). Built-in catalogs ship inside the driver
//! (`driver/catalog/paperspace.json`, `driver/catalog/aws.json`: AWS on-demand Linux prices);
//! entries of the user's file replace built-in ones with the same provider, type, region, zone
//! and spot flag, and add to the rest.
//! Errors name the file, the entry's key, the line and the column.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::providers::common::Offer;

/// Environment variable naming the catalog file.
pub const CATALOG_ENV: &str = "CEDANA_CATALOG";

/// The built-in catalogs: (file, text).
const BUILTIN: [(&str, &str); 2] = [
    (
        "driver/catalog/paperspace.json",
        include_str!("../../catalog/paperspace.json"),
    ),
    (
        "driver/catalog/aws.json",
        include_str!("../../catalog/aws.json"),
    ),
];

/// Errors loading a catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read price catalog {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("price catalog {path}: `{key}` {message} (line {line}, column {column}); fix the entry or remove the file to use the built-in prices")]
    Invalid {
        path: PathBuf,
        key: String,
        message: String,
        line: usize,
        column: usize,
    },
}

pub use cedana_protocol::{parse_rfc3339, Timestamp};

/// One machine type at one place and price.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CatalogEntry {
    pub provider: String,
    pub instance_type: String,
    pub region: String,
    /// The availability zone, for prices that differ per zone.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    pub vcpus: f64,
    pub memory_gb: f64,
    #[serde(default)]
    pub gpu: Option<String>,
    #[serde(default)]
    pub gpu_count: u32,
    #[serde(default)]
    pub vram_gb: f64,
    pub price_usd_hour: f64,
    #[serde(default)]
    pub spot: bool,
    /// Where the price came from, for people: a page and its date, an invoice, "placeholder".
    pub source: String,
    /// When the price was observed.
    pub updated_at: Timestamp,
}

impl CatalogEntry {
    /// The offer this entry makes.
    pub fn offer(&self) -> Offer {
        Offer {
            provider: self.provider.clone(),
            instance_type: self.instance_type.clone(),
            vcpus: self.vcpus,
            memory_gb: self.memory_gb,
            gpu: self.gpu.clone(),
            gpu_count: self.gpu_count,
            vram_gb: self.vram_gb,
            region: self.region.clone(),
            zone: self.zone.clone(),
            price_usd_hour: self.price_usd_hour,
            spot: self.spot,
            price_source: format!("catalog: {}", self.source),
            priced_at: Some(self.updated_at.epoch()),
        }
    }

    fn key(&self) -> (&str, &str, &str, Option<&str>, bool) {
        (
            &self.provider,
            &self.instance_type,
            &self.region,
            self.zone.as_deref(),
            self.spot,
        )
    }
}

#[derive(Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
struct CatalogFile {
    entries: Vec<CatalogEntry>,
}

/// A set of priced machine types.
#[derive(Clone, Debug, Default)]
pub struct Catalog {
    pub entries: Vec<CatalogEntry>,
}

impl Catalog {
    /// The catalogs built into the driver.
    pub fn builtin() -> Self {
        let mut all = Catalog::default();
        for (path, text) in BUILTIN {
            all.overlay(
                Self::parse(text, Path::new(path))
                    .expect("the built-in catalogs are valid (a unit test checks them)"),
            );
        }
        all
    }

    /// The catalog as the file format's JSON text.
    pub fn to_json(&self) -> String {
        let file = CatalogFile {
            entries: self.entries.clone(),
        };
        let mut text = serde_json::to_string_pretty(&file).expect("a catalog serializes");
        text.push('\n');
        text
    }

    /// Parses catalog text; `path` only names the file in errors.
    pub fn parse(text: &str, path: &Path) -> Result<Self, CatalogError> {
        let de = &mut serde_json::Deserializer::from_str(text);
        let file: CatalogFile = serde_path_to_error::deserialize(de).map_err(|e| {
            let key = e.path().to_string();
            let inner = e.into_inner();
            let message = inner.to_string();
            // serde_json appends " at line L column C"; they are reported separately.
            let message = match message.rfind(" at line ") {
                Some(i) => message[..i].to_string(),
                None => message,
            };
            let message = cedana_protocol::config::plain_types(&message);
            CatalogError::Invalid {
                path: path.to_path_buf(),
                key: if key == "." {
                    "(top level)".into()
                } else {
                    key
                },
                message,
                line: inner.line(),
                column: inner.column(),
            }
        })?;
        for (i, e) in file.entries.iter().enumerate() {
            let bad = if !(e.price_usd_hour.is_finite() && e.price_usd_hour >= 0.0) {
                Some(("price_usd_hour", "must be a price of zero or more"))
            } else if !(e.vcpus > 0.0 && e.memory_gb > 0.0) {
                Some(("vcpus", "and memory_gb must be more than zero"))
            } else if e.source.trim().is_empty() {
                Some(("source", "must say where the price came from"))
            } else {
                None
            };
            if let Some((field, message)) = bad {
                let (line, column) = entry_position(text, i);
                return Err(CatalogError::Invalid {
                    path: path.to_path_buf(),
                    key: format!("entries[{i}].{field}"),
                    message: message.into(),
                    line,
                    column,
                });
            }
        }
        Ok(Catalog {
            entries: file.entries,
        })
    }

    /// Reads the catalog file at `path`.
    pub fn from_file(path: &Path) -> Result<Self, CatalogError> {
        let text = std::fs::read_to_string(path).map_err(|source| CatalogError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::parse(&text, path)
    }

    /// The user's catalog file: `$CEDANA_CATALOG`, else `~/.cedana/catalog.json`.
    pub fn default_path() -> Option<PathBuf> {
        if let Some(p) = std::env::var_os(CATALOG_ENV) {
            return Some(PathBuf::from(p));
        }
        std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cedana").join("catalog.json"))
    }

    /// The built-in catalog with the user's file on top. `$CEDANA_CATALOG` must name a file
    /// that exists; `~/.cedana/catalog.json` is optional.
    pub fn load() -> Result<Self, CatalogError> {
        let mut catalog = Self::builtin();
        let explicit = std::env::var_os(CATALOG_ENV).is_some();
        if let Some(path) = Self::default_path() {
            if explicit || path.exists() {
                catalog.overlay(Self::from_file(&path)?);
            }
        }
        Ok(catalog)
    }

    /// Entries of `other` replace entries with the same provider, type, region, zone and spot
    /// flag; the others are added.
    pub fn overlay(&mut self, other: Catalog) {
        for e in other.entries {
            match self.entries.iter_mut().find(|x| x.key() == e.key()) {
                Some(slot) => *slot = e,
                None => self.entries.push(e),
            }
        }
    }

    /// The on-demand price per hour of `offer`'s machine type in its region, if the catalog
    /// has one (for a spot offer: what it would have cost without spot).
    pub fn on_demand_price(&self, offer: &Offer) -> Option<f64> {
        if !offer.spot {
            return Some(offer.price_usd_hour);
        }
        self.entries
            .iter()
            .find(|e| {
                !e.spot
                    && e.provider == offer.provider
                    && e.instance_type == offer.instance_type
                    && e.region == offer.region
            })
            .map(|e| e.price_usd_hour)
    }

    /// Offers of `provider` in `regions` (every region when empty).
    pub fn offers(&self, provider: &str, regions: &[String]) -> Vec<Offer> {
        self.entries
            .iter()
            .filter(|e| e.provider == provider)
            .filter(|e| regions.is_empty() || regions.contains(&e.region))
            .map(CatalogEntry::offer)
            .collect()
    }
}

/// Line and column of the `i`-th object in the `entries` array of `text` (1-based), for
/// errors found after parsing.
fn entry_position(text: &str, i: usize) -> (usize, usize) {
    let Some(start) = text.find("\"entries\"") else {
        return (1, 1);
    };
    let mut depth = 0usize;
    let mut seen = 0usize;
    let mut in_str = false;
    let mut escaped = false;
    for (off, c) in text[start..].char_indices() {
        if in_str {
            match (escaped, c) {
                (true, _) => escaped = false,
                (false, '\\') => escaped = true,
                (false, '"') => in_str = false,
                _ => {}
            }
            continue;
        }
        match c {
            '"' => in_str = true,
            '[' | '{' => {
                depth += 1;
                if c == '{' && depth == 2 {
                    if seen == i {
                        let at = start + off;
                        let line = text[..at].matches('\n').count() + 1;
                        let column = at - text[..at].rfind('\n').map(|n| n + 1).unwrap_or(0) + 1;
                        return (line, column);
                    }
                    seen += 1;
                }
            }
            ']' | '}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    (1, 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn builtin_catalog_is_valid_and_says_where_prices_come_from() {
        let c = Catalog::builtin();
        assert!(c.entries.len() > 10);
        for e in &c.entries {
            match e.provider.as_str() {
                "paperspace" => {
                    assert!(["ny2", "ca1", "ams1"].contains(&e.region.as_str()), "{e:?}")
                }
                "aws" => {
                    assert!(e.region.starts_with("us-") && e.zone.is_none(), "{e:?}");
                    assert!(!e.spot, "built-in AWS prices are on-demand: {e:?}");
                }
                other => panic!("unexpected provider {other} in the built-in catalog"),
            }
            assert!(!e.source.is_empty());
            assert!(e.updated_at.epoch() > 1_700_000_000);
        }
        // One entry per key: no built-in file repeats (or silently replaces) an entry.
        let files: Vec<Catalog> = BUILTIN
            .iter()
            .map(|(path, text)| Catalog::parse(text, Path::new(path)).unwrap())
            .collect();
        let mut keys: Vec<_> = files
            .iter()
            .flat_map(|f| f.entries.iter().map(CatalogEntry::key))
            .collect();
        let n = keys.len();
        assert_eq!(n, c.entries.len());
        keys.sort_by(|a, b| a.partial_cmp(b).unwrap());
        keys.dedup();
        assert_eq!(keys.len(), n, "duplicate entries in the built-in catalogs");
        let aws = c.offers("aws", &["us-east-1".into()]);
        assert!(aws.iter().any(|o| o.instance_type == "t2.micro"));
        assert!(aws.iter().any(|o| o.gpu_count > 0));
        let o = c.offers("paperspace", &["ny2".into()]);
        assert!(o.iter().all(|o| o.region == "ny2"));
        assert!(o.iter().any(|o| o.gpu_count > 0));
        assert!(o.iter().all(|o| o.price_source.starts_with("catalog: ")));
    }

    #[test]
    fn entry_errors_name_file_key_line_and_column() {
        let text = "{\n  \"entries\": [\n    {\"provider\": \"p\", \"instance_type\": \"t\", \"region\": \"r\",\n     \"vcpus\": 2, \"memory_gb\": \"lots\", \"price_usd_hour\": 1, \"source\": \"s\",\n     \"updated_at\": \"2026-01-01T00:00:00Z\"}\n  ]\n}";
        let err = Catalog::parse(text, Path::new("/x/catalog.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("/x/catalog.json"), "{err}");
        assert!(err.contains("entries[0].memory_gb"), "{err}");
        assert!(err.contains("line 4"), "{err}");
        assert!(err.contains("column"), "{err}");

        let bad_time = text
            .replace("\"lots\"", "4")
            .replace("2026-01-01T00:00:00Z", "last Tuesday");
        let err = Catalog::parse(&bad_time, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("entries[0].updated_at") && err.contains("RFC 3339"),
            "{err}"
        );
        assert!(err.contains("line 5"), "{err}");

        let negative = text
            .replace("\"lots\"", "4")
            .replace("\"price_usd_hour\": 1", "\"price_usd_hour\": -1");
        let err = Catalog::parse(&negative, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("entries[0].price_usd_hour"), "{err}");
        assert!(err.contains("line 3, column 5"), "{err}");

        let unknown = text
            .replace("\"lots\"", "4")
            .replace("\"vcpus\"", "\"cpus\"");
        let err = Catalog::parse(&unknown, Path::new("c.json"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown field `cpus`"), "{err}");
    }

    #[test]
    fn users_entries_replace_builtin_ones() {
        let mut c = Catalog::builtin();
        let before = c.entries.len();
        let mine = Catalog::parse(
            r#"{"entries": [
                {"provider": "paperspace", "instance_type": "A4000", "region": "ny2", "vcpus": 8,
                 "memory_gb": 45, "gpu": "A4000", "gpu_count": 1, "vram_gb": 16,
                 "price_usd_hour": 0.5, "source": "my invoice", "updated_at": "2026-10-31T00:00:00Z"},
                {"provider": "paperspace", "instance_type": "X1", "region": "ny2", "vcpus": 1,
                 "memory_gb": 1, "price_usd_hour": 0.01, "source": "test", "updated_at": "2026-10-31T00:00:00Z"}
            ]}"#,
            Path::new("mine.json"),
        )
        .unwrap();
        c.overlay(mine);
        assert_eq!(c.entries.len(), before + 1);
        let a4000: Vec<_> = c
            .entries
            .iter()
            .filter(|e| e.instance_type == "A4000" && e.region == "ny2")
            .collect();
        assert_eq!(a4000.len(), 1);
        assert_eq!(a4000[0].price_usd_hour, 0.5);
        assert_eq!(a4000[0].offer().price_source, "catalog: my invoice");
        assert_eq!(
            a4000[0].offer().priced_at,
            parse_rfc3339("2026-10-31T00:00:00Z")
        );
    }

    #[test]
    fn zones_are_part_of_the_key_and_survive_a_round_trip() {
        let text = r#"{"entries": [
            {"provider": "aws", "instance_type": "t2.micro", "region": "us-east-1", "zone": "us-east-1a",
             "vcpus": 1, "memory_gb": 1, "price_usd_hour": 0.0035, "spot": true,
             "source": "aws:DescribeSpotPriceHistory", "updated_at": "2026-11-20T10:00:00Z"},
            {"provider": "aws", "instance_type": "t2.micro", "region": "us-east-1", "zone": "us-east-1b",
             "vcpus": 1, "memory_gb": 1, "price_usd_hour": 0.0041, "spot": true,
             "source": "aws:DescribeSpotPriceHistory", "updated_at": "2026-11-20T10:00:00Z"}
        ]}"#;
        let mine = Catalog::parse(text, Path::new("mine.json")).unwrap();
        let mut c = Catalog::builtin();
        let before = c.entries.len();
        c.overlay(mine.clone());
        assert_eq!(c.entries.len(), before + 2, "two zones are two entries");
        let offers = c.offers("aws", &["us-east-1".into()]);
        let spot: Vec<_> = offers.iter().filter(|o| o.spot).collect();
        assert_eq!(spot.len(), 2);
        assert!(spot
            .iter()
            .any(|o| o.zone.as_deref() == Some("us-east-1b") && o.price_usd_hour == 0.0041));
        let again = Catalog::parse(&mine.to_json(), Path::new("again.json")).unwrap();
        assert_eq!(again.entries, mine.entries);
        // Entries without a zone are written without one (the format others read stays as is).
        let plain = Catalog::builtin().to_json();
        assert!(!plain.contains("\"zone\""));
        assert_eq!(
            Catalog::parse(&plain, Path::new("p.json"))
                .unwrap()
                .entries
                .len(),
            before
        );
    }
}
