//! `cargo xtask`: the only commands a fresh machine needs.
//!
//! Every task first makes sure what it needs is present (the nightly
//! toolchain with `rust-src`, a `bpf-linker` built against that nightly's own
//! LLVM, and the Debian packages the task uses) and installs what is missing,
//! saying what it installs.

mod bench;
mod build;
mod cri;
mod fuzz_diff;
mod image;
mod rootfs;
mod run;
mod sysdeps;
mod test;
mod toolchain;
mod vm;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "cargo xtask", about = "Build, run and test redirect")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Build the eBPF object and the `redirect` binary that embeds it.
    Build {
        /// Build with the release profile.
        #[arg(long)]
        release: bool,
    },
    /// Build, then run `redirect demo` (or `redirect <ARGS>` when given) as root.
    Run {
        /// Arguments passed to `redirect` instead of `demo`.
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Run every test: formatting, clippy, unit tests and the end-to-end suite.
    Test {
        /// Only run tests whose name contains this string (passed to cargo test).
        filter: Option<String>,
        /// Skip `cargo fmt --check` and clippy.
        #[arg(long)]
        no_lint: bool,
        /// Skip the benchmarks' smoke test (`bench --quick`), which runs
        /// after the suite when no filter is given.
        #[arg(long)]
        no_bench: bool,
        /// Skip the pod tests (`pod-test` and `cri-test`), which run after
        /// the suite when no filter is given.
        #[arg(long)]
        no_pods: bool,
        /// Skip the eBPF tests on the oldest kernel (5.10 under QEMU, about
        /// five minutes), which run last when no filter is given.
        #[arg(long)]
        no_vm: bool,
    },
    /// Run the benchmarks (release build): the cost of capture, eBPF vs
    /// iptables vs none, measured in one run; table, JSON and SVG plots in
    /// target/bench/.
    Bench {
        /// Small sizes: a smoke test that every figure is produced (under 2 minutes).
        #[arg(long)]
        quick: bool,
    },
    /// Differential fuzzing: random istio-iptables configurations ×
    /// random connections, applied in iptables mode and in eBPF mode on the
    /// same sandbox pod; every observation must match (the short seeded
    /// run is part of `test`).
    FuzzDiff {
        /// (config, connection) pairs to compare.
        #[arg(long, default_value = "1500")]
        cases: u64,
        /// The seed [default: the test's fixed seed, as `test` runs it].
        #[arg(long)]
        seed: Option<u64>,
        /// Connections per configuration [default: 60]; larger is faster
        /// per pair (fewer installs) but tries fewer configurations.
        #[arg(long)]
        per_config: Option<u64>,
        /// Replay only this round (configuration) of the seed, as a
        /// difference's report names it.
        #[arg(long)]
        round: Option<u64>,
        /// Also the extended connection space: switched credentials
        /// (effective ids other than the real ones, or a socket made under
        /// one identity and connected under another), fixed source ports,
        /// SO_BINDTODEVICE=eth0. eBPF mode has known differences there.
        #[arg(long)]
        extended: bool,
    },
    /// Build the init-container image with podman, from local files.
    Image,
    /// Build the image and run a real pod with it (podman): eBPF, iptables and native nftables mode.
    PodTest,
    /// Build the image and run redirect-cni through containerd's CRI: a
    /// private containerd, the Debian CNI plugins, pods made as a kubelet
    /// makes them.
    CriTest,
    /// Boot Debian kernels under QEMU and run the end-to-end suite in each.
    VmTest {
        /// Kernels to test: 5.10, 6.1, 6.12, sid (repeatable; default: all).
        #[arg(long = "kernel", value_name = "NAME")]
        kernels: Vec<String>,
        /// Keep each kernel's root tree and initramfs under target/vm-test/.
        #[arg(long)]
        keep: bool,
        /// Time limit for one kernel's boot and suite, in minutes (the
        /// suite takes 25-30 under software emulation on 2 cores, more
        /// when the host is busy).
        #[arg(long, default_value = "45")]
        timeout_minutes: u64,
        /// Only write docs/kernels.md again from the last run's matrix.json.
        #[arg(long)]
        render_docs: bool,
        /// Run only this end-to-end test binary (repeatable; default: all).
        /// A subset run leaves the matrix files and docs/kernels.md alone.
        #[arg(long = "test", value_name = "BINARY")]
        tests: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.task {
        Task::Build { release } => build::build(release).map(|_| ()),
        Task::Run { args } => run::run(&args),
        Task::Test {
            filter,
            no_lint,
            no_bench,
            no_pods,
            no_vm,
        } => test::test(&test::Options {
            filter: filter.as_deref(),
            lint: !no_lint,
            bench: !no_bench,
            pods: !no_pods,
            oldest_kernel: !no_vm,
        }),
        Task::Bench { quick } => bench::bench(quick),
        Task::FuzzDiff {
            cases,
            seed,
            per_config,
            round,
            extended,
        } => fuzz_diff::fuzz_diff(&fuzz_diff::Options {
            cases,
            seed,
            per_config,
            round,
            extended,
        }),
        Task::Image => image::image().map(|name| println!("xtask: built {name}")),
        Task::PodTest => image::pod_test(),
        Task::CriTest => cri::cri_test(),
        Task::VmTest {
            kernels,
            keep,
            timeout_minutes,
            render_docs,
            tests,
        } => vm::vm_test(&vm::Options {
            kernels,
            keep,
            render_docs,
            tests,
            timeout: std::time::Duration::from_secs(timeout_minutes * 60),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            ExitCode::FAILURE
        }
    }
}
