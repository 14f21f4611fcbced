//! Spot traces: the format of SkyPilot's public collection (the data of "Can't Be Late",
//! NSDI '24): one JSON file per zone and instance type,
//! `{"metadata": {"gap_seconds": N}, "data": [..], "prices": [..]?}`, where each value is the
//! number of spot instances that could run in that tick (the collection's README; 0: none, a
//! preemption or no capacity) and `prices`, when present, the spot price in each tick. Files
//! are named `<zone>_<device>.json`; the files of one folder with the same device are the
//! zones a job can choose from (a [`TraceSet`]).
//!
//! Everything read is bounded: file size, values, tick length and count.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The largest trace file read.
pub const MAX_FILE: u64 = 64 << 20;
/// The most ticks in one trace (a year at 5 s).
pub const MAX_TICKS: usize = 6_500_000;
/// The most trace files under a folder.
pub const MAX_FILES: usize = 4096;

/// Why traces could not be read.
#[derive(Debug, thiserror::Error)]
pub enum TraceError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: {what}")]
    Bad { path: PathBuf, what: String },
    #[error("{path}: no trace files (`<zone>_<device>.json`) under it")]
    Empty { path: PathBuf },
}

/// One zone's trace.
#[derive(Clone, Debug, PartialEq)]
pub struct Zone {
    /// `us-east-1a`.
    pub name: String,
    /// `us-east-1`.
    pub region: String,
    /// Spot instances that could run, per tick.
    pub available: Vec<u32>,
    /// The spot price per tick, when the trace has one.
    pub prices: Option<Vec<f64>>,
}

/// The zones a job chooses among: one instance type, one cloud, one collection period.
#[derive(Clone, Debug, PartialEq)]
pub struct TraceSet {
    /// `aws-04-22-2023/v100_1`: the folder and the device.
    pub name: String,
    /// `aws` or `gcp`.
    pub cloud: String,
    pub device: String,
    pub instance_type: String,
    /// On-demand $/h (the same in every zone of the set).
    pub on_demand: f64,
    /// Spot $/h where a zone's trace has no prices.
    pub spot: f64,
    /// Seconds per tick.
    pub gap: f64,
    pub zones: Vec<Zone>,
}

impl TraceSet {
    /// Ticks in the shortest zone's trace.
    pub fn ticks(&self) -> usize {
        self.zones
            .iter()
            .map(|z| z.available.len())
            .min()
            .unwrap_or(0)
    }

    /// Hours the set covers.
    pub fn hours(&self) -> f64 {
        self.ticks() as f64 * self.gap / 3600.0
    }
}

/// The devices of the collection: instance type, on-demand $/h and usual spot $/h (AWS
/// us-east-1 list prices; the spot prices are the collection's own where it has them, else
/// those of the paper's Table 4).
pub fn device(cloud: &str, device: &str) -> Option<(&'static str, f64, f64)> {
    Some(match (cloud, device) {
        ("aws", "v100_1") => ("p3.2xlarge", 3.06, 0.918),
        ("aws", "v100_8") => ("p3.16xlarge", 24.48, 7.344),
        ("aws", "k80_1") => ("p2.xlarge", 0.90, 0.27),
        ("aws", "k80_8") => ("p2.8xlarge", 7.20, 2.16),
        ("aws", "intel_64") => ("r5.16xlarge", 4.032, 1.85),
        ("gcp", "c3-88") => ("c3-highcpu-88", 3.79, 0.35),
        _ => return None,
    })
}

/// Prices to use where [`device`] knows none (or to override it).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceOverride {
    pub on_demand: Option<f64>,
    pub spot: Option<f64>,
}

/// The most rows of a price file.
pub const MAX_PRICE_ROWS: usize = 1_000_000;

