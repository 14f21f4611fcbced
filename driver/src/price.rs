//! `cedana-driver price`: the offers of every enabled provider for a machine spec, cheapest
//! first, with where each price came from and how old it is.

use std::time::{SystemTime, UNIX_EPOCH};

use serde::Serialize;

use crate::job::Spec;
use crate::providers::{self, Offer, Provider};

/// Errors of a `--gpu` value.
#[derive(Debug, thiserror::Error)]
#[error("--gpu {given:?}: {why}; give a GPU name and optionally a count, e.g. A100 or A100:2")]
pub struct GpuArgError {
    given: String,
    why: &'static str,
}

/// Reads `NAME[:COUNT]`.
pub fn parse_gpu(s: &str) -> Result<(String, Option<u32>), GpuArgError> {
    let err = |why| GpuArgError {
        given: s.to_string(),
        why,
    };
    let (name, count) = match s.rsplit_once(':') {
        Some((n, c)) => {
            let c: u32 = c
                .trim()
                .parse()
                .map_err(|_| err("the count is not a whole number"))?;
            if c == 0 {
                return Err(err("the count must be at least 1"));
            }
            (n.trim(), Some(c))
        }
        None => (s.trim(), None),
    };
    if name.is_empty() {
        return Err(err("the name is empty"));
    }
    Ok((name.to_string(), count))
}

/// One row of `price`'s answer.
#[derive(Clone, Debug, Serialize)]
pub struct PricedOffer {
    #[serde(flatten)]
    pub offer: Offer,
    /// Seconds since the price was observed, when that is known.
    pub age_seconds: Option<u64>,
}

/// What `price` found.
#[derive(Debug, Serialize)]
pub struct Prices {
    pub spec: Spec,
    /// Fitting offers, cheapest first.
    pub offers: Vec<PricedOffer>,
    /// Why other offers were left out.
    pub left_out: Vec<String>,
    /// Providers that could not be asked, and why (no credentials, unreachable).
    pub unusable: Vec<String>,
}

/// Fitting offers of `providers` for `spec`, cheapest first (on the caller's runtime).
pub async fn prices(providers: &[Provider], spec: &Spec) -> Prices {
    let providers::Ranking {
        offers: fit,
        left_out: why,
        unusable,
    } = providers::ranking(providers, spec).await;
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    Prices {
        spec: spec.clone(),
        offers: fit
            .into_iter()
            .map(|o| PricedOffer {
                age_seconds: o.priced_at.map(|t| now.saturating_sub(t)),
                offer: o,
            })
            .collect(),
        left_out: why,
        unusable,
    }
}

/// Errors of `price --refresh`.
#[derive(Debug, thiserror::Error)]
pub enum RefreshError {
    #[error("--refresh: {0}")]
    Provider(#[from] providers::ProviderError),
    #[error("--refresh: {0}")]
    Catalog(#[from] providers::catalog::CatalogError),
    #[error("--refresh: cannot write the catalog {path}: {source}")]
    Write {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("--refresh: no enabled provider has a price API (AWS has one; add \"aws\" to enabled_providers)")]
    Nothing,
    #[error("--refresh: no catalog path (set HOME or CEDANA_CATALOG)")]
    NoPath,
}

/// Fetches the prices of the enabled providers that publish them (AWS spot prices, per type
/// and zone) into the user's catalog file (`$CEDANA_CATALOG`, `~/.cedana/catalog.json`):
/// entries for the same provider, type, region, zone and market are replaced, the others are
/// kept. The file is written whole, then renamed into place ([`crate::util::write_atomic`],
/// mode 0644 as before: prices are no secret). The path and how many entries were written.
pub async fn refresh(
    config: &cedana_protocol::Config,
) -> Result<(std::path::PathBuf, usize), RefreshError> {
    let uses = |n: &str| {
        config
            .enabled_providers
            .iter()
            .any(|p| p.eq_ignore_ascii_case(n))
    };
    #[allow(unused_mut)]
    let mut fresh: Vec<providers::catalog::CatalogEntry> = Vec::new();
    #[allow(unused_mut)]
    let mut any = false;
    #[cfg(feature = "aws")]
    if uses("aws") {
        // The catalog file may not exist yet: it is what this writes.
        let settings =
            providers::aws::Settings::from_config(&config.aws.clone().unwrap_or_default())?;
        let p = providers::aws::AwsProvider::new(settings, providers::catalog::Catalog::builtin())?;
        fresh.extend(p.refresh_catalog().await?);
        any = true;
    }
    let _ = uses;
    if !any {
        return Err(RefreshError::Nothing);
    }
    let path = providers::catalog::Catalog::default_path().ok_or(RefreshError::NoPath)?;
    let mut catalog = if path.exists() {
        providers::catalog::Catalog::from_file(&path)?
    } else {
        providers::catalog::Catalog::default()
    };
    let n = fresh.len();
    catalog.overlay(providers::catalog::Catalog { entries: fresh });
    let write_err = |source| RefreshError::Write {
        path: path.clone(),
        source,
    };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(write_err)?;
    }
    crate::util::write_atomic(&path, catalog.to_json().as_bytes(), 0o644).map_err(write_err)?;
    Ok((path, n))
}

/// A price's age as people say it.
pub fn age(secs: Option<u64>) -> String {
    match secs {
        None => "-".into(),
        Some(s) if s < 120 => format!("{s}s"),
        Some(s) if s < 2 * 3600 => format!("{}m", s / 60),
        Some(s) if s < 2 * 86400 => format!("{}h", s / 3600),
        Some(s) => format!("{}d", s / 86400),
    }
}

/// The table `price` prints.
pub fn table(p: &Prices) -> String {
    let mut out = format!(
        "{:<11} {:<16} {:>5} {:>7} {:<14} {:<16} {:>9} {:<9} {:>5}  PRICE FROM\n",
        "PROVIDER", "TYPE", "VCPU", "MEM GB", "GPU", "REGION/ZONE", "$/HOUR", "MARKET", "AGE"
    );
    for po in &p.offers {
        let o = &po.offer;
        let gpu = match &o.gpu {
            Some(g) if o.gpu_count > 1 => format!("{}x {g}", o.gpu_count),
            Some(g) => g.clone(),
            None => "-".into(),
        };
        let place = match &o.zone {
            Some(z) => z.clone(),
            None => o.region.clone(),
        };
        out.push_str(&format!(
            "{:<11} {:<16} {:>5} {:>7} {:<14} {:<16} {:>9.4} {:<9} {:>5}  {}\n",
            o.provider,
            o.instance_type,
            o.vcpus,
            o.memory_gb,
            gpu,
            place,
            o.price_usd_hour,
            if o.spot { "spot" } else { "on-demand" },
            age(po.age_seconds),
            o.price_source
        ));
    }
    out
}
