//! Istio's capture validation (`istio-iptables --run-validation`, what its
//! `istio-validation` init container runs in CNI mode): listen on
//! 127.0.0.1 at the proxy's two ports, connect from 127.0.0.1 to
//! 127.0.0.6:<probe port> once a second, and pass when a listener reads
//! the probe port back with `SO_ORIGINAL_DST`, that is when the capture
//! (iptables or eBPF alike) sent the connection to the proxy and kept its
//! destination. Run as the proxy's user, the probe takes the proxy's
//! hairpin to the inbound port; as any other user, the outbound one.

use std::{
    io::Write as _,
    net::{Ipv4Addr, SocketAddrV4, TcpListener, TcpStream},
    os::fd::AsRawFd as _,
    sync::mpsc,
    thread,
    time::{Duration, Instant},
};

use anyhow::{Result, bail};

/// Istio's exit code for a failed validation.
pub const FAILED: u8 = 126;

/// Where the probe connects: Istio's inbound passthrough address, which
/// neither backend treats as the pod's loopback destination.
const PROBE_IP: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 6);

/// Parses a Go duration as Istio's flag takes it (`5s`, `500ms`, `1m`,
/// `1.5s`).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("--probe-timeout '{s}' is not a duration (e.g. 5s, 500ms, 1m)");
    let split = s
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .ok_or_else(bad)?;
    let (number, unit) = s.split_at(split);
    let number: f64 = number.parse().map_err(|_| bad())?;
    let seconds = match unit {
        "ms" => number / 1000.0,
        "s" => number,
        "m" => number * 60.0,
        "h" => number * 3600.0,
        _ => return Err(bad()),
    };
    Duration::try_from_secs_f64(seconds).map_err(|_| bad())
}

/// Runs the validation: `Ok(())` once a probe came back with its port,
/// an error naming what was seen when `timeout` passes first.
pub fn run(ports: [u16; 2], probe_port: u16, timeout: Duration) -> Result<()> {
    let (tx, rx) = mpsc::channel();
    let mut listening = Vec::new();
    for port in ports {
        let addr = SocketAddrV4::new(Ipv4Addr::LOCALHOST, port);
        match TcpListener::bind(addr) {
            Ok(listener) => {
                listening.push(addr.to_string());
                let tx = tx.clone();
                thread::spawn(move || serve(&listener, &tx));
            }
            Err(err) => eprintln!("redirect: validation: listening on {addr}: {err}"),
        }
    }
    if listening.is_empty() {
        bail!(
            "validation failed: cannot listen on 127.0.0.1 at ports {} and {} (is the proxy already running?)",
            ports[0],
            ports[1]
        );
    }
    let deadline = Instant::now() + timeout;
    let mut seen = Vec::new();
    while Instant::now() < deadline {
        let _ = probe(probe_port);
        let wait = deadline
            .saturating_duration_since(Instant::now())
            .min(Duration::from_secs(1));
        if let Ok(port) = rx.recv_timeout(wait) {
            if port == probe_port {
                return Ok(());
            }
            seen.push(port);
        }
    }
    bail!(
        "validation failed: no connection to {PROBE_IP}:{probe_port} reached the proxy's ports ({}) with its destination within {timeout:?}{}: the capture is not in place",
        listening.join(", "),
        if seen.is_empty() {
            String::new()
        } else {
            format!(" (original destination ports seen: {seen:?})")
        }
    )
}

/// One probe connection, from 127.0.0.1 as Istio's validator makes it
/// (on loopback it is accepted or refused at once).
fn probe(port: u16) -> std::io::Result<()> {
    let sockaddr = |ip: Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from_ne_bytes(ip.octets()),
        },
        sin_zero: [0; 8],
    };
    let len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a new socket, owned below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: the descriptor we just opened.
    let socket = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let local = sockaddr(Ipv4Addr::LOCALHOST, 0);
    let remote = sockaddr(PROBE_IP, port);
    // SAFETY: valid sockaddr_in values and their length, on our socket.
    let ok = unsafe {
        libc::bind(socket.as_raw_fd(), (&raw const local).cast(), len) == 0
            && libc::connect(socket.as_raw_fd(), (&raw const remote).cast(), len) == 0
    };
    if ok {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// Accepts connections and reports each one's original destination port.
fn serve(listener: &TcpListener, found: &mpsc::Sender<u16>) {
    for conn in listener.incoming().flatten() {
        if let Some(port) = original_port(&conn) {
            // The port, for whoever looks (Istio's validator echoes it).
            let _ = (&conn).write_all(port.to_string().as_bytes());
            if found.send(port).is_err() {
                return;
            }
        }
    }
}

/// `getsockopt(SOL_IP, SO_ORIGINAL_DST)`'s port, as a transparent proxy
/// reads it.
fn original_port(conn: &TcpStream) -> Option<u16> {
    const SO_ORIGINAL_DST: libc::c_int = 80;
    let mut addr = std::mem::MaybeUninit::<libc::sockaddr_in>::zeroed();
    let mut len = size_of::<libc::sockaddr_in>() as libc::socklen_t;
    // SAFETY: a sockaddr_in buffer and its length, for a socket we own.
    let rc = unsafe {
        libc::getsockopt(
            conn.as_raw_fd(),
            libc::SOL_IP,
            SO_ORIGINAL_DST,
            addr.as_mut_ptr().cast(),
            &mut len,
        )
    };
    // SAFETY: getsockopt succeeded and filled the buffer.
    (rc == 0).then(|| u16::from_be(unsafe { addr.assume_init() }.sin_port))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_parse_like_go() {
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("500ms"), Ok(Duration::from_millis(500)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("2m"), Ok(Duration::from_secs(120)));
        for bad in ["", "5", "s", "5x", "-1s", "1e400s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }
}
