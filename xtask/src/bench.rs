//! `cargo xtask bench [--quick]`: runs the benchmark suite (the ignored
//! `bench_capture_costs` test of the end-to-end crate, release build) in a
//! sandbox pod, then turns its `target/bench/results.json` into a table on
//! stdout and two plots, `target/bench/scaling.svg` and
//! `target/bench/latency.svg`. It fails when a figure is missing, so that
//! `--quick` is a smoke test of the whole chain.

use std::{fmt::Write as _, fs, path::Path};

use anyhow::{Context as _, Result, bail};
use plotters::prelude::*;
use serde_json::Value;

use crate::{
    build::{self, cargo},
    sysdeps::{self, SANDBOX_TOOLS, run_checked},
    test::{leftovers, with_leftovers},
};

/// Exclude-CIDR counts the suite measures (as in `tests/tests/bench.rs`).
const CIDR_COUNTS: [u32; 4] = [1, 100, 1_000, 10_000];

/// One figure of `results.json`.
struct Figure {
    name: String,
    mode: String,
    value: f64,
    unit: String,
    spread: [f64; 2],
}

pub fn bench(quick: bool) -> Result<()> {
    sysdeps::ensure_tools(SANDBOX_TOOLS)?;
    let bin = build::release_binary()?;
    let dir = build::target_dir().join("bench");
    fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let results = dir.join("results.json");
    let _ = fs::remove_file(&results);
    let mut cmd = cargo(&[
        "test",
        "--release",
        "--package",
        "redirect-sandbox",
        "--test",
        "bench",
        "--",
        "--ignored",
        "--nocapture",
        "--test-threads=1",
    ])?;
    cmd.env("REDIRECT_BIN", bin)
        .env("REDIRECT_BENCH_OUT", &results)
        .env("REDIRECT_BENCH_QUICK", if quick { "1" } else { "0" });
    let ran = run_checked(&mut cmd).context("benchmarks failed");
    with_leftovers("the benchmarks", ran, leftovers())?;
    let figures = read(&results)?;
    check_complete(&figures)?;
    print!("{}", table(&figures));
    let scaling = dir.join("scaling.svg");
    plot_scaling(&figures, &scaling)?;
    let latency = dir.join("latency.svg");
    plot_latency(&figures, &latency)?;
    println!(
        "\nxtask: wrote {}, {} and {}",
        results.display(),
        scaling.display(),
        latency.display()
    );
    Ok(())
}

fn read(path: &Path) -> Result<Vec<Figure>> {
    let text = fs::read_to_string(path)
        .with_context(|| format!("the benchmark wrote no {}", path.display()))?;
    let json: Value = serde_json::from_str(&text).context("parsing results.json")?;
    json.as_array()
        .context("results.json is not an array")?
        .iter()
        .map(|f| {
            let num = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
            Ok(Figure {
                name: f["name"]
                    .as_str()
                    .context("a figure without a name")?
                    .to_owned(),
                mode: f["mode"].as_str().unwrap_or("").to_owned(),
                value: num(&f["value"]),
                unit: f["unit"].as_str().unwrap_or("").to_owned(),
                spread: [num(&f["spread"][0]), num(&f["spread"][1])],
            })
        })
        .collect()
}

fn value(figures: &[Figure], name: &str, mode: &str) -> Option<f64> {
    figures
        .iter()
        .find(|f| f.name == name && f.mode == mode)
        .map(|f| f.value)
        .filter(|v| v.is_finite())
}

