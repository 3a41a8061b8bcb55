//! `redirect run`: install, stay in the foreground (optionally printing the
//! eBPF programs' decisions), and detach on SIGINT/SIGTERM unless `--persist`.

use std::{io::Write as _, process::ExitCode};

use anyhow::{Context as _, Result};
use aya_log::EbpfLogger;
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use crate::{cgroup, cli::RunArgs, ebpf::loader};

pub fn run(args: &RunArgs) -> Result<ExitCode> {
    let config = args.capture.to_config();
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
    runtime.block_on(async {
        let mut installed = loader::install(&loader::Request {
            config: &config,
            cgroup: &cgroup,
            instance: &instance,
            log_level: args.log.ebpf_level(),
        })?;
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
        let _ = std::io::stdout().flush();
        let logger = if args.log.ebpf_level() > 0 {
            let logger = EbpfLogger::init_with_logger(&mut installed.ebpf, StderrLog)
                .context("reading the eBPF log buffer")?;
            // SAFETY: the logger owns its ring buffer descriptor and keeps it
            // open, unreplaced, for as long as the AsyncFd lives.
            Some(unsafe { AsyncFd::register_with_interest(logger, Interest::READABLE) }?)
        } else {
            None
        };
        let mut term = signal(SignalKind::terminate())?;
        let mut int = signal(SignalKind::interrupt())?;
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
            () = logs => {},
        }
        if args.persist {
            outln!("redirect: exiting; instance {instance} stays installed");
        } else {
            drop(installed);
            loader::uninstall(&instance)?;
            outln!("redirect: detached instance {instance}");
        }
        Ok(ExitCode::SUCCESS)
    })
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
