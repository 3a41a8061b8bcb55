//! `redirect run`: foreground capture that detaches on SIGTERM/SIGINT
//! unless `--persist`, and shows the eBPF programs' decisions with `--log`.

use std::{
    io::{BufRead as _, BufReader},
    net::SocketAddrV4,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    thread,
    time::{Duration, Instant},
};

use redirect_sandbox::{
    APP, Group, Sandbox,
    cli::{UPSTREAM, redirect_bin},
    require_root,
};

fn upstream() -> SocketAddrV4 {
    UPSTREAM
}

fn pod() -> Sandbox {
    Sandbox::with_upstream_and_proxy().expect("sandbox pod")
}

/// A running `redirect run`, with everything it printed so far. Killed on
/// drop if a test fails before stopping it (the sandbox then removes the
/// instance's pins).
struct Running {
    child: Child,
    output: Arc<Mutex<String>>,
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Running {
    fn start(sandbox: &Sandbox, extra: &[&str]) -> Self {
        let mut child = Command::new(redirect_bin())
            .args(["run", "--cgroup", &sandbox.pod_cgroup().to_string_lossy()])
            .args(["--instance", sandbox.name(), "--netns", sandbox.pod_netns()])
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start redirect run");
        let output = Arc::new(Mutex::new(String::new()));
        for stream in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn std::io::Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let output = Arc::clone(&output);
            thread::spawn(move || {
                for line in BufReader::new(stream).lines().map_while(Result::ok) {
                    if let Ok(mut out) = output.lock() {
                        out.push_str(&line);
                        out.push('\n');
                    }
                }
            });
        }
        let running = Self { child, output };
        running.wait_for("capturing");
        running
    }

    /// Waits (at most 60 s: an install under software emulation beside
    /// another VM takes over 10) until the output contains `needle`.
    fn wait_for(&self, needle: &str) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            if self.output.lock().is_ok_and(|o| o.contains(needle)) {
                return;
            }
            thread::sleep(Duration::from_millis(20));
        }
        panic!("no {needle:?} in: {}", self.text());
    }

    fn text(&self) -> String {
        self.output.lock().map(|o| o.clone()).unwrap_or_default()
    }

    /// Sends `signal` and waits for the exit status (at most 10 s).
    fn stop(&mut self, signal: i32) -> (i32, String) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait") {
                thread::sleep(Duration::from_millis(50)); // let the readers drain
                return (status.code().unwrap_or(-1), self.text());
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!(
                    "redirect run did not exit on signal {signal}: {}",
                    self.text()
                );
            }
            thread::sleep(Duration::from_millis(20));
        }
    }
}

fn lands(sandbox: &Sandbox) -> String {
    sandbox.lands(Group::App, APP, upstream()).expect("connect")
}

#[test]
fn run_captures_logs_decisions_and_detaches_on_sigterm() {
    require_root!();
    let sandbox = pod();
    let mut run = Running::start(&sandbox, &["--log", "debug"]);
    assert_eq!(lands(&sandbox), "proxy");
    run.wait_for(&format!(
        "redirect uid=1000 {} -> 127.0.0.1:15001",
        upstream()
    ));
    let (code, output) = run.stop(libc::SIGTERM);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("detached"), "{output}");
    assert!(!sandbox.is_pinned());
    assert_eq!(lands(&sandbox), "upstream");
}

#[test]
fn run_with_persist_leaves_the_capture_installed() {
    require_root!();
    let sandbox = pod();
    let mut run = Running::start(&sandbox, &["--persist"]);
    let (code, output) = run.stop(libc::SIGINT);
    assert_eq!(code, 0, "{output}");
    assert!(output.contains("stays installed"), "{output}");
    assert!(sandbox.is_pinned());
    assert_eq!(lands(&sandbox), "proxy");
    sandbox.uninstall().expect("uninstall");
    assert_eq!(lands(&sandbox), "upstream");
}
