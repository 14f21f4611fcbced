//! What EC2 says about machines and their spot prices: instance types from
//! `DescribeInstanceTypes` (size, GPUs, architectures, markets) and the current spot price per
//! type and availability zone from `DescribeSpotPriceHistory` (the newest entry per zone).

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use aws_sdk_ec2::primitives::DateTime;
use aws_sdk_ec2::types::{InstanceType, InstanceTypeInfo, RiProductDescription, SpotPrice};
use aws_sdk_ec2::Client;

use super::api::{region_of, sdk_error, AwsError};
use crate::providers::common::Offer;

/// Types per `DescribeSpotPriceHistory` request.
const TYPES_PER_REQUEST: usize = 100;
/// Pages of a list followed at most.
const MAX_PAGES: usize = 1000;

/// Where spot prices come from, as offers say.
pub const SPOT_SOURCE: &str = "aws:DescribeSpotPriceHistory";

/// An instance type: its size and what it can run.
#[derive(Clone, Debug, PartialEq)]
pub struct TypeInfo {
    pub name: String,
    pub vcpus: f64,
    pub memory_gb: f64,
    /// `NVIDIA T4`: manufacturer and name of its GPUs.
    pub gpu: Option<String>,
    pub gpu_count: u32,
    pub vram_gb: f64,
    /// `x86_64`, `arm64`, `i386`, `x86_64_mac`, `arm64_mac`.
    pub architectures: Vec<String>,
    /// Offered on the spot market.
    pub spot: bool,
    /// Offered on demand.
    pub on_demand: bool,
}

impl TypeInfo {
    /// From DescribeInstanceTypes' answer; `None` without a name or size.
    pub fn from_sdk(t: &InstanceTypeInfo) -> Option<TypeInfo> {
        let name = t.instance_type()?.as_str().to_string();
        let vcpus = f64::from(t.v_cpu_info()?.default_v_cpus()?);
        let memory_gb = t.memory_info()?.size_in_mib()? as f64 / 1024.0;
        let gpus = t.gpu_info().map(|g| g.gpus()).unwrap_or_default();
        let gpu = gpus.first().map(|g| {
            [g.manufacturer(), g.name()]
                .into_iter()
                .flatten()
                .collect::<Vec<_>>()
                .join(" ")
        });
        let gpu_count = gpus
            .iter()
            .map(|g| g.count().unwrap_or(0).max(0) as u32)
            .sum();
        let vram_mib = t
            .gpu_info()
            .and_then(|g| g.total_gpu_memory_in_mib())
            .map(i64::from)
            .unwrap_or_else(|| {
                gpus.iter()
                    .map(|g| {
                        i64::from(g.count().unwrap_or(0))
                            * i64::from(g.memory_info().and_then(|m| m.size_in_mib()).unwrap_or(0))
                    })
                    .sum()
            });
        let classes: Vec<&str> = t
            .supported_usage_classes()
            .iter()
            .map(|c| c.as_str())
            .collect();
        Some(TypeInfo {
            name,
            vcpus,
            memory_gb,
            gpu: gpu.filter(|g| !g.is_empty()),
            gpu_count,
            vram_gb: vram_mib as f64 / 1024.0,
            architectures: t
                .processor_info()
                .map(|p| {
                    p.supported_architectures()
                        .iter()
                        .map(|a| a.as_str().to_string())
                        .collect()
                })
                .unwrap_or_default(),
            spot: classes.contains(&"spot"),
            on_demand: classes.contains(&"on-demand"),
        })
    }

    /// The family: `t2` of `t2.micro`.
    pub fn family(&self) -> &str {
        self.name.split('.').next().unwrap_or(&self.name)
    }

    /// Whether it runs `arch` images.
    pub fn runs(&self, arch: &str) -> bool {
        self.architectures.iter().any(|a| a == arch)
    }

    /// An offer of this type.
    pub fn offer(
        &self,
        region: &str,
        zone: Option<&str>,
        price: f64,
        spot: bool,
        source: String,
        at: Option<u64>,
    ) -> Offer {
        Offer {
            provider: "aws".into(),
            instance_type: self.name.clone(),
            vcpus: self.vcpus,
            memory_gb: self.memory_gb,
            gpu: self.gpu.clone(),
            gpu_count: self.gpu_count,
            vram_gb: self.vram_gb,
            region: region.into(),
            zone: zone.map(str::to_string),
            price_usd_hour: price,
            spot,
            price_source: source,
            priced_at: at,
        }
    }
}