/// Every figure the issue asks for, with a finite value.
fn check_complete(figures: &[Figure]) -> Result<()> {
    let mut wanted: Vec<(String, &str)> = Vec::new();
    for mode in ["direct", "ebpf", "iptables", "nftables"] {
        for name in ["connect_rate", "connect_cpu", "connect_p50", "connect_p99"] {
            wanted.push((name.into(), mode));
        }
    }
    wanted.push(("install_time".into(), "nftables"));
    wanted.push(("uninstall_time".into(), "nftables"));
    for mode in ["ebpf", "iptables"] {
        for name in [
            "install_time",
            "install_time_ipv6",
            "install_time_dns",
            "uninstall_time",
            "request_p50",
            "request_p99",
        ] {
            wanted.push((name.into(), mode));
        }
        for n in CIDR_COUNTS {
            wanted.push((format!("scaling_{n}"), mode));
        }
    }
    for n in CIDR_COUNTS {
        wanted.push((format!("ebpf_over_direct_at_{n}_cidrs"), "ratio"));
        wanted.push((format!("ebpf_over_iptables_at_{n}_cidrs"), "ratio"));
    }
    for name in [
        "ebpf_over_direct_connect_rate",
        "ebpf_over_iptables_connect_rate",
        "ebpf_over_nftables_connect_rate",
        "ebpf_over_direct_connect_cpu",
        "iptables_over_direct_connect_cpu",
        "iptables_over_ebpf_request_p50",
    ] {
        wanted.push((name.into(), "ratio"));
    }
    wanted.push(("map_memory".into(), "ebpf"));
    wanted.push(("bpf_ns_per_redirected".into(), "ebpf"));
    wanted.push(("bpf_ns_per_bypassed".into(), "ebpf"));
    for hook in ["connect4", "sockops", "getsockopt", "sk_lookup"] {
        wanted.push((format!("bpf_ns_{hook}"), "ebpf"));
    }
    wanted.push(("max_handshakes_in_flight".into(), "ebpf"));
    for phase in ["object and maps", "verify the programs (side by side)"] {
        wanted.push((format!("install_phase {phase}"), "ebpf"));
    }
    for mode in ["direct", "ebpf", "iptables"] {
        for name in [
            "dns_query_rate",
            "dns_query_cpu",
            "dns_query_p50",
            "dns_query_p99",
        ] {
            wanted.push((name.into(), mode));
        }
    }
    for mode in ["direct", "ebpf", "iptables"] {
        for name in [
            "connect6_rate",
            "connect6_cpu",
            "connect6_p50",
            "connect6_p99",
        ] {
            wanted.push((name.into(), mode));
        }
    }
    wanted.push(("ebpf_over_direct_connect6_rate".into(), "ratio"));
    wanted.push(("ebpf_over_iptables_connect6_rate".into(), "ratio"));
    wanted.push(("ebpf_over_direct_dns_rate".into(), "ratio"));
    wanted.push(("ebpf_over_iptables_dns_rate".into(), "ratio"));
    for mode in ["cni-ebpf", "cni-iptables", "iptables-restore"] {
        wanted.push(("pod_setup".into(), mode));
    }
    if value(figures, "pod_setup", "cni-node-set").is_some() {
        // Where a node set's ADD goes (kernel 5.15 for node sets).
        for phase in [
            "istio-iptables command line",
            "read the set's pods",
            "activate",
        ] {
            wanted.push((format!("add_phase {phase}"), "cni-node-set"));
        }
    }
    // `--quick` measures one pod; the full run 1, 110 and 500.
    wanted.push(("pod_memory_at_1_pods".into(), "per-pod"));
    let missing: Vec<String> = wanted
        .iter()
        .filter(|(name, mode)| value(figures, name, mode).is_none())
        .map(|(name, mode)| format!("{name}/{mode}"))
        .collect();
    if !missing.is_empty() {
        bail!("the benchmark did not produce: {}", missing.join(", "));
    }
    Ok(())
}

fn table(figures: &[Figure]) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\n{:<44} {:<16} {:>14} {:<12} spread (min..max over rounds)",
        "figure", "mode", "median", "unit"
    );
    for f in figures {
        let fmt = |v: f64| {
            if v.abs() >= 100.0 {
                format!("{v:.0}")
            } else {
                format!("{v:.3}")
            }
        };
        let _ = writeln!(
            out,
            "{:<44} {:<16} {:>14} {:<12} {}..{}",
            f.name,
            f.mode,
            fmt(f.value),
            f.unit,
            fmt(f.spread[0]),
            fmt(f.spread[1])
        );
    }
    out
}

/// The layout both plots share: a caption, margins and axis label areas.
fn chart_builder<'a, 'b>(
    root: &'a DrawingArea<SVGBackend<'b>, plotters::coord::Shift>,
    caption: &str,
) -> ChartBuilder<'a, 'b, SVGBackend<'b>> {
    let mut builder = ChartBuilder::on(root);
    builder
        .caption(caption, ("sans-serif", 22))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70);
    builder
}

