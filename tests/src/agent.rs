//! The sandbox agent: the small client and server that run as processes
//! inside a sandbox (an app that connects, a listener that tells who it is).
//!
//! It is an executable entry point ([`main`]) so that it can run in the
//! pod's cgroup as any UID, which a thread of the test process cannot.
//!
//! ```text
//! agent [--uid U --gid G] serve --listen IP:PORT --reply TEXT
//!     listen, print "ready", answer every connection with "TEXT\n"
//! agent [--uid U --gid G] connect --to IP:PORT [--count N] [--duration-ms D]
//!     connect N times in sequence (stopping after D ms), read each reply,
//!     print one "<count>\t<reply>" line per distinct reply or error
//! ```

use std::{
    collections::BTreeMap,
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

/// How long one connect or read may take before it counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(3);

/// Runs the agent with its arguments (without the program name); returns
/// the process exit code.
pub fn main(args: &[String]) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(err) => {
            eprintln!("agent: {err:#}");
            1
        }
    }
}

fn run(args: &[String]) -> Result<()> {
    let mut args = Args(args.iter().map(String::as_str).collect());
    let uid = args.opt("--uid")?;
    let gid = args.opt("--gid")?;
    if let (Some(uid), Some(gid)) = (uid, gid) {
        drop_privileges(uid.parse()?, gid.parse()?)?;
    }
    match args.0.first().copied() {
        Some("serve") => {
            args.0.remove(0);
            let listen: SocketAddr = args.req("--listen")?.parse()?;
            let reply = args.req("--reply")?.to_owned();
            serve(listen, &reply)
        }
        Some("connect") => {
            args.0.remove(0);
            let to: SocketAddr = args.req("--to")?.parse()?;
            let count: u64 = args.opt("--count")?.unwrap_or("1").parse()?;
            let duration = args.opt("--duration-ms")?.map(str::parse).transpose()?;
            let tally = connect(to, count, duration.map(Duration::from_millis));
            print!("{}", tally.render());
            Ok(())
        }
        other => bail!("unknown agent command {other:?}"),
    }
}

struct Args<'a>(Vec<&'a str>);

impl<'a> Args<'a> {
    /// Removes `name VALUE` from the arguments and returns VALUE.
    fn opt(&mut self, name: &str) -> Result<Option<&'a str>> {
        let Some(i) = self.0.iter().position(|a| *a == name) else {
            return Ok(None);
        };
        let value = *self
            .0
            .get(i + 1)
            .with_context(|| format!("{name} needs a value"))?;
        self.0.drain(i..=i + 1);
        Ok(Some(value))
    }

    fn req(&mut self, name: &str) -> Result<&'a str> {
        self.opt(name)?
            .with_context(|| format!("{name} is required"))
    }
}

fn drop_privileges(uid: u32, gid: u32) -> Result<()> {
    // SAFETY: plain system calls on this single-threaded process.
    unsafe {
        if libc::setgroups(0, std::ptr::null()) != 0
            || libc::setresgid(gid, gid, gid) != 0
            || libc::setresuid(uid, uid, uid) != 0
        {
            return Err(std::io::Error::last_os_error()).context("dropping privileges");
        }
    }
    Ok(())
}

fn serve(listen: SocketAddr, reply: &str) -> Result<()> {
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    println!("ready");
    std::io::stdout().flush()?;
    let line = format!("{reply}\n");
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let _ = stream.write_all(line.as_bytes());
    }
    Ok(())
}

fn connect(to: SocketAddr, count: u64, duration: Option<Duration>) -> Tally {
    let start = Instant::now();
    let mut tally = Tally::default();
    for _ in 0..count {
        if duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        let outcome = once(to).unwrap_or_else(|err| format!("error: {}", err.kind()));
        *tally.0.entry(outcome).or_default() += 1;
    }
    tally
}

fn once(to: SocketAddr) -> std::io::Result<String> {
    let mut stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.trim().to_owned())
}

/// How many connections got each reply (or each error, as `error: <kind>`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Tally(pub BTreeMap<String, u64>);

impl Tally {
    /// How many connections got exactly `reply`.
    pub fn get(&self, reply: &str) -> u64 {
        self.0.get(reply).copied().unwrap_or(0)
    }

    /// Connections counted in all.
    pub fn total(&self) -> u64 {
        self.0.values().sum()
    }

    /// Lines of `<count>\t<reply>`.
    pub fn render(&self) -> String {
        self.0
            .iter()
            .map(|(reply, n)| format!("{n}\t{reply}\n"))
            .collect()
    }

    /// Reads what [`Tally::render`] wrote.
    pub fn parse(text: &str) -> Result<Self> {
        let mut tally = Self::default();
        for line in text.lines().filter(|l| !l.is_empty()) {
            let (n, reply) = line
                .split_once('\t')
                .with_context(|| format!("bad tally line {line:?}"))?;
            tally.0.insert(reply.to_owned(), n.parse()?);
        }
        Ok(tally)
    }
}