/// Whether `instance_type` is in `families` (`t2` takes every `t2.*`; an entry with a dot is
/// one type); every type when `families` is empty.
pub fn family_matches(families: &[String], instance_type: &str) -> bool {
    if families.is_empty() {
        return true;
    }
    let family = instance_type.split('.').next().unwrap_or(instance_type);
    families.iter().any(|f| {
        let f = f.trim();
        if f.contains('.') {
            f.eq_ignore_ascii_case(instance_type)
        } else {
            f.eq_ignore_ascii_case(family)
        }
    })
}

/// The current spot price of a type in a zone.
#[derive(Clone, Debug, PartialEq)]
pub struct SpotQuote {
    pub instance_type: String,
    pub zone: String,
    /// $/hour.
    pub price: f64,
    /// When the price was set (seconds since the epoch).
    pub at: u64,
}

/// Whether a product description is Linux (the only one workers run).
fn linux(p: Option<&RiProductDescription>) -> bool {
    matches!(
        p.map(|p| p.as_str()),
        Some("Linux/UNIX") | Some("Linux/UNIX (Amazon VPC)")
    )
}

/// The newest Linux price of each type in each zone of `history` (entries without a zone,
/// type, price or time are left out; of two entries as new, the cheaper). Sorted by type and
/// zone.
pub fn newest_per_zone(history: &[SpotPrice]) -> Vec<SpotQuote> {
    let mut best: BTreeMap<(String, String), SpotQuote> = BTreeMap::new();
    for p in history {
        if !linux(p.product_description()) {
            continue;
        }
        let (Some(t), Some(zone), Some(price), Some(at)) = (
            p.instance_type(),
            p.availability_zone(),
            p.spot_price().and_then(|s| s.trim().parse::<f64>().ok()),
            p.timestamp(),
        ) else {
            continue;
        };
        if !(price.is_finite() && price >= 0.0) {
            continue;
        }
        let q = SpotQuote {
            instance_type: t.as_str().to_string(),
            zone: zone.to_string(),
            price,
            at: u64::try_from(at.secs()).unwrap_or(0),
        };
        let key = (q.instance_type.clone(), q.zone.clone());
        match best.get(&key) {
            Some(old) if old.at > q.at || (old.at == q.at && old.price <= q.price) => {}
            _ => {
                best.insert(key, q);
            }
        }
    }
    best.into_values().collect()
}

/// Every instance type the region offers (`DescribeInstanceTypes`, all pages).
pub async fn instance_types(client: &Client) -> Result<Vec<TypeInfo>, AwsError> {
    const CALL: &str = "DescribeInstanceTypes";
    let region = region_of(client);
    let mut pages = client
        .describe_instance_types()
        .max_results(100)
        .into_paginator()
        .send();
    let mut out = Vec::new();
    let mut n = 0;
    while let Some(page) = pages.next().await {
        let page = page.map_err(|e| sdk_error(CALL, &region, e))?;
        out.extend(page.instance_types().iter().filter_map(TypeInfo::from_sdk));
        n += 1;
        if n > MAX_PAGES {
            return Err(AwsError::Unexpected {
                call: CALL,
                region,
                message: format!("more than {MAX_PAGES} pages"),
            });
        }
    }
    tracing::debug!(%region, types = out.len(), "EC2 instance types");
    Ok(out)
}

