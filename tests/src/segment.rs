//! A TCP segment conntrack calls INVALID, sent into a live connection: the
//! agent's `invalid-segment` command, for the `--drop-invalid` tests.
//!
//! The connection is made as usual; its next sequence numbers are read in
//! TCP repair mode (CAP_NET_ADMIN), and a raw socket sends one data segment
//! with the right ports and acknowledgement but a sequence number a
//! gigabyte ahead: out of the receiver's window, so conntrack marks it
//! INVALID (without `nf_conntrack_tcp_be_liberal`), where the receiving
//! TCP only answers a duplicate ACK. Then the client sends its byte and
//! reads the server's answer: the connection survived the segment, or was
//! reset because of it.

use std::{
    io::{Read as _, Write as _},
    net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream},
    os::fd::AsRawFd as _,
    time::Duration,
};

use anyhow::{Context as _, Result, bail};
use socket2::{Domain, Protocol, Socket, Type};

use crate::agent::errno_name;

const TCP_REPAIR: libc::c_int = 19;
const TCP_REPAIR_QUEUE: libc::c_int = 20;
const TCP_QUEUE_SEQ: libc::c_int = 21;
const TCP_RECV_QUEUE: libc::c_int = 1;
const TCP_SEND_QUEUE: libc::c_int = 2;
/// How far ahead of the window the segment's sequence number is.
const AHEAD: u32 = 1 << 30;

/// Connects to `to`, sends the invalid segment, and says what became of
/// the connection: `answer=<the server's line>`, or `reset=<errno>`.
pub fn invalid_segment(to: SocketAddrV4, timeout: Duration) -> Result<String> {
    let stream = TcpStream::connect_timeout(&to.into(), timeout)
        .with_context(|| format!("connecting to {to}"))?;
    stream.set_read_timeout(Some(timeout))?;
    let SocketAddr::V4(local) = stream.local_addr()? else {
        bail!("not an IPv4 connection");
    };
    let (snd_nxt, rcv_nxt) = next_sequence_numbers(&stream)?;
    let segment = tcp_segment(local, to, snd_nxt.wrapping_add(AHEAD), rcv_nxt, b"x");
    let raw = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::TCP)).context("raw socket")?;
    raw.send_to(&segment, &SocketAddr::V4(to).into())
        .context("sending the segment")?;
    // Let whatever answers the segment (a reset, or a duplicate ACK) arrive.
    std::thread::sleep(Duration::from_millis(300));
    let mut stream = stream;
    if let Err(err) = stream.write_all(b"?") {
        return Ok(format!("reset={}", errno_name(&err)));
    }
    let mut reply = Vec::new();
    let mut buf = [0u8; 256];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                reply.extend_from_slice(&buf[..n]);
                if reply.contains(&b'\n') {
                    break;
                }
            }
            Err(err) => return Ok(format!("reset={}", errno_name(&err))),
        }
    }
    let line = String::from_utf8_lossy(&reply);
    Ok(format!("answer={}", line.trim()))
}

/// The socket's next sequence number to send and to receive, read in TCP
/// repair mode (which the socket leaves again).
fn next_sequence_numbers(stream: &TcpStream) -> Result<(u32, u32)> {
    let fd = stream.as_raw_fd();
    let set = |opt: libc::c_int, value: libc::c_int| -> Result<()> {
        // SAFETY: setsockopt with a valid fd and an int-sized value.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                opt,
                (&raw const value).cast(),
                size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error())
                .with_context(|| format!("TCP repair option {opt} (needs CAP_NET_ADMIN)"));
        }
        Ok(())
    };
    let seq = |queue: libc::c_int| -> Result<u32> {
        set(TCP_REPAIR_QUEUE, queue)?;
        let mut value: u32 = 0;
        let mut len = size_of::<u32>() as libc::socklen_t;
        // SAFETY: getsockopt into a u32 of the length given.
        let rc = unsafe {
            libc::getsockopt(
                fd,
                libc::IPPROTO_TCP,
                TCP_QUEUE_SEQ,
                (&raw mut value).cast(),
                &raw mut len,
            )
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("TCP_QUEUE_SEQ");
        }
        Ok(value)
    };
    set(TCP_REPAIR, 1)?;
    let seqs = seq(TCP_SEND_QUEUE).and_then(|snd| Ok((snd, seq(TCP_RECV_QUEUE)?)));
    set(TCP_REPAIR, 0)?;
    seqs
}

/// A TCP header (ACK|PSH, no options) with `payload`, its checksum over
/// the IPv4 pseudo-header filled in.
fn tcp_segment(
    from: SocketAddrV4,
    to: SocketAddrV4,
    seq: u32,
    ack: u32,
    payload: &[u8],
) -> Vec<u8> {
    let mut seg = Vec::with_capacity(20 + payload.len());
    seg.extend_from_slice(&from.port().to_be_bytes());
    seg.extend_from_slice(&to.port().to_be_bytes());
    seg.extend_from_slice(&seq.to_be_bytes());
    seg.extend_from_slice(&ack.to_be_bytes());
    seg.push(5 << 4); // data offset: 5 words
    seg.push(0x18); // ACK | PSH
    seg.extend_from_slice(&u16::MAX.to_be_bytes()); // window
    seg.extend_from_slice(&[0, 0, 0, 0]); // checksum, urgent pointer
    seg.extend_from_slice(payload);
    let sum = checksum(*from.ip(), *to.ip(), &seg);
    seg[16..18].copy_from_slice(&sum.to_be_bytes());
    seg
}

/// The internet checksum of `segment` with the IPv4 pseudo-header.
fn checksum(src: Ipv4Addr, dst: Ipv4Addr, segment: &[u8]) -> u16 {
    let mut sum: u32 = 0;
    let mut add = |bytes: &[u8]| {
        for pair in bytes.chunks(2) {
            let word = u16::from_be_bytes([pair[0], pair.get(1).copied().unwrap_or(0)]);
            sum += u32::from(word);
        }
    };
    add(&src.octets());
    add(&dst.octets());
    add(&[0, 6]);
    add(&u16::try_from(segment.len())
        .unwrap_or(u16::MAX)
        .to_be_bytes());
    add(segment);
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_checksum_of_a_segment_with_its_checksum_is_zero() {
        let from = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 40000);
        let to = SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 80);
        for payload in [&b""[..], b"x", b"odd", b"even"] {
            let seg = tcp_segment(from, to, 7, 9, payload);
            assert_eq!(checksum(*from.ip(), *to.ip(), &seg), 0, "{payload:?}");
        }
    }
}
