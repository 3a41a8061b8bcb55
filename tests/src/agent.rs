//! The sandbox agent: the small clients and servers that run as processes
//! inside a sandbox (an app that connects, a proxy that reads
//! `SO_ORIGINAL_DST`, a listener that tells who it is).
//!
//! It is an executable entry point ([`main`]) so that it can run in the
//! pod's cgroup as any UID, which a thread of the test process cannot.
//!
//! ```text
//! agent [--uid U --gid G] serve --listen IP:PORT[,IP:PORT...] --reply TEXT [--report original-dst|peer] [--http] [--transparent]
//!     listen, print "ready", answer every connection with one line: TEXT,
//!     or what the accepted socket reports (its SO_ORIGINAL_DST, read as a
//!     transparent proxy does, or its peer address); --http wraps it in an
//!     HTTP/1.1 response after reading the request head; --transparent sets
//!     IP_TRANSPARENT on the listener (what a TPROXY listener needs)
//! agent [...] connect --to IP:PORT [--count N] [--duration-ms D] [--until-file F] [--peer]
//!     connect N times in sequence (stopping after D ms, or once file F
//!     exists), read each reply,
//!     print one "<count>\t<reply>" line per distinct reply or error;
//!     --peer prefixes each reply with the socket's getpeername()
//! agent [...] check --to IP:PORT[,IP:PORT...] --count N [--concurrent] [--direct IP:PORT]
//!     connection i goes to target i mod len and must be answered with that
//!     target's address (a proxy reporting original-dst); prints a tally of
//!     "ok", "mixup" (another connection's address) and errors. With
//!     --concurrent, all N connections are open before any reply is read.
//!     With --direct, every other connection goes straight to that address
//!     (the proxy, not redirected) and must get no original destination:
//!     "direct-ok", or "stale" when some earlier connection's record answers
//! agent [...] each --to IP:PORT[,IP:PORT...] [--bind IP]
//!     one connection to each target in turn (from a socket bound to IP,
//!     when given), printing "<target>\t<reply or error>" per target
//! agent [...] relay --listen IP:PORT [--bind IP]
//!     a transparent proxy: for each connection, read its SO_ORIGINAL_DST,
//!     connect there (from a socket bound to IP, e.g. Istio's inbound
//!     passthrough source 127.0.0.6), send the client "<original dst> ",
//!     then copy bytes both ways until a side closes
//! agent [...] bench --to IP:PORT --count N [--request]
//!     N sequential connections (connect, optionally send an HTTP GET, read
//!     the reply to its end, close), each timed; prints one JSON object:
//!     count, errors, secs, cpu_secs (this process's CPU time), p50_us,
//!     p99_us, and the first reply's first line
//! agent pause
//!     sleep until SIGTERM or SIGINT (a pod's infra container, as pause is)
//! agent [...] sockopts --to IP:PORT
//!     print getsockopt answers that must not depend on capture: SO_RCVBUF
//!     and the stable head of TCP_INFO of a fresh socket, and
//!     SO_ORIGINAL_DST of a connection to IP:PORT
//! ```

use std::{
    collections::BTreeMap,
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, SockRef, Socket, Type};

