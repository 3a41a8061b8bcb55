//! DNS stand-ins for the DNS capture tests: the agent's `dns-serve` (a
//! nameserver or the proxy's DNS listener, over UDP and TCP on one
//! address) and `dns-query` (one query as an app makes it, and everything
//! the app can observe of it).
//!
//! A "query" is a few bytes, and the answer names the server and what it
//! saw: `NAME peer=<the query's source>` for UDP, plus `odst=<the
//! connection's SO_ORIGINAL_DST>` for TCP (what Envoy's DNS listener would
//! read). The test compares these lines between capture modes.

use std::{
    io::{Read as _, Write as _},
    net::{SocketAddr, TcpListener, TcpStream, UdpSocket},
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Socket, Type};

use crate::agent::{errno_name, original_dst};

/// How long a UDP query waits for its answer: some get none by design
/// (multicast nobody answers), so each of those costs this long.
const ANSWER_TIMEOUT: Duration = Duration::from_millis(1500);

/// How long a TCP query waits to connect and for its answer. Every
/// connection a query makes either fails at once or reaches a server that
/// answers, so this bounds only a broken path, and is generous: under
/// software emulation the proxy's answer has taken more than 1.5 s.
const TCP_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves DNS stand-in answers on `listen`, UDP and TCP, until killed.
/// Prints "ready" once both are bound.
pub fn serve(listen: SocketAddr, name: &str) -> Result<()> {
    let udp = UdpSocket::bind(listen).with_context(|| format!("binding UDP {listen}"))?;
    let tcp = {
        let socket = Socket::new(Domain::for_address(listen), Type::STREAM, None)?;
        socket.set_reuse_address(true)?;
        socket
            .bind(&listen.into())
            .with_context(|| format!("binding TCP {listen}"))?;
        socket.listen(128)?;
        TcpListener::from(socket)
    };
    println!("ready");
    std::io::stdout().flush()?;
    std::thread::scope(|scope| {
        scope.spawn(|| {
            for stream in tcp.incoming() {
                let Ok(stream) = stream else { continue };
                let name = name.to_owned();
                std::thread::spawn(move || answer_tcp(stream, &name));
            }
        });
        let mut buf = [0u8; 512];
        loop {
            let Ok((_, from)) = udp.recv_from(&mut buf) else {
                continue;
            };
            let _ = udp.send_to(format!("{name} peer={from}").as_bytes(), from);
        }
    })
}

/// Answers one TCP query: `NAME peer=<peer> odst=<SO_ORIGINAL_DST>`.
fn answer_tcp(mut stream: TcpStream, name: &str) {
    let _ = stream.set_read_timeout(Some(TCP_TIMEOUT));
    // The query is one read; what follows until the client closes is
    // drained after the answer (nothing left unread resets the connection
    // before the answer is read).
    let mut query = [0u8; 64];
    let _ = stream.read(&mut query);
    let peer = stream
        .peer_addr()
        .map_or_else(|e| errno_name(&e), |a| a.to_string());
    let mut seen = format!(
        "{name} peer={peer} odst={}",
        original_dst(&stream).replace(' ', "_")
    );
    // An AF_INET6 listener: what IP6T_SO_ORIGINAL_DST answers too.
    if stream.local_addr().is_ok_and(|a| a.is_ipv6()) {
        let odst6 = socket2::SockRef::from(&stream)
            .original_dst_v6()
            .map_or_else(
                |e| errno_name(&e),
                |a| {
                    a.as_socket()
                        .map_or_else(|| "?".to_owned(), |a| a.to_string())
                },
            );
        seen.push_str(&format!(" odst6={odst6}"));
    }
    let _ = writeln!(stream, "{seen}");
    let mut rest = [0u8; 64];
    while stream.read(&mut rest).is_ok_and(|n| n > 0) {}
}

/// How a query is made.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum How {
    /// An unconnected UDP socket: `sendto`, then `recvfrom`.
    Sendto,
    /// A connected UDP socket: `connect`, `send`, `recvfrom`.
    Connected,
    /// A TCP connection.
    Tcp,
}

impl std::str::FromStr for How {
    type Err = anyhow::Error;
    fn from_str(s: &str) -> Result<Self> {
        Ok(match s {
            "sendto" => Self::Sendto,
            "connected" => Self::Connected,
            "tcp" => Self::Tcp,
            other => bail!("unknown query kind {other:?}: sendto, connected or tcp"),
        })
    }
}

