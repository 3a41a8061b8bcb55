//! The sandbox agent: the small clients and servers that run as processes
//! inside a sandbox (an app that connects, a proxy that reads
//! `SO_ORIGINAL_DST`, a listener that tells who it is).
//!
//! It is an executable entry point ([`main`]) so that it can run in the
//! pod's cgroup as any UID, which a thread of the test process cannot.
//!
//! ```text
//! agent [--uid U --gid G] serve --listen IP:PORT[,IP:PORT...] --reply TEXT [--report original-dst|peer] [--http] [--transparent] [--reuseport] [--fastopen]
//!     listen, print "ready", answer every connection with one line: TEXT,
//!     or what the accepted socket reports (its SO_ORIGINAL_DST, read as a
//!     transparent proxy does, or its peer address); --http wraps it in an
//!     HTTP/1.1 response after reading the request head; --transparent sets
//!     IP_TRANSPARENT on the listener (what a TPROXY listener needs);
//!     --fastopen sets TCP_FASTOPEN on it (a SYN with data is accepted);
//!     --report observe: read the one byte an `observe` client sends, then
//!     answer "TEXT peer=<peer> local=<local address> odst=<SO_ORIGINAL_DST
//!     or errno name>"
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
//!     (the proxy, not redirected) and must get conntrack's answer for it,
//!     its own destination: "direct-ok", or "stale" when some earlier
//!     connection's record answers
//! agent [...] each --to IP:PORT[,IP:PORT...] [--bind IP]
//!     one connection to each target in turn (from a socket bound to IP,
//!     when given), printing "<target>\t<reply or error>" per target
//! agent [...] relay --listen IP:PORT [--bind IP]
//!     a transparent proxy: for each connection, read its SO_ORIGINAL_DST,
//!     connect there (from a socket bound to IP, e.g. Istio's inbound
//!     passthrough source 127.0.0.6), send the client "<original dst> ",
//!     then copy bytes both ways until a side closes
//! agent [...] bench --to IP:PORT --count N [--request|--dns]
//!     N sequential connections (connect, optionally send an HTTP GET, read
//!     the reply to its end, close), or with --dns N UDP queries as a libc
//!     resolver makes them (a new socket, connect, send, receive the
//!     answer, close), each timed; prints one JSON object:
//!     count, errors, secs, cpu_secs (this process's CPU time), p50_us,
//!     p99_us, and the first reply's first line
//! agent [...] dns-serve --listen IP:PORT --reply NAME
//!     a DNS stand-in on UDP and TCP (see [`crate::dns`])
//! agent [...] dns-query --to IP:PORT --how sendto|connected|tcp [--family6] [--bind IP]
//!     one query, and what the app observed of it (see [`crate::dns::query`])
//! agent [...] invalid-segment --to IP:PORT
//!     connect, send a segment conntrack calls INVALID into the connection
//!     (see [`crate::segment`]), then one byte; print `answer=<the
//!     server's line>` or `reset=<errno>`
//! agent pause
//!     sleep until SIGTERM or SIGINT (a pod's infra container, as pause is)
//! agent [...] fastopen --to IP:PORT
//!     one HTTP request with TCP_FASTOPEN_CONNECT (the request rides in the
//!     SYN), printing the response's last line
//! agent [...] sockopts --to IP:PORT
//!     print getsockopt answers that must not depend on capture: SO_RCVBUF
//!     and the stable head of TCP_INFO of a fresh socket, and
//!     SO_ORIGINAL_DST of a connection to IP:PORT
//! agent [...] observe [--parallel N] [--timeout-ms T] [--read-timeout-ms R]
//!     read connection specs from stdin, one a line (see [`Spec`]: e.g.
//!     "to=198.18.0.2:80 family=6 bind=127.0.0.6 dev=lo mode=fastopen
//!     cred=1000/1337:1000/1000:-"),
//!     make each (up to N at a time, those with a fixed source port one
//!     after the other in order; connect may take T ms, default 2000, and
//!     each read R ms, default T) and print one observation line per
//!     spec, in the order read (see [`observe_one`]): what the app sees of
//!     its own socket, then "| " and what the server answered (a server
//!     started with --report observe)
//! ```
//!
//! `--groups G1,G2` next to `--uid`/`--gid` sets the supplementary groups
//! the agent keeps (none by default).

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
    let groups = args
        .opt("--groups")?
        .map(|list| {
            list.split(',')
                .filter(|g| !g.is_empty())
                .map(str::parse)
                .collect::<Result<Vec<libc::gid_t>, _>>()
        })
        .transpose()?
        .unwrap_or_default();
    if let (Some(uid), Some(gid)) = (uid, gid) {
        drop_privileges(uid.parse()?, gid.parse()?, &groups)?;
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
                Some("observe") => Reply::Observe(args.req("--reply")?.to_owned()),
                Some(other) => bail!("unknown --report {other}"),
            };
            let options = ListenOptions {
                transparent: args.flag("--transparent"),
                reuse_port: args.flag("--reuseport"),
                fast_open: args.flag("--fastopen"),
            };
            serve(&listen, &reply, args.flag("--http"), options)
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
        Some("fastopen") => {
            println!("{}", fast_open_request(args.req("--to")?.parse()?)?);
            Ok(())
        }
        Some("pause") => pause(),
        Some("bench") => {
            let to: SocketAddr = args.req("--to")?.parse()?;
            let count: usize = args.req("--count")?.parse()?;
            let kind = match (args.flag("--request"), args.flag("--dns")) {
                (false, false) => BenchKind::Connect,
                (true, false) => BenchKind::Request,
                (false, true) => BenchKind::Dns,
                (true, true) => bail!("--request and --dns exclude each other"),
            };
            println!("{}", bench(to, count, kind));
            Ok(())
        }
        Some("observe") => {
            let parallel: usize = args.opt("--parallel")?.unwrap_or("1").parse()?;
            let timeout: u64 = args.opt("--timeout-ms")?.unwrap_or("2000").parse()?;
            let read: u64 = match args.opt("--read-timeout-ms")? {
                Some(read) => read.parse()?,
                None => timeout,
            };
            let ms = |t: u64| Duration::from_millis(t.clamp(10, 60_000));
            observe(
                parallel.clamp(1, 64),
                Timeouts {
                    connect: ms(timeout),
                    read: ms(read),
                },
            )
        }
        Some("dns-serve") => {
            crate::dns::serve(args.req("--listen")?.parse()?, args.req("--reply")?)
        }
        Some("dns-query") => {
            let to = args.req("--to")?.parse()?;
            let how = args.req("--how")?.parse()?;
            let family6 = args.flag("--family6");
            let bind = args.opt("--bind")?.map(str::parse).transpose()?;
            println!("{}", crate::dns::query(to, how, family6, bind));
            Ok(())
        }
        Some("invalid-segment") => {
            let to = args.req("--to")?.parse()?;
            println!("{}", crate::segment::invalid_segment(to, IO_TIMEOUT)?);
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

fn drop_privileges(uid: u32, gid: u32, groups: &[libc::gid_t]) -> Result<()> {
    // SAFETY: plain system calls on this single-threaded process; the
    // group list is a valid array of its length.
    unsafe {
        if libc::setgroups(groups.len(), groups.as_ptr()) != 0
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
    /// What the `observe` command compares: TEXT, the peer address, the
    /// local address and SO_ORIGINAL_DST (after reading the client's byte).
    Observe(String),
}

impl Reply {
    fn for_stream(&self, stream: &TcpStream) -> String {
        match self {
            Self::Text(text) => text.clone(),
            Self::OriginalDst => original_dst(stream),
            Self::Peer => stream
                .peer_addr()
                .map_or_else(|e| format!("error: {}", e.kind()), |a| a.to_string()),
            Self::Observe(text) => {
                let sock = SockRef::from(stream);
                let mut seen = format!(
                    "{text} peer={} local={} odst={}",
                    addr_or_errno(sock.peer_addr()),
                    addr_or_errno(sock.local_addr()),
                    addr_or_errno(sock.original_dst_v4()),
                );
                // An AF_INET6 socket: what IP6T_SO_ORIGINAL_DST answers too.
                if stream.local_addr().is_ok_and(|a| a.is_ipv6()) {
                    seen.push_str(&format!(" odst6={}", addr_or_errno(sock.original_dst_v6())));
                }
                seen
            }
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
/// How `serve` sets up its listening sockets.
#[derive(Clone, Copy)]
struct ListenOptions {
    /// `IP_TRANSPARENT`, as Envoy's listeners in TPROXY mode.
    transparent: bool,
    /// `SO_REUSEPORT`, as Envoy's per-worker listeners.
    reuse_port: bool,
    /// `TCP_FASTOPEN`: a SYN carrying data establishes the accepted socket.
    fast_open: bool,
}

fn serve(listen: &[SocketAddr], reply: &Reply, http: bool, options: ListenOptions) -> Result<()> {
    let mut listeners = Vec::new();
    for addr in listen {
        let socket = Socket::new(Domain::for_address(*addr), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        if options.reuse_port {
            socket.set_reuse_port(true)?;
        }
        if options.transparent {
            socket
                .set_ip_transparent_v4(true)
                .context("IP_TRANSPARENT (needs CAP_NET_ADMIN)")?;
        }
        socket
            .bind(&(*addr).into())
            .with_context(|| format!("binding {addr}"))?;
        if options.fast_open {
            set_int_option(&socket, libc::TCP_FASTOPEN, 64).context("TCP_FASTOPEN")?;
        }
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
    if let Reply::Observe(_) = reply {
        return answer_observed(listener, reply);
    }
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

/// What one `bench` iteration is.
#[derive(Clone, Copy, PartialEq, Eq)]
enum BenchKind {
    /// A TCP connection: connect, read the reply to its end, close.
    Connect,
    /// The same with an HTTP GET sent first.
    Request,
    /// A UDP query over a fresh connected socket, and its answer.
    Dns,
}

/// One DNS-stand-in query as a libc resolver sends it; the answer is
/// appended to `buf`.
fn dns_round_trip(to: SocketAddr, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let any: SocketAddr = if to.is_ipv4() {
        (std::net::Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (std::net::Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let socket = std::net::UdpSocket::bind(any)?;
    socket.set_read_timeout(Some(IO_TIMEOUT))?;
    socket.connect(to)?;
    socket.send(b"bench query")?;
    let mut answer = [0u8; 512];
    let n = socket.recv(&mut answer)?;
    buf.extend_from_slice(&answer[..n]);
    Ok(())
}

/// Times `count` sequential connections (or queries) to `to` (see the
/// module docs).
fn bench(to: SocketAddr, count: usize, kind: BenchKind) -> serde_json::Value {
    let mut latencies = Vec::with_capacity(count);
    let mut errors = 0u64;
    let mut first_reply = None;
    let mut buf = Vec::with_capacity(512);
    let cpu_before = cpu_seconds();
    let start = Instant::now();
    for _ in 0..count {
        let began = Instant::now();
        buf.clear();
        let done = if kind == BenchKind::Dns {
            dns_round_trip(to, &mut buf)
        } else {
            TcpStream::connect(to).and_then(|mut stream| {
                if kind == BenchKind::Request {
                    stream.write_all(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")?;
                }
                stream.read_to_end(&mut buf).map(drop)
            })
        };
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
        // A failure after the connect is told apart (the reply's read),
        // so that a rare reset says where it came.
        let outcome = match TcpStream::connect_timeout(&to, IO_TIMEOUT) {
            Err(err) => format!("error: {}", err.kind()),
            Ok(stream) => reply_of(stream, peer)
                .unwrap_or_else(|err| format!("error: {} (after connect)", err.kind())),
        };
        *tally.0.entry(outcome).or_default() += 1;
    }
    tally
}

fn once(to: SocketAddr, peer: bool) -> std::io::Result<String> {
    reply_of(TcpStream::connect_timeout(&to, IO_TIMEOUT)?, peer)
}

/// What the server of a connected `stream` answers (after its own peer
/// address, with `peer`).
fn reply_of(stream: TcpStream, peer: bool) -> std::io::Result<String> {
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
            // Conntrack's answer for a connection that was not redirected:
            // its own destination, the proxy itself.
            Ok(reply) if is_direct && reply == target.to_string() => "direct-ok".to_owned(),
            Ok(reply) if is_direct && reply.parse::<SocketAddr>().is_ok() => {
                format!("stale {reply}")
            }
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

/// Sets an `IPPROTO_TCP` option that takes an int.
fn set_int_option(socket: &Socket, name: libc::c_int, value: libc::c_int) -> Result<()> {
    // SAFETY: a valid socket and a pointer to an int of the length given.
    let rc = unsafe {
        libc::setsockopt(
            std::os::fd::AsRawFd::as_raw_fd(socket),
            libc::IPPROTO_TCP,
            name,
            (&raw const value).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// One HTTP request to `to` with `TCP_FASTOPEN_CONNECT`: the request goes
/// in the SYN (when the namespace's `tcp_fastopen` allows it without a
/// cookie). Returns the response's last line.
fn fast_open_request(to: SocketAddr) -> Result<String> {
    let socket = Socket::new(Domain::for_address(to), Type::STREAM, None)?;
    set_int_option(&socket, libc::TCP_FASTOPEN_CONNECT, 1).context("TCP_FASTOPEN_CONNECT")?;
    socket.connect(&to.into())?;
    let mut stream = TcpStream::from(socket);
    stream.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
    let reply = read_reply(stream)?;
    Ok(reply.lines().last().unwrap_or_default().to_owned())
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

/// How long a server answering `observe` clients waits for their byte.
const OBSERVE_TIMEOUT: Duration = Duration::from_secs(2);

/// At most this many specs are read by one `observe` run.
const OBSERVE_MAX_SPECS: usize = 100_000;

/// How an `observe` connection is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConnectMode {
    /// connect(2) on a blocking socket (SO_SNDTIMEO: the timeout).
    Block,
    /// connect(2) on a non-blocking socket, then poll(2) and SO_ERROR.
    Nonblock,
    /// TCP fast open: sendto(2) with MSG_FASTOPEN carrying the one byte.
    Fastopen,
    /// A UDP socket's connect(2), then send(2) of one byte; to port 53
    /// (a DNS stand-in, [`crate::dns`]) the answer is read too.
    Udp,
    /// An unconnected UDP socket's sendto(2) of one byte, and to port 53
    /// the answer's recvfrom(2).
    Sendto,
}

impl ConnectMode {
    pub const ALL: [Self; 5] = [
        Self::Block,
        Self::Nonblock,
        Self::Fastopen,
        Self::Udp,
        Self::Sendto,
    ];

    fn name(self) -> &'static str {
        match self {
            Self::Block => "block",
            Self::Nonblock => "nonblock",
            Self::Fastopen => "fastopen",
            Self::Udp => "udp",
            Self::Sendto => "sendto",
        }
    }
}

/// The device an `observe` socket is bound to (SO_BINDTODEVICE).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    None,
    Lo,
    Eth0,
}

impl Device {
    pub const ALL: [Self; 3] = [Self::None, Self::Lo, Self::Eth0];

    fn name(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Lo => "lo",
            Self::Eth0 => "eth0",
        }
    }
}

/// Credentials of the thread making an `observe` connection: real and
/// effective user and group ids and up to four supplementary groups.
/// Written `RUID/EUID:RGID/EGID:G1,G2` (`-` for no groups). Only an agent
/// running as root can take them (per thread, keeping the saved uid 0 to
/// return).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Cred {
    pub ruid: u32,
    pub euid: u32,
    pub rgid: u32,
    pub egid: u32,
    groups: [u32; 4],
    n_groups: usize,
}

impl Cred {
    pub fn new(uid: (u32, u32), gid: (u32, u32), groups: &[u32]) -> Self {
        let mut cred = Self {
            ruid: uid.0,
            euid: uid.1,
            rgid: gid.0,
            egid: gid.1,
            groups: [0; 4],
            n_groups: groups.len().min(4),
        };
        cred.groups[..cred.n_groups].copy_from_slice(&groups[..cred.n_groups]);
        cred
    }

    pub fn groups(&self) -> &[u32] {
        &self.groups[..self.n_groups]
    }

    /// Takes these credentials on the calling thread only (raw system
    /// calls: the C library's wrappers would change every thread's).
    fn take(&self) -> std::io::Result<()> {
        let check = |rc: libc::c_long| {
            if rc == 0 {
                Ok(())
            } else {
                Err(std::io::Error::last_os_error())
            }
        };
        let keep = libc::c_long::from(-1i32);
        // SAFETY: credential system calls with valid arguments; the group
        // array outlives the call.
        unsafe {
            // Back to an effective root first (the saved uid is 0).
            check(libc::syscall(libc::SYS_setresuid, keep, 0, keep))?;
            check(libc::syscall(
                libc::SYS_setgroups,
                self.n_groups,
                self.groups.as_ptr(),
            ))?;
            check(libc::syscall(libc::SYS_setresgid, self.rgid, self.egid, 0))?;
            check(libc::syscall(libc::SYS_setresuid, self.ruid, self.euid, 0))
        }
    }

    /// Root again on the calling thread (after [`Cred::take`]).
    fn drop_back() {
        let keep = libc::c_long::from(-1i32);
        // SAFETY: as in `take`; the saved uid 0 allows it.
        unsafe {
            libc::syscall(libc::SYS_setresuid, keep, 0, keep);
            libc::syscall(libc::SYS_setresuid, 0, 0, 0);
            libc::syscall(libc::SYS_setresgid, 0, 0, 0);
            libc::syscall(libc::SYS_setgroups, 0, std::ptr::null::<u32>());
        }
    }
}

impl std::fmt::Display for Cred {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let groups: Vec<String> = self.groups().iter().map(u32::to_string).collect();
        write!(
            f,
            "{}/{}:{}/{}:{}",
            self.ruid,
            self.euid,
            self.rgid,
            self.egid,
            if groups.is_empty() {
                "-".to_owned()
            } else {
                groups.join(",")
            }
        )
    }
}

impl std::str::FromStr for Cred {
    type Err = anyhow::Error;

    fn from_str(text: &str) -> Result<Self> {
        let pair = |part: &str| -> Result<(u32, u32)> {
            Ok(match part.split_once('/') {
                Some((r, e)) => (r.parse()?, e.parse()?),
                None => (part.parse()?, part.parse()?),
            })
        };
        let mut parts = text.split(':');
        let uid = pair(parts.next().context("no uid")?)?;
        let gid = pair(parts.next().context("no gid")?)?;
        let groups = match parts.next() {
            None | Some("-") => Vec::new(),
            Some(list) => list
                .split(',')
                .map(str::parse)
                .collect::<Result<Vec<u32>, _>>()?,
        };
        if groups.len() > 4 || parts.next().is_some() {
            bail!("bad credentials {text:?}");
        }
        Ok(Self::new(uid, gid, &groups))
    }
}

/// One connection of the `observe` command, written (and read) as
/// `to=IP:PORT family=4|6 bind=none|IP dev=none|lo|eth0
/// mode=block|nonblock|fastopen|udp|sendto [cred=C] [then=C] [sport=N]`.
/// `family=6` is an AF_INET6 socket connecting to the v4-mapped address
/// (`to` an IPv6 address, `[IP]:PORT`, is always an AF_INET6 socket's);
/// `bind` binds the source address (port 0) first; `dev` sets
/// SO_BINDTODEVICE; `cred` are the credentials ([`Cred`]) the socket is
/// made with and `then` those it connects with (default: the agent's own);
/// `sport=N` binds source port N (and the `bind` address, or any), with
/// SO_REUSEADDR, so that connections can share a 4-tuple in turn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Spec {
    pub to: SocketAddr,
    pub family6: bool,
    pub bind: Option<std::net::IpAddr>,
    pub dev: Device,
    pub mode: ConnectMode,
    pub cred: Option<Cred>,
    pub then: Option<Cred>,
    /// The source port to bind (with SO_REUSEADDR), 0 for an ephemeral one.
    pub sport: u16,
}

impl Spec {
    /// A blocking TCP connection to `to` from an unbound socket (AF_INET
    /// for an IPv4 address).
    pub fn to(to: impl Into<SocketAddr>) -> Self {
        let to = to.into();
        Self {
            to,
            family6: to.is_ipv6(),
            bind: None,
            dev: Device::None,
            mode: ConnectMode::Block,
            cred: None,
            then: None,
            sport: 0,
        }
    }
}

impl std::fmt::Display for Spec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "to={} family={} bind={} dev={} mode={}",
            self.to,
            if self.family6 || self.to.is_ipv6() {
                6
            } else {
                4
            },
            self.bind
                .map_or_else(|| "none".to_owned(), |ip| ip.to_string()),
            self.dev.name(),
            self.mode.name()
        )?;
        if let Some(cred) = self.cred {
            write!(f, " cred={cred}")?;
        }
        if let Some(then) = self.then {
            write!(f, " then={then}")?;
        }
        if self.sport != 0 {
            write!(f, " sport={}", self.sport)?;
        }
        Ok(())
    }
}

impl std::str::FromStr for Spec {
    type Err = anyhow::Error;

    fn from_str(line: &str) -> Result<Self> {
        let mut spec = Self::to(std::net::SocketAddrV4::new(
            std::net::Ipv4Addr::UNSPECIFIED,
            0,
        ));
        spec.family6 = false;
        let mut to = None;
        for field in line.split_whitespace() {
            let (key, value) = field
                .split_once('=')
                .with_context(|| format!("{field:?} is not KEY=VALUE"))?;
            match (key, value) {
                ("to", v) => to = Some(v.parse().with_context(|| format!("to={v}"))?),
                ("family", "4") => spec.family6 = false,
                ("family", "6") => spec.family6 = true,
                ("bind", "none") => spec.bind = None,
                ("bind", v) => spec.bind = Some(v.parse().with_context(|| format!("bind={v}"))?),
                ("dev", v) => {
                    spec.dev = Device::ALL
                        .into_iter()
                        .find(|d| d.name() == v)
                        .with_context(|| format!("unknown dev={v}"))?;
                }
                ("mode", v) => {
                    spec.mode = ConnectMode::ALL
                        .into_iter()
                        .find(|m| m.name() == v)
                        .with_context(|| format!("unknown mode={v}"))?;
                }
                ("cred", v) => spec.cred = Some(v.parse()?),
                ("then", v) => spec.then = Some(v.parse()?),
                ("sport", v) => spec.sport = v.parse().with_context(|| format!("sport={v}"))?,
                _ => bail!("unknown field {field:?}"),
            }
        }
        spec.to = to.context("to= is required")?;
        Ok(spec)
    }
}

/// The name of an errno (`ECONNREFUSED`), or `errno<N>`.
pub fn errno_name(err: &std::io::Error) -> String {
    let Some(code) = err.raw_os_error() else {
        return format!("{:?}", err.kind());
    };
    let name = match code {
        libc::EPERM => "EPERM",
        libc::ENOENT => "ENOENT",
        libc::EINTR => "EINTR",
        libc::EBADF => "EBADF",
        libc::EAGAIN => "EAGAIN",
        libc::EACCES => "EACCES",
        libc::EFAULT => "EFAULT",
        libc::ENODEV => "ENODEV",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::ENOPROTOOPT => "ENOPROTOOPT",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::ENETDOWN => "ENETDOWN",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ECONNRESET => "ECONNRESET",
        libc::EISCONN => "EISCONN",
        libc::ENOTCONN => "ENOTCONN",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::EALREADY => "EALREADY",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::ENOBUFS => "ENOBUFS",
        libc::EMSGSIZE => "EMSGSIZE",
        _ => return format!("errno{code}"),
    };
    name.to_owned()
}

/// An address as text (`[::ffff:a.b.c.d]:p` for v4-mapped ones), with the
/// port written `eph` when `mask` says so.
fn addr_text(addr: &socket2::SockAddr, mask: bool) -> String {
    match addr.as_socket() {
        Some(a) if mask => match a {
            SocketAddr::V4(a) => format!("{}:eph", a.ip()),
            SocketAddr::V6(a) => format!("[{}]:eph", a.ip()),
        },
        Some(a) => a.to_string(),
        None => "not-inet".to_owned(),
    }
}

/// An address as text, or the errno name of the call that did not give one.
fn addr_or_errno(addr: std::io::Result<socket2::SockAddr>) -> String {
    addr.map_or_else(|e| errno_name(&e), |a| addr_text(&a, false))
}

/// `text` with every `:PORT` (not followed by another digit) written `:eph`.
fn mask_port(text: &str, port: u16) -> String {
    let needle = format!(":{port}");
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(i) = rest.find(&needle) {
        let after = &rest[i + needle.len()..];
        out.push_str(&rest[..i]);
        if after.starts_with(|c: char| c.is_ascii_digit()) {
            out.push_str(&needle);
        } else {
            out.push_str(":eph");
        }
        rest = after;
    }
    out.push_str(rest);
    out
}

/// The socket address of `ip:port` for a socket of the spec's family (the
/// v4-mapped address for AF_INET6).
fn spec_addr(ip: std::net::IpAddr, port: u16, family6: bool) -> socket2::SockAddr {
    match ip {
        std::net::IpAddr::V4(ip) if family6 => {
            SocketAddr::V6(std::net::SocketAddrV6::new(ip.to_ipv6_mapped(), port, 0, 0)).into()
        }
        ip => SocketAddr::new(ip, port).into(),
    }
}

/// Waits (at most `timeout`) for a non-blocking connect to finish: `ok`,
/// the errno name SO_ERROR holds, or `timeout`.
fn finish_connect(socket: &Socket, timeout: Duration) -> String {
    let mut fd = libc::pollfd {
        fd: std::os::fd::AsRawFd::as_raw_fd(socket),
        events: libc::POLLOUT,
        revents: 0,
    };
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        // SAFETY: one valid pollfd.
        let n = unsafe { libc::poll(&mut fd, 1, left.as_millis() as libc::c_int) };
        if n > 0 {
            break;
        }
        if n == 0 || left.is_zero() {
            return "timeout".to_owned();
        }
        let err = std::io::Error::last_os_error();
        if err.raw_os_error() != Some(libc::EINTR) {
            return format!("poll-{}", errno_name(&err));
        }
    }
    match socket.take_error() {
        Ok(None) => "ok".to_owned(),
        Ok(Some(err)) | Err(err) => errno_name(&err),
    }
}

/// How long an `observe` connection may take to connect (what nothing
/// answers reads as a timeout), and then to be answered (every server
/// answers at once, so only a busy machine comes near it).
#[derive(Clone, Copy, Debug)]
pub struct Timeouts {
    pub connect: Duration,
    pub read: Duration,
}

/// Makes the connection `spec` describes and says what the app sees: how
/// connect (or sendto) ended, then on success `local=` (getsockname, the
/// ephemeral port written `eph`), `peer=` (getpeername), `odst=`
/// (SO_ORIGINAL_DST at SOL_IP) and for AF_INET6 sockets `odst6=` (at
/// SOL_IPV6), then `| ` and the server's answer with the same port masked
/// (UDP: the result of sending one byte, and no answer). With `cred`, the
/// socket is made under those credentials, and connected under `then`
/// (or `cred`); the thread is root again afterwards.
pub fn observe_one(spec: &Spec, timeouts: Timeouts) -> String {
    let seen = match spec.cred.or(spec.then) {
        Some(cred) => match cred.take() {
            Ok(()) => connect_observed(spec, timeouts),
            Err(err) => format!("cred={}", errno_name(&err)),
        },
        None => connect_observed(spec, timeouts),
    };
    if spec.cred.is_some() || spec.then.is_some() {
        Cred::drop_back();
    }
    seen
}

fn connect_observed(spec: &Spec, timeouts: Timeouts) -> String {
    let timeout = timeouts.connect;
    let family6 = spec.family6 || spec.to.is_ipv6();
    let domain = if family6 { Domain::IPV6 } else { Domain::IPV4 };
    let udp = matches!(spec.mode, ConnectMode::Udp | ConnectMode::Sendto);
    let kind = if udp { Type::DGRAM } else { Type::STREAM };
    let socket = match Socket::new(domain, kind, None) {
        Ok(socket) => socket,
        Err(err) => return format!("socket={}", errno_name(&err)),
    };
    if let (Some(_), Some(then)) = (spec.cred, spec.then)
        && let Err(err) = then.take()
    {
        return format!("then={}", errno_name(&err));
    }
    if family6
        && spec.to.is_ipv4()
        && let Err(err) = socket.set_only_v6(false)
    {
        return format!("v6only={}", errno_name(&err));
    }
    if spec.dev != Device::None
        && let Err(err) = socket.bind_device(Some(spec.dev.name().as_bytes()))
    {
        return format!("bindtodevice={}", errno_name(&err));
    }
    if spec.sport != 0
        && let Err(err) = socket.set_reuse_address(true)
    {
        return format!("reuseaddr={}", errno_name(&err));
    }
    if spec.bind.is_some() || spec.sport != 0 {
        let ip = spec.bind.unwrap_or(std::net::Ipv4Addr::UNSPECIFIED.into());
        let addr = if family6 && ip.is_unspecified() {
            SocketAddr::new(std::net::Ipv6Addr::UNSPECIFIED.into(), spec.sport).into()
        } else {
            spec_addr(ip, spec.sport, family6)
        };
        if let Err(err) = socket.bind(&addr) {
            return format!("bind={}", errno_name(&err));
        }
    }
    let _ = socket.set_read_timeout(Some(timeout));
    let _ = socket.set_write_timeout(Some(timeout));
    let to = spec_addr(spec.to.ip(), spec.to.port(), family6);
    let connected = match spec.mode {
        ConnectMode::Block | ConnectMode::Udp => match socket.connect(&to) {
            Ok(()) if udp => "udp-connect=ok".to_owned(),
            Ok(()) => "connect=ok".to_owned(),
            Err(err) if udp => return format!("udp-connect={}", errno_name(&err)),
            Err(err) => return format!("connect={}", errno_name(&err)),
        },
        ConnectMode::Nonblock => {
            if let Err(err) = socket.set_nonblocking(true) {
                return format!("nonblocking={}", errno_name(&err));
            }
            let done = match socket.connect(&to) {
                Ok(()) => "ok".to_owned(),
                Err(err) if err.raw_os_error() == Some(libc::EINPROGRESS) => {
                    format!("EINPROGRESS,{}", finish_connect(&socket, timeout))
                }
                Err(err) => return format!("connect={}", errno_name(&err)),
            };
            if !done.ends_with("ok") {
                return format!("connect={done}");
            }
            let _ = socket.set_nonblocking(false);
            format!("connect={done}")
        }
        ConnectMode::Sendto => match socket.send_to(b"x", &to) {
            Ok(_) => "udp-sendto=ok".to_owned(),
            Err(err) => return format!("udp-sendto={}", errno_name(&err)),
        },
        ConnectMode::Fastopen => match socket.send_to_with_flags(b"x", &to, libc::MSG_FASTOPEN) {
            Ok(n) => format!("sendto={n}"),
            Err(err) => return format!("sendto={}", errno_name(&err)),
        },
    };
    let local = socket.local_addr();
    let port = local
        .as_ref()
        .ok()
        .and_then(socket2::SockAddr::as_socket)
        .map_or(0, |a| a.port());
    let mut out = format!(
        "{connected} local={} peer={} odst={}",
        local.map_or_else(|e| errno_name(&e), |a| addr_text(&a, true)),
        addr_or_errno(socket.peer_addr()),
        addr_or_errno(socket.original_dst_v4()),
    );
    if family6 {
        out.push_str(&format!(
            " odst6={}",
            addr_or_errno(socket.original_dst_v6())
        ));
    }
    if udp {
        if spec.mode == ConnectMode::Udp {
            let sent = socket.send(b"x");
            out.push_str(&format!(
                " send={}",
                sent.map_or_else(|e| errno_name(&e), |n| n.to_string())
            ));
        }
        if spec.to.port() == 53 {
            // A stand-in answers at once; what has none here never will.
            out.push_str(&dns_answer(
                &socket,
                timeouts.read.min(Duration::from_secs(1)),
            ));
        }
        return mask_port(&out, port);
    }
    if spec.mode != ConnectMode::Fastopen
        && let Err(err) = socket.send(b"x")
    {
        out.push_str(&format!(" send={}", errno_name(&err)));
    }
    let _ = socket.set_read_timeout(Some(timeouts.read));
    let mut reply = Vec::new();
    let mut buf = [0u8; 512];
    // The answer is one line. Then a reset (SO_LINGER 0) ends the
    // connection on both sides: no TIME_WAIT, whose 4-tuple a later
    // connection could meet (the next mode's, or one from the same fixed
    // source port) and be delayed by.
    let read_error = loop {
        match (&socket).read(&mut buf) {
            Ok(0) => break None,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.contains(&b'\n') {
                    break None;
                }
                if reply.len() > 4096 {
                    break Some("too-long".to_owned());
                }
            }
            Err(err) if err.raw_os_error() == Some(libc::EINTR) => {}
            Err(err) => break Some(errno_name(&err)),
        }
    };
    let _ = socket.set_linger(Some(Duration::ZERO));
    if let Some(err) = read_error {
        out.push_str(&format!(" read={err}"));
    }
    let reply = String::from_utf8_lossy(&reply);
    let reply = reply.lines().next().unwrap_or("").trim();
    out.push_str(" | ");
    out.push_str(reply);
    // The ephemeral port wherever it shows (the server's peer address, a
    // wrong SO_ORIGINAL_DST naming the socket itself), so that
    // observations compare across runs.
    mask_port(&out, port)
}

/// The answer of a DNS stand-in to a UDP socket: ` from=<its source> |
/// <answer>`, or ` from=<errno>` without one.
fn dns_answer(socket: &Socket, timeout: Duration) -> String {
    let _ = socket.set_read_timeout(Some(timeout));
    match crate::dns::recv_answer(socket) {
        Ok((answer, from)) => format!(" from={} | {answer}", addr_text(&from, false)),
        Err(err) => format!(" from={}", errno_name(&err)),
    }
}

/// The `observe` command: specs from stdin, observations to stdout, in
/// order, `parallel` connections at a time.
fn observe(parallel: usize, timeouts: Timeouts) -> Result<()> {
    let lines: Vec<String> = std::io::stdin()
        .lock()
        .lines()
        .take(OBSERVE_MAX_SPECS)
        .collect::<Result<_, _>>()?;
    let specs: Vec<Result<Spec>> = lines.iter().map(|l| l.parse()).collect();
    // Connections from a fixed source port run one after the other, in
    // the order given (two at once could share a 4-tuple); the others
    // `parallel` at a time.
    let (fixed, free): (Vec<usize>, Vec<usize>) =
        (0..specs.len()).partition(|i| specs[*i].as_ref().is_ok_and(|s| s.sport != 0));
    let next = std::sync::atomic::AtomicUsize::new(0);
    let (tx, rx) = std::sync::mpsc::channel();
    let one = |i: usize| match &specs[i] {
        Ok(spec) => observe_one(spec, timeouts),
        Err(err) => format!("bad-spec {err:#}"),
    };
    std::thread::scope(|scope| {
        let (fixed_tx, fixed, one) = (tx.clone(), &fixed, &one);
        scope.spawn(move || {
            for i in fixed {
                if fixed_tx.send((*i, one(*i))).is_err() {
                    break;
                }
            }
        });
        for _ in 0..parallel.min(free.len()) {
            let (tx, next, free) = (tx.clone(), &next, &free);
            scope.spawn(move || {
                loop {
                    let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    let Some(i) = free.get(n) else { break };
                    if tx.send((*i, one(*i))).is_err() {
                        break;
                    }
                }
            });
        }
    });
    drop(tx);
    let mut seen = vec![String::new(); specs.len()];
    for (i, line) in rx {
        seen[i] = line;
    }
    let mut stdout = std::io::stdout().lock();
    for line in seen {
        writeln!(stdout, "{line}")?;
    }
    stdout.flush()?;
    Ok(())
}

/// Answers every connection `listener` accepts with what it observes (see
/// [`Reply::Observe`]): each on a thread of its own, which reads the
/// client's byte (at most [`OBSERVE_TIMEOUT`]), answers, and waits (as
/// long) for the client to close first, with a reset (see
/// [`observe_one`]), so that a client that sends nothing delays no other
/// and neither side keeps a TIME_WAIT.
fn answer_observed(listener: &TcpListener, reply: &Reply) {
    for stream in listener.incoming() {
        let Ok(mut stream) = stream else { continue };
        let text = reply.for_stream(&stream);
        std::thread::spawn(move || {
            let _ = stream.set_read_timeout(Some(OBSERVE_TIMEOUT));
            let _ = stream.set_write_timeout(Some(OBSERVE_TIMEOUT));
            let mut byte = [0u8; 1];
            let _ = stream.read(&mut byte);
            let _ = writeln!(stream, "{text}");
            let mut rest = [0u8; 64];
            while stream.read(&mut rest).is_ok_and(|n| n > 0) {}
        });
    }
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