/// Prices over time from a file (`--prices`): CSV rows `seconds,place,market,usd_per_hour`,
/// where `seconds` counts from the traces' first tick, `place` is a zone (spot) or a region
/// (on-demand; a zone names its region), and `market` is `spot` or `on-demand`; a header
/// row and `#` comments are allowed. Each price holds from its time until the next one for
/// the same place and market; before the first, the trace's own price (or the set's).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct PriceSeries {
    points: BTreeMap<(String, bool), Vec<(f64, f64)>>,
}

impl PriceSeries {
    pub fn load(path: &Path) -> Result<Self, TraceError> {
        let io = |source| TraceError::Io {
            path: path.to_path_buf(),
            source,
        };
        let len = std::fs::metadata(path).map_err(io)?.len();
        if len > MAX_FILE {
            return Err(bad(
                path,
                &format!("{len} bytes; a price file may hold at most {MAX_FILE}"),
            ));
        }
        let text = std::fs::read_to_string(path).map_err(io)?;
        Self::parse(&text).map_err(|(line, what)| bad(path, &format!("line {line}: {what}")))
    }

    /// The rows of `text`; an error is (line, what is wrong).
    pub fn parse(text: &str) -> Result<Self, (usize, String)> {
        let mut points: BTreeMap<(String, bool), Vec<(f64, f64)>> = BTreeMap::new();
        let mut rows = 0;
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') || (i == 0 && line.starts_with("seconds")) {
                continue;
            }
            rows += 1;
            if rows > MAX_PRICE_ROWS {
                return Err((n, format!("more than {MAX_PRICE_ROWS} rows")));
            }
            let f: Vec<&str> = line.split(',').map(str::trim).collect();
            let [secs, place, market, price] = f[..] else {
                return Err((
                    n,
                    format!(
                        "{} fields; a row is `seconds,place,market,usd_per_hour`",
                        f.len()
                    ),
                ));
            };
            let secs: f64 = secs
                .parse()
                .ok()
                .filter(|s: &f64| s.is_finite() && *s >= 0.0)
                .ok_or((n, format!("`{secs}` is not a time in seconds (0 or more)")))?;
            let spot = match market {
                "spot" => true,
                "on-demand" | "ondemand" => false,
                _ => return Err((n, format!("market `{market}`: write spot or on-demand"))),
            };
            let price: f64 = price
                .parse()
                .ok()
                .filter(|p: &f64| p.is_finite() && (0.0..=1e4).contains(p))
                .ok_or((n, format!("`{price}` is not a price in $/h (0 to 10000)")))?;
            if place.is_empty() || place.len() > 64 {
                return Err((n, "the place is empty or longer than 64 characters".into()));
            }
            let place = if spot {
                place.to_string()
            } else {
                region_of(place)
            };
            points.entry((place, spot)).or_default().push((secs, price));
        }
        for p in points.values_mut() {
            p.sort_by(|a, b| a.0.total_cmp(&b.0));
        }
        Ok(PriceSeries { points })
    }

    /// The price of `place`'s `spot` or on-demand market at `secs`, if the file has one yet.
    pub fn at(&self, place: &str, spot: bool, secs: f64) -> Option<f64> {
        let p = self.points.get(&(place.to_string(), spot))?;
        let i = p.partition_point(|(t, _)| *t <= secs);
        (i > 0).then(|| p[i - 1].1)
    }
}

