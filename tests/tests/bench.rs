//! Benchmarks, run by `cargo xtask bench` (ignored by `cargo xtask test`).
//! Each reports a ratio of two measurements taken in the same run, on the
//! same sandbox, in interleaved rounds; none asserts a duration.

use std::{
    path::Path,
    time::{Duration, Instant},
};

use aya::maps::{
    Map, MapData,
    lpm_trie::{Key, LpmTrie},
};
use redirect_sandbox::{
    APP, Group, Net, Sandbox,
    cli::{PROXY_REPLY, UPSTREAM, outcome, redirect_bin},
    require_root,
};

/// Connections per measurement, and interleaved rounds.
const CONNECTIONS: u32 = 3000;
const ROUNDS: usize = 5;
/// CIDRs in the large exclude set.
const LARGE: u32 = 10_000;

/// `count` excluded /32s in 11.0.0.0/8 (none matches the upstream).
fn extra_cidrs(count: u32) -> impl Iterator<Item = Key<u32>> {
    (1..count).map(|i| {
        let [_, a, b, c] = i.to_be_bytes();
        Key::new(32, u32::from_ne_bytes([11, a, b, c]))
    })
}

/// Seconds for [`CONNECTIONS`] sequential redirected connections.
fn measure(sandbox: &Sandbox) -> Duration {
    let start = Instant::now();
    let tally = sandbox
        .connect(Group::App, APP, UPSTREAM, CONNECTIONS)
        .expect("connect");
    let elapsed = start.elapsed();
    assert_eq!(
        tally.get(PROXY_REPLY),
        u64::from(CONNECTIONS),
        "every connection redirected: {}",
        tally.render()
    );
    elapsed
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// The exclude CIDRs live in an LPM trie: a connect costs the same with
/// 10,000 of them as with 1 (iptables walks one rule per CIDR).
#[test]
#[ignore = "benchmark: run with `cargo xtask bench`"]
fn bench_exclude_cidrs_cost_the_same_at_1_and_10000() {
    require_root!();
    let sandbox = Sandbox::with_upstream_and_proxy().expect("sandbox pod");
    let cgroup = sandbox.pod_cgroup().to_string_lossy().into_owned();
    let installed = outcome(
        std::process::Command::new(redirect_bin())
            .args(["istio-iptables", "--ipv6=false", "--mode", "ebpf"])
            .args(["--netns", &sandbox.netns_path(Net::Pod)])
            .args(["--cgroup", &cgroup, "--instance", sandbox.name()])
            .args(["-p", "15001", "-u", "1337", "-i", "*", "-x", "11.0.0.0/32"]),
    )
    .expect("run redirect");
    assert_eq!(installed.code, 0, "{installed:?}");
    let pin = Path::new("/sys/fs/bpf/redirect")
        .join(sandbox.name())
        .join("RDR_EXCLUDE");
    let mut trie: LpmTrie<MapData, u32, u8> = LpmTrie::try_from(Map::LpmTrie(
        MapData::from_pin(&pin).expect("open RDR_EXCLUDE"),
    ))
    .expect("an LPM trie");

    measure(&sandbox); // warm-up
    let mut ratios = Vec::new();
    for round in 1..=ROUNDS {
        let one = measure(&sandbox);
        for key in extra_cidrs(LARGE) {
            trie.insert(&key, 1, 0).expect("insert");
        }
        let many = measure(&sandbox);
        for key in extra_cidrs(LARGE) {
            trie.remove(&key).expect("remove");
        }
        let ratio = many.as_secs_f64() / one.as_secs_f64();
        println!(
            "round {round}: 1 CIDR {:.0} conn/s, {LARGE} CIDRs {:.0} conn/s, time ratio {ratio:.3}",
            f64::from(CONNECTIONS) / one.as_secs_f64(),
            f64::from(CONNECTIONS) / many.as_secs_f64(),
        );
        ratios.push(ratio);
    }
    println!(
        "exclude CIDRs: time per connect with {LARGE} / with 1 = {:.3} (median of {ROUNDS} rounds)",
        median(ratios)
    );
    let removed = outcome(std::process::Command::new(redirect_bin()).args([
        "uninstall",
        "--instance",
        sandbox.name(),
    ]))
    .expect("uninstall");
    assert_eq!(removed.code, 0, "{removed:?}");
}
