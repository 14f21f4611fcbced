//! `cedana-driver price`: the offers that fit a spec, cheapest first.

use super::exit::Exit;

/// `price`'s arguments, as the command line gave them.
pub struct Price {
    pub cpu: Option<f64>,
    pub memory: Option<f64>,
    pub gpu: Option<String>,
    pub vram: Option<f64>,
    pub max_price: Option<f64>,
    pub limit: Option<usize>,
    pub json: bool,
    pub refresh: bool,
}

/// Refreshes the catalog if asked, then prints the offers that fit.
pub fn run(args: Price, config: &cedana_driver::Config) -> Exit {
    let rt = match super::runtime() {
        Ok(rt) => rt,
        Err(e) => {
            super::error(e);
            return Exit::Failed;
        }
    };
    if args.refresh {
        match rt.block_on(cedana_driver::price::refresh(config)) {
            Ok((path, n)) => eprintln!("{n} prices written to {}", path.display()),
            Err(e) => {
                super::error(e);
                return Exit::Failed;
            }
        }
    }
    let (gpu, gpu_count) = match args.gpu.as_deref().map(cedana_driver::price::parse_gpu) {
        None => (None, None),
        Some(Ok((name, count))) => (Some(name), count),
        Some(Err(e)) => {
            super::error(e);
            return Exit::Usage;
        }
    };
    let spec = cedana_driver::job::Spec {
        cpu_cores: args.cpu,
        memory_gb: args.memory,
        gpu,
        gpu_count,
        vram_gb: args.vram,
        max_price_usd_hour: args.max_price,
    };
    price(&rt, config, &spec, args.limit, args.json)
}

fn price(
    rt: &tokio::runtime::Runtime,
    config: &cedana_driver::Config,
    spec: &cedana_driver::job::Spec,
    limit: Option<usize>,
    json: bool,
) -> Exit {
    let providers = match cedana_driver::runner::providers(config, None, &super::report::Terminal) {
        Ok(p) => p,
        Err(e) => {
            super::error(e);
            return Exit::Config;
        }
    };
    let mut prices = rt.block_on(cedana_driver::price::prices(&providers, spec));
    if let Some(n) = limit {
        prices.offers.truncate(n);
    }
    if json {
        println!(
            "{}",
            serde_json::to_string_pretty(&prices).expect("serializes")
        );
    } else if !prices.offers.is_empty() {
        print!("{}", cedana_driver::price::table(&prices));
    }
    for why in &prices.unusable {
        eprintln!("cedana-driver: not asked: {why}");
    }
    if prices.offers.is_empty() && prices.left_out.is_empty() && !prices.unusable.is_empty() {
        eprintln!("cedana-driver: no provider could be asked for prices; `cedana-driver check` says what each needs");
        return Exit::Config;
    }
    if prices.offers.is_empty() {
        eprintln!("cedana-driver: no offer fits {}", spec_text(spec));
        for why in &prices.left_out {
            eprintln!("  {why}");
        }
        return Exit::NoOffer;
    }
    if !json && !prices.left_out.is_empty() {
        eprintln!(
            "({} offers left out; --json lists why)",
            prices.left_out.len()
        );
    }
    Exit::Ok
}

/// A spec as a user would write it on the command line.
fn spec_text(spec: &cedana_driver::job::Spec) -> String {
    let mut parts = Vec::new();
    if let Some(c) = spec.cpu_cores {
        parts.push(format!("--cpu {c}"));
    }
    if let Some(m) = spec.memory_gb {
        parts.push(format!("--memory {m}"));
    }
    if let Some(g) = &spec.gpu {
        parts.push(match spec.gpu_count {
            Some(n) => format!("--gpu {g}:{n}"),
            None => format!("--gpu {g}"),
        });
    }
    if let Some(v) = spec.vram_gb {
        parts.push(format!("--vram {v}"));
    }
    if let Some(p) = spec.max_price_usd_hour {
        parts.push(format!("--max-price {p}"));
    }
    if parts.is_empty() {
        "(any machine)".into()
    } else {
        parts.join(" ")
    }
}