/// Every trace set under `paths` (files, or folders searched to any depth), sorted by name.
pub fn load(paths: &[PathBuf], prices: &PriceOverride) -> Result<Vec<TraceSet>, TraceError> {
    let mut files = Vec::new();
    for p in paths {
        let meta = std::fs::metadata(p).map_err(|source| TraceError::Io {
            path: p.clone(),
            source,
        })?;
        if meta.is_dir() {
            let before = files.len();
            walk(p, &mut files, 0)?;
            if files.len() == before {
                return Err(TraceError::Empty { path: p.clone() });
            }
        } else {
            files.push(p.clone());
        }
    }
    let mut sets: BTreeMap<(PathBuf, String), Vec<(PathBuf, String)>> = BTreeMap::new();
    for f in files {
        let stem = f
            .file_stem()
            .and_then(|s| s.to_str())
            .ok_or_else(|| bad(&f, "the file name is not UTF-8"))?;
        let (zone, device) = stem.split_once('_').ok_or_else(|| {
            bad(
                &f,
                "the name is not `<zone>_<device>.json` (for example us-east-1a_v100_1.json)",
            )
        })?;
        let folder = f.parent().map(Path::to_path_buf).unwrap_or_default();
        sets.entry((folder, device.to_string()))
            .or_default()
            .push((f.clone(), zone.to_string()));
    }
    let mut out = Vec::new();
    for ((folder, device), zones) in sets {
        out.push(read_set(&folder, &device, zones, prices)?);
    }
    Ok(out)
}

fn walk(dir: &Path, out: &mut Vec<PathBuf>, depth: usize) -> Result<(), TraceError> {
    if depth > 8 {
        return Err(bad(dir, "folders nested more than 8 deep"));
    }
    let io = |source| TraceError::Io {
        path: dir.to_path_buf(),
        source,
    };
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .map_err(io)?
        .collect::<Result<Vec<_>, _>>()
        .map_err(io)?;
    entries.sort_by_key(|e| e.file_name());
    for e in entries {
        let p = e.path();
        let kind = e.file_type().map_err(io)?;
        if kind.is_dir() {
            walk(&p, out, depth + 1)?;
        } else if kind.is_file() && p.extension().is_some_and(|x| x == "json") {
            if out.len() >= MAX_FILES {
                return Err(bad(dir, &format!("more than {MAX_FILES} trace files")));
            }
            out.push(p);
        }
    }
    Ok(())
}

