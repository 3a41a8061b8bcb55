//! Builds the eBPF object (`redirect-ebpf`, for bpfel-unknown-none with the
//! nightly toolchain and bpf-linker) into `$OUT_DIR`, where `src/ebpf`
//! embeds it. `cargo xtask build` installs what this needs.

fn main() -> anyhow::Result<()> {
    let package = aya_build::Package {
        name: "redirect-ebpf",
        root_dir: concat!(env!("CARGO_MANIFEST_DIR"), "/../redirect-ebpf"),
        ..Default::default()
    };
    aya_build::build_ebpf([package], aya_build::Toolchain::default())
}
