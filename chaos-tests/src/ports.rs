//! Ports for processes that a test starts, restarts and must find again at the same address.
//!
//! The usual trick (bind port 0, read the port, close) hands out a port from the kernel's
//! *ephemeral* range, the same range every outgoing connection draws its local port from. Between
//! closing the probe and the node binding it (and again whenever a node restarts on its old
//! address), any outgoing connection on the machine may take that port, and the node fails with
//! "address in use": on a busy 2-core CI machine this broke a Raft test once in a few dozen runs.
//! Ports picked here come from below the ephemeral range, which the kernel never hands out on its
//! own, so only another explicit bind can collide, and each candidate is checked free (TCP and UDP,
//! for QUIC) before it is returned.

use std::net::{IpAddr, Ipv4Addr, TcpListener, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// The lowest port handed out: above the registered services most machines run.
const LOWEST: u16 = 10_000;

/// The kernel's ephemeral range (`/proc/sys/net/ipv4/ip_local_port_range`), Linux's default when
/// it cannot be read.
fn ephemeral_range() -> (u16, u16) {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| {
            let mut it = s.split_whitespace().map(|p| p.parse::<u16>().ok());
            Some((it.next()??, it.next()??))
        })
        .unwrap_or((32_768, 60_999))
}

/// A port on `ip` that is free for both TCP and UDP now and lies outside the ephemeral range.
/// Successive calls in one process never return the same port; processes start at different
/// offsets (pid and clock), so tests running side by side rarely even probe the same ports.
pub fn free_port(ip: IpAddr) -> std::io::Result<u16> {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let (eph_lo, eph_hi) = ephemeral_range();
    // The span below the ephemeral range, or above it when that is too narrow.
    let (lo, hi) = if eph_lo > LOWEST + 2_000 {
        (LOWEST, eph_lo - 1)
    } else {
        (eph_hi.saturating_add(1), u16::MAX)
    };
    let span = u32::from(hi - lo) + 1;
    let seed = std::process::id()
        ^ SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
    let _ = NEXT.compare_exchange(0, seed % span + 1, Ordering::Relaxed, Ordering::Relaxed);
    for _ in 0..span.min(4_096) {
        let offset = NEXT.fetch_add(1, Ordering::Relaxed) % span;
        let port = lo + offset as u16;
        if TcpListener::bind((ip, port)).is_ok() && UdpSocket::bind((ip, port)).is_ok() {
            return Ok(port);
        }
    }
    // Nothing free below the range (a crowded machine): fall back to the kernel's choice.
    Ok(TcpListener::bind((ip, 0))?.local_addr()?.port())
}

/// `free_port` on 127.0.0.1.
pub fn free_loopback_port() -> u16 {
    free_port(IpAddr::V4(Ipv4Addr::LOCALHOST)).expect("binding a loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let (lo, hi) = ephemeral_range();
        let ports: Vec<u16> = (0..200).map(|_| free_loopback_port()).collect();
        let mut unique = ports.clone();
        unique.sort_unstable();
        unique.dedup();
        assert_eq!(unique.len(), ports.len(), "a port was handed out twice");
        for p in &ports {
            assert!(!(lo..=hi).contains(p), "port {p} lies in the ephemeral range {lo}-{hi}");
            TcpListener::bind(("127.0.0.1", *p)).expect("the port is free");
        }
    }
}