fn bad(path: &Path, what: &str) -> TraceError {
    TraceError::Bad {
        path: path.to_path_buf(),
        what: what.to_string(),
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    metadata: Metadata,
    data: Vec<u32>,
    #[serde(default)]
    prices: Option<Vec<f64>>,
}

#[derive(serde::Deserialize)]
struct Metadata {
    gap_seconds: f64,
}

fn read_set(
    folder: &Path,
    device_name: &str,
    files: Vec<(PathBuf, String)>,
    prices: &PriceOverride,
) -> Result<TraceSet, TraceError> {
    let folder_name = folder
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let cloud = if folder_name.starts_with("gcp") {
        "gcp"
    } else if folder_name.starts_with("aws") {
        "aws"
    } else if files
        .iter()
        .any(|(_, z)| z.contains("central") || z.matches('-').count() > 2)
    {
        "gcp"
    } else {
        "aws"
    };
    let known = device(cloud, device_name);
    let (instance_type, on_demand, spot) = match (known, prices.on_demand, prices.spot) {
        (_, Some(od), Some(s)) => (
            known.map(|k| k.0).unwrap_or(device_name).to_string(),
            od,
            s,
        ),
        (Some((t, od, s)), o, sp) => (t.to_string(), o.unwrap_or(od), sp.unwrap_or(s)),
        (None, _, _) => {
            return Err(bad(
                &files[0].0,
                &format!(
                    "no prices known for {cloud} device `{device_name}`: give --on-demand-price and --spot-price"
                ),
            ))
        }
    };
    let mut gap = None;
    let mut zones = Vec::new();
    for (path, zone) in files {
        let (g, z) = read_zone(&path, &zone)?;
        match gap {
            None => gap = Some(g),
            Some(x) if (x - g).abs() > 1e-9 => {
                return Err(bad(
                    &path,
                    &format!("gap_seconds is {g}, the other zones of its folder have {x}"),
                ))
            }
            _ => {}
        }
        zones.push(z);
    }
    Ok(TraceSet {
        name: format!("{folder_name}/{device_name}"),
        cloud: cloud.to_string(),
        device: device_name.to_string(),
        instance_type,
        on_demand,
        spot,
        gap: gap.unwrap_or(60.0),
        zones,
    })
}

fn read_zone(path: &Path, zone: &str) -> Result<(f64, Zone), TraceError> {
    let io = |source| TraceError::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > MAX_FILE {
        return Err(bad(
            path,
            &format!("{len} bytes; a trace file may hold at most {MAX_FILE}"),
        ));
    }
    let text = std::fs::read(path).map_err(io)?;
    let raw: Raw = serde_json::from_slice(&text).map_err(|e| {
        bad(
            path,
            &format!(
                "not a spot trace (`{{\"metadata\": {{\"gap_seconds\": N}}, \"data\": [counts]}}`): {e}"
            ),
        )
    })?;
    let gap = raw.metadata.gap_seconds;
    if !(1.0..=86_400.0).contains(&gap) {
        return Err(bad(
            path,
            &format!("gap_seconds is {gap}; it must be between 1 and 86400"),
        ));
    }
    if raw.data.is_empty() || raw.data.len() > MAX_TICKS {
        return Err(bad(
            path,
            &format!(
                "{} ticks; a trace holds between 1 and {MAX_TICKS}",
                raw.data.len()
            ),
        ));
    }
    if let Some(p) = &raw.prices {
        if p.len() != raw.data.len() {
            return Err(bad(
                path,
                &format!("{} prices for {} ticks", p.len(), raw.data.len()),
            ));
        }
        if let Some(i) = p
            .iter()
            .position(|x| !x.is_finite() || *x < 0.0 || *x > 1e4)
        {
            return Err(bad(path, &format!("price {i} is {}", p[i])));
        }
    }
    Ok((
        gap,
        Zone {
            name: zone.to_string(),
            region: region_of(zone),
            available: raw.data,
            prices: raw.prices,
        },
    ))
}

/// The region of a zone: `us-east-1a` → `us-east-1`, `us-central1-a` → `us-central1`.
pub fn region_of(zone: &str) -> String {
    if let Some((r, z)) = zone.rsplit_once('-') {
        if z.len() == 1 && z.chars().all(|c| c.is_ascii_lowercase()) {
            return r.to_string();
        }
    }
    match zone.char_indices().last() {
        Some((i, c))
            if c.is_ascii_lowercase() && zone[..i].ends_with(|d: char| d.is_ascii_digit()) =>
        {
            zone[..i].to_string()
        }
        _ => zone.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn regions_of_aws_and_gcp_zones() {
        assert_eq!(region_of("us-east-1a"), "us-east-1");
        assert_eq!(region_of("us-west-2c"), "us-west-2");
        assert_eq!(region_of("us-central1-a"), "us-central1");
        assert_eq!(region_of("local"), "local");
    }

    fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
        let p = dir.join(name);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, text).unwrap();
        p
    }

    #[test]
    fn price_files_are_step_functions_per_place_and_market() {
        let p = PriceSeries::parse(
            "seconds,place,market,usd_per_hour\n# a comment\n0,us-east-1a,spot,1.0\n3600,us-east-1a,spot,2.5\n0,us-east-1b,on-demand,3\n",
        )
        .unwrap();
        assert_eq!(p.at("us-east-1a", true, 0.0), Some(1.0));
        assert_eq!(p.at("us-east-1a", true, 3599.0), Some(1.0));
        assert_eq!(p.at("us-east-1a", true, 3600.0), Some(2.5));
        assert_eq!(p.at("us-east-1a", false, 10.0), None);
        // On-demand rows name a region (a zone stands for its region).
        assert_eq!(p.at("us-east-1", false, 10.0), Some(3.0));
        assert_eq!(p.at("us-east-1b", true, 10.0), None);
        for (text, want) in [
            ("1,a,spot", "3 fields"),
            ("x,a,spot,1", "not a time"),
            ("-5,a,spot,1", "not a time"),
            ("1,a,reserved,1", "market `reserved`"),
            ("1,a,spot,NaN", "not a price"),
            ("1,a,spot,1e9", "not a price"),
        ] {
            let (line, e) = PriceSeries::parse(text).unwrap_err();
            assert!(line == 1 && e.contains(want), "{text}: {e}");
        }
    }

    #[test]
    fn sets_group_a_folders_zones_by_device() {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("aws-01-01-2024");
        write(
            &f,
            "us-east-1a_v100_1.json",
            r#"{"metadata":{"gap_seconds":60},"data":[1,0,1]}"#,
        );
        write(
            &f,
            "us-east-1b_v100_1.json",
            r#"{"metadata":{"gap_seconds":60},"data":[1,1,1,1],"prices":[1,1,1,2]}"#,
        );
        write(
            &f,
            "us-east-1a_k80_1.json",
            r#"{"metadata":{"gap_seconds":60},"data":[1]}"#,
        );
        let sets = load(&[d.path().to_path_buf()], &PriceOverride::default()).unwrap();
        let names: Vec<_> = sets.iter().map(|s| s.name.as_str()).collect();
        assert_eq!(names, ["aws-01-01-2024/k80_1", "aws-01-01-2024/v100_1"]);
        let v = &sets[1];
        assert_eq!(v.instance_type, "p3.2xlarge");
        assert_eq!(
            (v.on_demand, v.spot, v.gap, v.ticks()),
            (3.06, 0.918, 60.0, 3)
        );
        assert_eq!(
            v.zones[1].prices.as_deref(),
            Some(&[1.0, 1.0, 1.0, 2.0][..])
        );
    }

    #[test]
    fn bad_traces_name_the_file_and_what_is_wrong() {
        let d = tempfile::tempdir().unwrap();
        let cases = [
            (
                "x_v100_1.json",
                r#"{"metadata":{"gap_seconds":0},"data":[1]}"#,
                "gap_seconds is 0",
            ),
            (
                "x_v100_1.json",
                r#"{"metadata":{"gap_seconds":60},"data":[]}"#,
                "0 ticks",
            ),
            (
                "x_v100_1.json",
                r#"{"metadata":{"gap_seconds":60},"data":[-1]}"#,
                "not a spot trace",
            ),
            (
                "x_v100_1.json",
                r#"{"metadata":{"gap_seconds":60},"data":[1],"prices":[1,2]}"#,
                "2 prices for 1 ticks",
            ),
            (
                "x_v100_1.json",
                r#"{"metadata":{"gap_seconds":60},"data":[1],"prices":[-3]}"#,
                "price 0 is -3",
            ),
            (
                "novalue.json",
                r#"{"metadata":{"gap_seconds":60},"data":[1]}"#,
                "<zone>_<device>",
            ),
            (
                "x_tpu_9.json",
                r#"{"metadata":{"gap_seconds":60},"data":[1]}"#,
                "--on-demand-price",
            ),
        ];
        for (name, text, want) in cases {
            let p = write(d.path(), name, text);
            let e = load(std::slice::from_ref(&p), &PriceOverride::default())
                .unwrap_err()
                .to_string();
            assert!(e.contains(want) && e.contains(name), "{name}: {e}");
            std::fs::remove_file(p).unwrap();
        }
        let e = load(&[d.path().to_path_buf()], &PriceOverride::default()).unwrap_err();
        assert!(e.to_string().contains("no trace files"), "{e}");
        // Prices given for an unknown device.
        let p = write(
            d.path(),
            "x_tpu_9.json",
            r#"{"metadata":{"gap_seconds":60},"data":[1]}"#,
        );
        let sets = load(
            &[p],
            &PriceOverride {
                on_demand: Some(2.0),
                spot: Some(0.5),
            },
        )
        .unwrap();
        assert_eq!((sets[0].on_demand, sets[0].spot), (2.0, 0.5));
    }
}