/// How long one connect or read may take before it counts as an error.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

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
    exit_on_term();
    raise_nofile();
    let uid = args.opt("--uid")?;
    let gid = args.opt("--gid")?;
    if let (Some(uid), Some(gid)) = (uid, gid) {
        drop_privileges(uid.parse()?, gid.parse()?)?;
    }
    let command = args.0.first().copied();
    if command.is_some() {
        args.0.remove(0);
    }
    match command {
        Some("serve") => {
            let listen = args
                .req("--listen")?
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<SocketAddr>, _>>()?;
            let reply = match args.opt("--report")? {
                None => Reply::Text(args.req("--reply")?.to_owned()),
                Some("original-dst") => Reply::OriginalDst,
                Some("peer") => Reply::Peer,
                Some(other) => bail!("unknown --report {other}"),
            };
            let transparent = args.flag("--transparent");
            serve(&listen, &reply, args.flag("--http"), transparent)
        }
        Some("connect") => {
            let to: SocketAddr = args.req("--to")?.parse()?;
            let count: u64 = args.opt("--count")?.unwrap_or("1").parse()?;
            let duration = args.opt("--duration-ms")?.map(str::parse).transpose()?;
            let until = args.opt("--until-file")?.map(std::path::Path::new);
            let peer = args.flag("--peer");
            let stop = Stop {
                after: duration.map(Duration::from_millis),
                file: until,
            };
            let tally = connect(to, count, &stop, peer);
            print!("{}", tally.render());
            Ok(())
        }
        Some("check") => {
            let targets = args
                .req("--to")?
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<SocketAddr>, _>>()?;
            let count: usize = args.req("--count")?.parse()?;
            let direct = args.opt("--direct")?.map(str::parse).transpose()?;
            let tally = check(&targets, count, args.flag("--concurrent"), direct);
            print!("{}", tally.render());
            Ok(())
        }
        Some("each") => {
            let targets = args
                .req("--to")?
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<SocketAddr>, _>>()?;
            let bind = args.opt("--bind")?.map(str::parse).transpose()?;
            for target in targets {
                let reply =
                    bound_once(target, bind).unwrap_or_else(|err| format!("error: {}", err.kind()));
                println!("{target}\t{reply}");
            }
            Ok(())
        }
        Some("sockopts") => sockopts(args.req("--to")?.parse()?),
        Some("pause") => pause(),
        Some("bench") => {
            let to: SocketAddr = args.req("--to")?.parse()?;
            let count: usize = args.req("--count")?.parse()?;
            println!("{}", bench(to, count, args.flag("--request")));
            Ok(())
        }
        Some("relay") => {
            let listen: SocketAddr = args.req("--listen")?.parse()?;
            let bind = args.opt("--bind")?.map(str::parse).transpose()?;
            relay(listen, bind)
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

    /// Removes a valueless `name` and says whether it was there.
    fn flag(&mut self, name: &str) -> bool {
        let found = self.0.iter().position(|a| *a == name);
        if let Some(i) = found {
            self.0.remove(i);
        }
        found.is_some()
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

/// Thousands of concurrent connections need more than the default 1024
/// descriptors: raise the soft limit to the hard one.
fn raise_nofile() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: valid rlimit buffer; failure leaves the limit as it was.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 {
            limit.rlim_cur = limit.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

/// What a server answers.
enum Reply {
    Text(String),
    /// The accepted socket's `SO_ORIGINAL_DST`, as a transparent proxy reads it.
    OriginalDst,
    /// The accepted socket's peer address.
    Peer,
}

impl Reply {
    fn for_stream(&self, stream: &TcpStream) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::OriginalDst => original_dst(stream),
            Self::Peer => stream
                .peer_addr()
                .map_or_else(|e| format!("error: {}", e.kind()), |a| a.to_string()),
        }
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)` through socket2, the way
/// linkerd2-proxy reads it: `ip:port`, or `error: <errno>`.
pub fn original_dst(stream: &TcpStream) -> String {
    match SockRef::from(stream).original_dst_v4() {
        Ok(addr) => addr.as_socket().map_or_else(
            || "error: not an inet address".to_owned(),
            |a| a.to_string(),
        ),
        Err(err) => format!("error: os {}", err.raw_os_error().unwrap_or(0)),
    }
}

/// Listens on every address of `listen` (one thread each after the
/// first), prints "ready" once all are bound, and answers (see the module
/// documentation).
fn serve(listen: &[SocketAddr], reply: &Reply, http: bool, transparent: bool) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in listen {
        let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if transparent {
            socket
                .set_ip_transparent_v4(true)
                .context("IP_TRANSPARENT (needs CAP_NET_ADMIN)")?;
        }
        socket
            .bind(&(*addr).into())
            .with_context(|| format!("binding {addr}"))?;
        socket.listen(4096)?;
        listeners.push(TcpListener::from(socket));
    }
    println!("ready");
    std::io::stdout().flush()?;
    std::thread::scope(|scope| {
        let mut listeners = listeners.into_iter();
        let first = listeners.next();
        for listener in listeners {
            scope.spawn(move || answer(&listener, reply, http));
        }
        if let Some(first) = first {
            answer(&first, reply, http);
        }
    });
    Ok(())
}

/// Answers every connection `listener` accepts.
fn answer(listener: &TcpListener, reply: &Reply, http: bool) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let text = reply.for_stream(&stream);
        if http {
            let _ = stream.set_read_timeout(Some(IO_TIMEOUT));
            let mut head = BufReader::new(&stream);
            let mut line = String::new();
            while head.read_line(&mut line).is_ok_and(|n| n > 0) && line != "\r\n" {
                line.clear();
            }
            let body = format!("{text}\n");
            let _ = write!(
                stream,
                "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
        } else {
            let _ = writeln!(stream, "{text}");
        }
    }
}

fn relay(listen: SocketAddr, bind: Option<std::net::IpAddr>) -> Result<()> {
    let socket = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
    socket.set_reuse_address(true)?;
    socket
        .bind(&listen.into())
        .with_context(|| format!("binding {listen}"))?;
    socket.listen(4096)?;
    let listener: TcpListener = socket.into();
    println!("ready");
    std::io::stdout().flush()?;
    for client in listener.incoming() {
        let Ok(client) = client else { continue };
        std::thread::spawn(move || {
            if let Err(err) = relay_one(client, bind) {
                eprintln!("agent relay: {err:#}");
            }
        });
    }
    Ok(())
}

fn relay_one(mut client: TcpStream, bind: Option<std::net::IpAddr>) -> Result<()> {
    let orig = original_dst(&client);
    let target: SocketAddr = match orig.parse() {
        Ok(target) => target,
        Err(_) => {
            writeln!(client, "no original destination ({orig})")?;
            return Ok(());
        }
    };
    let upstream = match bound_stream(target, bind) {
        Ok(upstream) => upstream,
        Err(err) => {
            writeln!(client, "{orig} upstream error: {}", err.kind())?;
            return Ok(());
        }
    };
    write!(client, "{orig} ")?;
    let (mut from_client, mut to_upstream) = (client.try_clone()?, upstream.try_clone()?);
    let (mut from_upstream, mut to_client) = (upstream, client);
    let up = std::thread::spawn(move || {
        let _ = std::io::copy(&mut from_client, &mut to_upstream);
        let _ = to_upstream.shutdown(std::net::Shutdown::Write);
    });
    let _ = std::io::copy(&mut from_upstream, &mut to_client);
    let _ = to_client.shutdown(std::net::Shutdown::Write);
    let _ = up.join();
    Ok(())
}

/// Exits on SIGTERM and SIGINT: as PID 1 of a container (the pod test
/// runs agents there) a process ignores every signal it has no handler
/// for, and the container would only stop when killed.
fn exit_on_term() {
    extern "C" fn exit_now(_: libc::c_int) {
        // SAFETY: _exit is async-signal-safe.
        unsafe { libc::_exit(0) }
    }
    let handler = exit_now as extern "C" fn(libc::c_int) as libc::sighandler_t;
    // SAFETY: installing an async-signal-safe handler.
    unsafe {
        libc::signal(libc::SIGTERM, handler);
        libc::signal(libc::SIGINT, handler);
    }
}

/// Sleeps until SIGTERM or SIGINT (see [`exit_on_term`]).
fn pause() -> Result<()> {
    loop {
        // SAFETY: pause has no preconditions.
        unsafe { libc::pause() };
    }
}

/// CPU time (user and system) this process has used, in seconds. The
/// kernel work of a loopback connection (both ends' TCP, the eBPF
/// programs, iptables) runs mostly in the sender's context, so it is
/// charged here; time stolen by other tenants of the machine is not.
fn cpu_seconds() -> f64 {
    let mut usage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
    // SAFETY: a valid buffer of the right type.
    if unsafe { libc::getrusage(libc::RUSAGE_SELF, usage.as_mut_ptr()) } != 0 {
        return f64::NAN;
    }
    // SAFETY: getrusage succeeded and filled it.
    let usage = unsafe { usage.assume_init() };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// Times `count` sequential connections to `to` (see the module docs).
fn bench(to: SocketAddr, count: usize, request: bool) -> serde_json::Value {
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0u64;
    let mut first_reply = None;
    let mut buf = Vec::with_capacity(512);
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    for _ in 0..count {
        let began = Instant::now();
        buf.clear();
        let done = TcpStream::connect(to).and_then(|mut stream| {
            if request {
                stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
            }
            stream.read_to_end(&mut buf)
        });
        match done {
            Ok(_) => {
                latencies.push(began.elapsed());
                if first_reply.is_none() {
                    let text = String::from_utf8_lossy(&buf);
                    first_reply = Some(text.lines().next().unwrap_or("").to_owned());
                }
            }
            Err(_) => errors += 1,
        }
    }
    let secs = start.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let percentile = |p: usize| {
        latencies
            .get((latencies.len() * p / 100).min(latencies.len().saturating_sub(1)))
            .map_or(0.0, |d| d.as_secs_f64() * 1e6)
    };
    let cpu = cpu_seconds() - cpu_before;
    serde_json::json!({
        "count": latencies.len(),
        "errors": errors,
        "secs": secs,
        "cpu_secs": cpu,
        "p50_us": percentile(50),
        "p99_us": percentile(99),
        "reply": first_reply.unwrap_or_default(),
    })
}

/// When a connect loop stops early (besides its count).
struct Stop<'a> {
    after: Option<Duration>,
    file: Option<&'a std::path::Path>,
}

fn connect(to: SocketAddr, count: u64, stop: &Stop<'_>, peer: bool) -> Tally {
    let start = Instant::now();
    let mut tally = Tally::default();
    for _ in 0..count {
        if stop.after.is_some_and(|d| start.elapsed() >= d)
            || stop.file.is_some_and(std::path::Path::exists)
        {
            break;
        }
        let outcome = once(to, peer).unwrap_or_else(|err| format!("error: {}", err.kind()));
        *tally.0.entry(outcome).or_default() += 1;
    }
    tally
}

fn once(to: SocketAddr, peer: bool) -> std::io::Result<String> {
    let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    let peer = if peer {
        format!("peer={} ", stream.peer_addr()?)
    } else {
        String::new()
    };
    Ok(format!("{peer}{}", read_reply(stream)?))
}

/// One connection to `to` from a socket bound to `bind` (port 0), if given.
fn bound_once(to: SocketAddr, bind: Option<std::net::IpAddr>) -> std::io::Result<String> {
    if bind.is_none() {
        return once(to, false);
    }
    read_reply(bound_stream(to, bind)?)
}

/// A connection to `to` from a socket bound to `bind` (any port), or from
/// an unbound one.
fn bound_stream(to: SocketAddr, bind: Option<std::net::IpAddr>) -> std::io::Result<TcpStream> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    if let Some(bind) = bind {
        socket.bind(&SocketAddr::new(bind, 0).into())?;
    }
    socket.connect_timeout(&to.into(), IO_TIMEOUT)?;
    Ok(socket.into())
}

fn read_reply(mut stream: TcpStream) -> std::io::Result<String> {
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    let mut reply = String::new();
    stream.read_to_string(&mut reply)?;
    Ok(reply.trim().to_owned())
}

fn check(
    targets: &[SocketAddr],
    count: usize,
    concurrent: bool,
    direct: Option<SocketAddr>,
) -> Tally {
    let mut tally = Tally::default();
    if targets.is_empty() {
        return tally;
    }
    let mut judge = |target: SocketAddr, reply: std::io::Result<String>| {
        let is_direct = Some(target) == direct;
        let outcome = match reply {
            Ok(reply) if is_direct && reply.starts_with("error: ") => "direct-ok".to_owned(),
            Ok(reply) if is_direct && reply.parse::<SocketAddr>().is_ok() => "stale".to_owned(),
            Ok(reply) if reply == target.to_string() => "ok".to_owned(),
            Ok(reply) if reply.parse::<SocketAddr>().is_ok() => "mixup".to_owned(),
            Ok(reply) => reply,
            Err(err) => format!("error: {}", err.kind()),
        };
        *tally.0.entry(outcome).or_default() += 1;
    };
    let target = |i: usize| match direct {
        Some(direct) if i % 2 == 1 => direct,
        _ => targets[(i / if direct.is_some() { 2 } else { 1 }) % targets.len()],
    };
    if concurrent {
        let open: Vec<_> = (0..count)
            .map(|i| {
                (
                    target(i),
                    TcpStream::connect_timeout(&target(i), IO_TIMEOUT),
                )
            })
            .collect();
        for (to, stream) in open {
            judge(to, stream.and_then(read_reply));
        }
    } else {
        for i in 0..count {
            let to = target(i);
            judge(
                to,
                TcpStream::connect_timeout(&to, IO_TIMEOUT).and_then(read_reply),
            );
        }
    }
    tally
}

fn sockopts(to: SocketAddr) -> Result<()> {
    let fresh = Socket::new(Domain::IPV4, Type::STREAM, None)?;
    println!("SO_RCVBUF {}", fresh.recv_buffer_size()?);
    // struct tcp_info up to tcpi_last_data_sent (44 bytes): everything
    // before the fields that count time since the socket's creation.
    let mut info = [0u8; 256];
    let mut len = info.len() as libc::socklen_t;
    // SAFETY: valid buffer and length for getsockopt.
    let rc = unsafe {
        libc::getsockopt(
            std::os::fd::AsRawFd::as_raw_fd(&fresh),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if rc != 0 {
        bail!("TCP_INFO: {}", std::io::Error::last_os_error());
    }
    let head: String = info[..44].iter().map(|b| format!("{b:02x}")).collect();
    println!("TCP_INFO len={len} head={head}");
    let stream = TcpStream::connect_timeout(&to, IO_TIMEOUT)?;
    println!("SO_ORIGINAL_DST {}", original_dst(&stream));
    Ok(())
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
