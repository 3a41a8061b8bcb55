//! `redirect run`: install, stay in the foreground (optionally printing the
//! eBPF programs' decisions), and detach on SIGINT/SIGTERM unless `--persist`.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use aya::maps::{MapData, RingBuf};
use redirect_common::{Counter, Event};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use super::install::{inbound_summary, lower, resolve};
use crate::{cli::RunArgs, ebpf::loader, instance::InstanceName};

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let (capture, cgroup, instance) = resolve(&args.target, &args.capture, args.log.ebpf_level())?;
    let config = lower(&capture)?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if loader::is_installed(&instance) && !args.persist {
        anyhow::bail!(
            "instance {instance} is already installed: `redirect run` would remove it when it stops; \
             update it with `redirect install`, or pass --persist"
        );
    }
    runtime.block_on(async {
        // Handlers first: a signal that arrives while installing (or right
        // after "capturing" is printed) must detach, not kill the process.
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
        let mut hup = signal(SignalKind::hangup())?;
        let mut installed = loader::install(&loader::Request {
            config: &config,
            cgroup: &cgroup,
            instance: &instance,
        })?;
        // The install's phases now, not when the run ends.
        crate::ebpf::timing::print();
        installed.print_notes();
        // From here on, any way out detaches (unless --persist).
        let guard = Detach {
            instance: &instance,
            armed: !args.persist,
        };
        outln!(
            "redirect: capturing {} (instance {instance}) -> 127.0.0.1:{}{}; Ctrl-C to {}",
            cgroup.path.display(),
            config.proxy_port,
            inbound_summary(&config),
            if args.persist {
                "exit (capture stays)"
            } else {
                "detach"
            }
        );
        let events = if args.log.ebpf_level() > 0 {
            let map = installed
                .ebpf
                .take_map("RDR_EVENTS")
                .context("the programs have no event ring buffer")?;
            let ring: RingBuf<MapData> = RingBuf::try_from(map)?;
            // SAFETY: the ring buffer owns its descriptor and keeps it open,
            // unreplaced, for as long as the AsyncFd lives.
            Some(unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }?)
        } else {
            None
        };
        let logs = async {
            match events {
                Some(mut fd) => loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        break;
                    };
                    while let Some(item) = guard.get_inner_mut().next() {
                        if let Some(event) = item
                            .get(..size_of::<Event>())
                            .and_then(|b| bytemuck::try_pod_read_unaligned::<Event>(b).ok())
                        {
                            eprintln!("{}", describe(&event));
                        }
                    }
                    guard.clear_ready();
                },
                None => std::future::pending::<()>().await,
            }
        };
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
            _ = hup.recv() => {},
            () = logs => {},
        }
        drop(installed);
        guard.finish()
    })
}

/// Uninstalls the instance when `run` ends, however it ends.
struct Detach<'a> {
    instance: &'a InstanceName,
    armed: bool,
}

impl Detach<'_> {
    /// The normal way out: detach (or keep, with --persist) and say so.
    fn finish(mut self) -> Result<ExitCode> {
        let instance = self.instance;
        if self.armed {
            self.armed = false;
            loader::uninstall(instance)?;
            outln!("redirect: detached instance {instance}");
        } else {
            outln!("redirect: exiting; instance {instance} stays installed");
        }
        Ok(ExitCode::SUCCESS)
    }
}

impl Drop for Detach<'_> {
    fn drop(&mut self) {
        if self.armed
            && let Err(err) = loader::uninstall(self.instance)
        {
            eprintln!("redirect: detaching instance {}: {err:#}", self.instance);
        }
    }
}

/// One line for one decision, e.g. `[DEBUG] redirect uid=1000 198.18.0.2:9080 -> 127.0.0.1:15001`.
fn describe(event: &Event) -> String {
    let ip6 = std::net::Ipv6Addr::from(redirect_common::Ip6(event.dst_ip).octets());
    let (dst, to) = match ip6.to_ipv4_mapped() {
        Some(v4) => (v4.to_string(), "127.0.0.1"),
        None => (format!("[{ip6}]"), "[::1]"),
    };
    let name = Counter::ALL
        .iter()
        .find(|c| **c as u32 == event.counter)
        .map_or("unknown", |c| c.name());
    if event.counter == Counter::Redirected as u32 {
        format!(
            "[DEBUG] redirect uid={} {dst}:{} -> {to}:{}",
            event.uid, event.dst_port, event.proxy_port
        )
    } else {
        format!(
            "[TRACE] {name} uid={} gid={} {dst}:{}",
            event.uid, event.gid, event.dst_port
        )
    }
}