/// The current Linux spot price of each of `types` in each zone of the client's region: the
/// newest entry per zone of `DescribeSpotPriceHistory` since `window` ago (EC2 also answers with
/// the price in force at the start of the window, so a price set earlier is found too).
pub async fn spot_quotes(
    client: &Client,
    types: &[String],
    window: Duration,
) -> Result<Vec<SpotQuote>, AwsError> {
    const CALL: &str = "DescribeSpotPriceHistory";
    let region = region_of(client);
    let since = SystemTime::now()
        .checked_sub(window)
        .unwrap_or(UNIX_EPOCH)
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let mut history = Vec::new();
    for chunk in types.chunks(TYPES_PER_REQUEST) {
        let mut b = client
            .describe_spot_price_history()
            .start_time(DateTime::from_secs(since as i64))
            .product_descriptions("Linux/UNIX")
            .product_descriptions("Linux/UNIX (Amazon VPC)")
            .max_results(1000);
        for t in chunk {
            b = b.instance_types(InstanceType::from(t.as_str()));
        }
        let mut pages = b.into_paginator().send();
        let mut n = 0;
        while let Some(page) = pages.next().await {
            let page = page.map_err(|e| sdk_error(CALL, &region, e))?;
            history.extend(page.spot_price_history().iter().cloned());
            n += 1;
            if n > MAX_PAGES {
                return Err(AwsError::Unexpected {
                    call: CALL,
                    region,
                    message: format!("more than {MAX_PAGES} pages"),
                });
            }
        }
    }
    let quotes = newest_per_zone(&history);
    tracing::debug!(%region, entries = history.len(), quotes = quotes.len(), "EC2 spot prices");
    Ok(quotes)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(t: &str, zone: &str, p: &str, at: i64, product: &str) -> SpotPrice {
        SpotPrice::builder()
            .instance_type(InstanceType::from(t))
            .availability_zone(zone)
            .spot_price(p)
            .timestamp(DateTime::from_secs(at))
            .product_description(RiProductDescription::from(product))
            .build()
    }

    #[test]
    fn the_newest_price_of_each_zone_wins() {
        let h = vec![
            price("t2.micro", "us-east-1a", "0.0040", 1000, "Linux/UNIX"),
            price("t2.micro", "us-east-1a", "0.0035", 3000, "Linux/UNIX"),
            price("t2.micro", "us-east-1a", "0.0050", 2000, "Linux/UNIX"),
            price(
                "t2.micro",
                "us-east-1b",
                "0.0060",
                500,
                "Linux/UNIX (Amazon VPC)",
            ),
            // Not Linux: left out however new or cheap.
            price("t2.micro", "us-east-1b", "0.0001", 9000, "Windows"),
            price("t2.micro", "us-east-1c", "0.0100", 4000, "SUSE Linux"),
            // Same time, two products: the cheaper.
            price("m5.large", "us-east-1a", "0.0400", 7000, "Linux/UNIX"),
            price(
                "m5.large",
                "us-east-1a",
                "0.0380",
                7000,
                "Linux/UNIX (Amazon VPC)",
            ),
            // Unreadable price: left out.
            price("m5.large", "us-east-1b", "n/a", 7000, "Linux/UNIX"),
        ];
        let q = newest_per_zone(&h);
        let got: Vec<(&str, &str, f64, u64)> = q
            .iter()
            .map(|q| (q.instance_type.as_str(), q.zone.as_str(), q.price, q.at))
            .collect();
        assert_eq!(
            got,
            [
                ("m5.large", "us-east-1a", 0.038, 7000),
                ("t2.micro", "us-east-1a", 0.0035, 3000),
                ("t2.micro", "us-east-1b", 0.006, 500),
            ]
        );
        // The order of the history does not matter.
        let mut rev = h.clone();
        rev.reverse();
        assert_eq!(newest_per_zone(&rev), q);
    }

    #[test]
    fn families_select_types() {
        let fams = |f: &[&str]| f.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert!(family_matches(&[], "p3.2xlarge"));
        assert!(family_matches(&fams(&["t2"]), "t2.micro"));
        assert!(!family_matches(&fams(&["t2"]), "t2a.micro"));
        assert!(!family_matches(&fams(&["t2"]), "t3.micro"));
        assert!(family_matches(&fams(&["t3", "M5"]), "m5.large"));
        assert!(family_matches(&fams(&["c5.xlarge"]), "c5.xlarge"));
        assert!(!family_matches(&fams(&["c5.xlarge"]), "c5.large"));
    }

    #[test]
    fn types_read_gpus_and_markets() {
        use aws_sdk_ec2::types::{
            ArchitectureType, GpuDeviceInfo, GpuDeviceMemoryInfo, GpuInfo, MemoryInfo,
            ProcessorInfo, UsageClassType, VCpuInfo,
        };
        let t = InstanceTypeInfo::builder()
            .instance_type(InstanceType::from("g4dn.12xlarge"))
            .v_cpu_info(VCpuInfo::builder().default_v_cpus(48).build())
            .memory_info(MemoryInfo::builder().size_in_mib(196_608).build())
            .gpu_info(
                GpuInfo::builder()
                    .gpus(
                        GpuDeviceInfo::builder()
                            .name("T4")
                            .manufacturer("NVIDIA")
                            .count(4)
                            .memory_info(GpuDeviceMemoryInfo::builder().size_in_mib(16_384).build())
                            .build(),
                    )
                    .total_gpu_memory_in_mib(65_536)
                    .build(),
            )
            .processor_info(
                ProcessorInfo::builder()
                    .supported_architectures(ArchitectureType::X8664)
                    .build(),
            )
            .supported_usage_classes(UsageClassType::OnDemand)
            .build();
        let i = TypeInfo::from_sdk(&t).unwrap();
        assert_eq!(i.family(), "g4dn");
        assert_eq!((i.vcpus, i.memory_gb), (48.0, 192.0));
        assert_eq!(i.gpu.as_deref(), Some("NVIDIA T4"));
        assert_eq!((i.gpu_count, i.vram_gb), (4, 64.0));
        assert!(i.runs("x86_64") && !i.runs("arm64"));
        assert!(i.on_demand && !i.spot);
    }
}