/// Connections per second against the number of exclude CIDRs, per mode
/// (log scale), with the no-capture rate as a flat reference.
fn plot_scaling(figures: &[Figure], path: &Path) -> Result<()> {
    /// A mode's (CIDR count, connections/s) points, in its colour.
    type Curve<'a> = (&'a str, RGBColor, Vec<(f64, f64)>);
    let series: Vec<Curve> = ["ebpf", "iptables"]
        .iter()
        .zip([BLUE, RED])
        .map(|(mode, color)| {
            let points = CIDR_COUNTS
                .iter()
                .filter_map(|n| {
                    value(figures, &format!("scaling_{n}"), mode).map(|v| (f64::from(*n), v))
                })
                .collect();
            (*mode, color, points)
        })
        .collect();
    let direct = value(figures, "scaling_direct", "direct").unwrap_or(0.0);
    let top = series
        .iter()
        .flat_map(|(_, _, p)| p.iter().map(|(_, y)| *y))
        .fold(direct, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = chart_builder(&root, "Connection setup rate vs. exclude CIDRs (-x)")
        .build_cartesian_2d((0.8f64..15_000f64).log_scale(), 0f64..top)?;
    chart
        .configure_mesh()
        .x_desc("exclude CIDRs")
        .y_desc("connections / s")
        .x_label_formatter(&|x| format!("{x:.0}"))
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (mode, color, points) in series {
        chart
            .draw_series(LineSeries::new(points.clone(), color.stroke_width(2)))?
            .label(mode)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        chart.draw_series(points.iter().map(|p| Circle::new(*p, 4, color.filled())))?;
    }
    chart
        .draw_series(LineSeries::new(
            vec![(0.8, direct), (15_000.0, direct)],
            BLACK.stroke_width(1),
        ))?
        .label("no capture (direct)")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

/// p50 and p99 latency of a connection setup and of a small request
/// through the proxy, per mode, as grouped bars.
fn plot_latency(figures: &[Figure], path: &Path) -> Result<()> {
    let groups = [
        ("connect p50", "connect_p50"),
        ("connect p99", "connect_p99"),
        ("request p50", "request_p50"),
        ("request p99", "request_p99"),
    ];
    let modes = [("direct", BLACK), ("ebpf", BLUE), ("iptables", RED)];
    let top = groups
        .iter()
        .flat_map(|(_, name)| modes.iter().filter_map(|(m, _)| value(figures, name, m)))
        .fold(0.0, f64::max)
        * 1.2;
    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = chart_builder(
        &root,
        "Latency: connection setup and a request through the proxy",
    )
    .build_cartesian_2d(0f64..groups.len() as f64, 0f64..top)?;
    chart
        .configure_mesh()
        .disable_x_mesh()
        .x_labels(groups.len() * 2 + 1)
        .x_label_formatter(&|x| {
            let i = x.floor() as usize;
            if (x - x.floor() - 0.5).abs() < 0.01 && i < groups.len() {
                groups[i].0.to_owned()
            } else {
                String::new()
            }
        })
        .y_desc("microseconds")
        .y_label_formatter(&|y| format!("{y:.0}"))
        .draw()?;
    for (j, (mode, color)) in modes.iter().enumerate() {
        let bars: Vec<Rectangle<(f64, f64)>> = groups
            .iter()
            .enumerate()
            .filter_map(|(i, (_, name))| {
                let v = value(figures, name, mode)?;
                let x0 = i as f64 + 0.1 + j as f64 * 0.27;
                Some(Rectangle::new([(x0, 0.0), (x0 + 0.25, v)], color.filled()))
            })
            .collect();
        let color = *color;
        chart
            .draw_series(bars)?
            .label(*mode)
            .legend(move |(x, y)| Rectangle::new([(x, y - 5), (x + 15, y + 5)], color.filled()));
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()?;
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_figure_is_named() {
        let figures = vec![Figure {
            name: "connect_rate".into(),
            mode: "direct".into(),
            value: 1.0,
            unit: "conn/s".into(),
            spread: [1.0, 1.0],
        }];
        let err = check_complete(&figures).unwrap_err().to_string();
        assert!(err.contains("connect_rate/ebpf"), "{err}");
        assert!(!err.contains("connect_rate/direct"), "{err}");
    }
}
