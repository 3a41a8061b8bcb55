//! `redirect run`: install, stay in the foreground (optionally printing the
//! eBPF programs' decisions), and detach on SIGINT/SIGTERM unless `--persist`.

use std::process::ExitCode;

use anyhow::{Context as _, Result};
use aya_log::EbpfLogger;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{cgroup, cli::RunArgs, ebpf::loader};

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let config = args.capture.to_kernel_config()?;
    let cgroup = cgroup::resolve(&args.target.cgroup)?;
    let instance = args
        .target
        .instance
        .clone()
        .unwrap_or_else(|| cgroup::default_instance(&cgroup));
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
            log_level: args.log.ebpf_level(),
        })?;
        // From here on, any way out detaches (unless --persist).
        let guard = Detach {
            instance: &instance,
            armed: !args.persist,
        };
        outln!(
            "redirect: capturing {} (instance {instance}) -> 127.0.0.1:{}; Ctrl-C to {}",
            cgroup.path.display(),
            config.proxy_port,
            if args.persist {
                "exit (capture stays)"
            } else {
                "detach"
            }
        );
        let logger = if args.log.ebpf_level() > 0 {
            let logger = EbpfLogger::init_with_logger(&mut installed.ebpf, StderrLog)
                .context("reading the eBPF log buffer")?;
            // SAFETY: the logger owns its ring buffer descriptor and keeps it
            // open, unreplaced, for as long as the AsyncFd lives.
            Some(unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }?)
        } else {
            None
        };
        let logs = async {
            match logger {
                Some(mut fd) => loop {
                    let Ok(mut guard) = fd.readable_mut().await else {
                        break;
                    };
                    guard.get_inner_mut().flush();
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
    instance: &'a str,
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

/// Prints eBPF log records on stderr, one line each.
struct StderrLog;

impl log::Log for StderrLog {
    fn enabled(&self, _: &log::Metadata<'_>) -> bool {
        true
    }

    fn log(&self, record: &log::Record<'_>) {
        eprintln!("[{}] {}", record.level(), record.args());
    }

    fn flush(&self) {}
}
