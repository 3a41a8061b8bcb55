//! Booting a kernel with an initramfs under QEMU and capturing its console.

use std::{
    fs,
    io::{BufRead as _, BufReader, Write as _},
    path::Path,
    process::{Command, Stdio},
    sync::mpsc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result};

use super::initramfs::DONE;

/// How a boot ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ending {
    /// `/init` ran the whole suite and powered off.
    Completed,
    /// The kernel panicked.
    Panic,
    /// Nothing finished within the time limit; QEMU was killed.
    Timeout,
    /// The VM stopped without finishing the suite.
    Stopped,
}

pub struct Boot {
    pub console: String,
    pub ending: Ending,
    pub seconds: f64,
}

/// How QEMU runs the guest.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Accel {
    Kvm,
    /// Software emulation: slow, but works everywhere.
    Tcg,
}

impl Accel {
    /// KVM when `/dev/kvm` can be opened; whether it really works is only
    /// known after a boot (see [`boot_with_fallback`]).
    pub fn detect() -> Self {
        let usable = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/kvm")
            .is_ok();
        if usable { Self::Kvm } else { Self::Tcg }
    }

    fn args(self) -> [&'static str; 4] {
        match self {
            Self::Kvm => ["-accel", "kvm", "-cpu", "host"],
            // One host thread for both vCPUs: with multi-threaded TCG, a
            // kernel patching its own code (static keys flipped when another
            // test registers netfilter hooks) races with the other vCPU
            // running it, and the guest oopses on a stale int3.
            Self::Tcg => ["-accel", "tcg,thread=single", "-cpu", "max"],
        }
    }
}

/// What QEMU prints when KVM fails to run the guest.
const KVM_FAILURE: &str = "KVM internal error";
/// How long a KVM guest may take to reach its /init (it takes seconds).
const KVM_BOOT_LIMIT: Duration = Duration::from_secs(60);

/// Boots with `accel`; when KVM fails before the guest's `/init` printed
/// anything (a host whose KVM is present but broken), boots again with
/// TCG and downgrades `accel` for the following kernels.
pub fn boot_with_fallback(
    accel: &mut Accel,
    vmlinuz: &Path,
    initramfs: &Path,
    timeout: Duration,
    log: &Path,
) -> Result<Boot> {
    let boot = boot(*accel, vmlinuz, initramfs, timeout, log)?;
    if *accel == Accel::Kvm
        && boot.ending == Ending::Stopped
        && (!boot.console.contains("VMTEST kernel") || boot.console.contains(KVM_FAILURE))
    {
        eprintln!("xtask: KVM does not work here; using software emulation (TCG)");
        *accel = Accel::Tcg;
        return self::boot(Accel::Tcg, vmlinuz, initramfs, timeout, log);
    }
    Ok(boot)
}

/// Boots and returns the console output; `log` receives it as it comes.
fn boot(
    accel: Accel,
    vmlinuz: &Path,
    initramfs: &Path,
    timeout: Duration,
    log: &Path,
) -> Result<Boot> {
    let mut log = fs::File::create(log)?;
    let start = Instant::now();
    let mut child = Command::new("qemu-system-x86_64")
        .args(accel.args())
        .args(["-m", "1G", "-smp", "2", "-nographic", "-no-reboot"])
        .arg("-kernel")
        .arg(vmlinuz)
        .arg("-initrd")
        .arg(initramfs)
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init quiet loglevel=3",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .context("starting qemu-system-x86_64")?;
    let (tx, rx) = mpsc::channel();
    for stream in [
        child
            .stdout
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
        child
            .stderr
            .take()
            .map(|s| Box::new(s) as Box<dyn std::io::Read + Send>),
    ]
    .into_iter()
    .flatten()
    {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stream).lines().map_while(Result::ok) {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
    }
    drop(tx);
    let deadline = start + timeout;
    let mut console = String::new();
    let mut ending = Ending::Stopped;
    loop {
        let now = Instant::now();
        if now >= deadline {
            ending = Ending::Timeout;
            break;
        }
        // A broken KVM may also hang the guest without a word: a guest
        // whose /init has not spoken within a minute is not booting.
        if accel == Accel::Kvm
            && now.duration_since(start) > KVM_BOOT_LIMIT
            && !console.contains("VMTEST kernel")
        {
            break;
        }
        match rx.recv_timeout((deadline - now).min(Duration::from_secs(1))) {
            Ok(line) => {
                let line = line.trim_end_matches('\r').to_owned();
                let _ = writeln!(log, "{line}");
                if line.contains("Kernel panic") {
                    ending = Ending::Panic;
                }
                // A host whose KVM cannot emulate an instruction the guest
                // runs: the guest stops dead and would sit out the timeout.
                if line.contains(KVM_FAILURE) {
                    let _ = writeln!(log, "{line}");
                    console.push_str(&line);
                    console.push('\n');
                    break;
                }
                if line.trim() == DONE && ending != Ending::Panic {
                    ending = Ending::Completed;
                }
                console.push_str(&line);
                console.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {}
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(Boot {
        console,
        ending,
        seconds: start.elapsed().as_secs_f64(),
    })
}