/// Makes one query to `to` (from an AF_INET6 socket to the IPv4-mapped
/// address with `family6`; from a socket bound to `bind`, port 0, first
/// when given) and says what the app observed: how it went, the socket's
/// own address (`local=`), its peer for connected sockets (`peer=`), the
/// answer's source (`from=`, UDP), then `| ` and the answer.
pub fn query(to: SocketAddr, how: How, family6: bool, bind: Option<std::net::IpAddr>) -> String {
    match query_inner(to, how, family6, bind) {
        Ok(seen) => seen,
        Err(err) => format!("error={}", err_name(&err)),
    }
}

fn err_name(err: &anyhow::Error) -> String {
    err.downcast_ref::<std::io::Error>()
        .map_or_else(|| format!("{err:#}"), errno_name)
}

fn query_inner(
    to: SocketAddr,
    how: How,
    family6: bool,
    bind: Option<std::net::IpAddr>,
) -> Result<String> {
    let in_family = |addr: SocketAddr| match (addr, family6) {
        (SocketAddr::V4(v4), true) => SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port()),
        _ => addr,
    };
    let to = in_family(to);
    let bind = |socket: &Socket| -> Result<()> {
        if let Some(ip) = bind {
            let at = in_family(SocketAddr::new(ip, 0));
            socket
                .bind(&at.into())
                .with_context(|| format!("binding {at}"))?;
        }
        Ok(())
    };
    let domain = Domain::for_address(to);
    let name = |a: std::io::Result<socket2::SockAddr>| -> String {
        match a {
            Ok(a) => a
                .as_socket()
                .map_or_else(|| "?".to_owned(), |a| a.to_string()),
            Err(e) => errno_name(&e),
        }
    };
    if how == How::Tcp {
        let socket = Socket::new(domain, Type::STREAM, None)?;
        bind(&socket)?;
        if let Err(err) = socket.connect_timeout(&to.into(), TCP_TIMEOUT) {
            return Ok(format!("connect={}", errno_name(&err)));
        }
        let seen = format!(
            "connect=ok local={} peer={}",
            name(socket.local_addr()),
            name(socket.peer_addr())
        );
        let mut stream = TcpStream::from(socket);
        stream.set_read_timeout(Some(TCP_TIMEOUT))?;
        stream.write_all(b"query\n")?;
        // The server reads to the end: nothing it leaves unread resets the
        // connection before its answer is read.
        stream.shutdown(std::net::Shutdown::Write)?;
        let mut answer = String::new();
        let read = stream.read_to_string(&mut answer);
        return Ok(match read {
            Ok(_) => format!("{seen} | {}", answer.trim()),
            Err(err) => format!("{seen} | read={}", errno_name(&err)),
        });
    }
    let socket = Socket::new(domain, Type::DGRAM, None)?;
    bind(&socket)?;
    socket.set_read_timeout(Some(ANSWER_TIMEOUT))?;
    let mut seen = String::new();
    if how == How::Connected {
        if let Err(err) = socket.connect(&to.into()) {
            return Ok(format!("connect={}", errno_name(&err)));
        }
        seen.push_str(&format!("connect=ok peer={} ", name(socket.peer_addr())));
        if let Err(err) = socket.send(b"query") {
            return Ok(format!("{seen}send={}", errno_name(&err)));
        }
    } else if let Err(err) = socket.send_to(b"query", &to.into()) {
        return Ok(format!("sendto={}", errno_name(&err)));
    }
    seen.push_str(&format!("local={}", name(socket.local_addr())));
    Ok(match recv_answer(&socket) {
        Ok((answer, from)) => format!("{seen} from={} | {answer}", name(Ok(from))),
        Err(err) => format!("{seen} from={}", errno_name(&err)),
    })
}

/// One datagram from `socket` (within its read timeout): the text, trimmed,
/// and where it came from.
pub fn recv_answer(socket: &Socket) -> std::io::Result<(String, socket2::SockAddr)> {
    let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 512];
    let (n, from) = socket.recv_from(&mut buf)?;
    // SAFETY: recv_from initialised the first n bytes.
    let bytes: Vec<u8> = buf[..n]
        .iter()
        .map(|b| unsafe { b.assume_init() })
        .collect();
    Ok((String::from_utf8_lossy(&bytes).trim().to_owned(), from))
}
