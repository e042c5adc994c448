//! Where the cluster's processes live on the network, and how a node is cut off.
//!
//! With root (CAP_NET_ADMIN) every node runs in its own network namespace, joined to a bridge in
//! the harness' namespace by a veth pair; a partition takes the node's veth down, so its packets
//! are dropped by the kernel in both directions (no RST, connections hang as on a real network),
//! and healing brings it back up. On a host whose bridged traffic goes through iptables with a
//! FORWARD policy of DROP (Docker sets both), one ACCEPT rule for the bridge's own traffic is
//! inserted, and removed with the bridge. Without root the nodes share loopback and partitions are not
//! available. Everything set up here is torn down on drop; namespaces and links left behind by
//! a harness that was itself SIGKILLed are removed by the next one.

use std::net::{IpAddr, Ipv4Addr};
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

const NETNS_PREFIX: &str = "moeless-chaos-";

pub enum Network {
    /// All nodes on 127.0.0.1, distinct ports; no partitions.
    Loopback,
    Namespaces(Namespaces),
}

impl Network {
    /// Namespaces when `ip netns` works here (root), loopback otherwise, or loopback when
    /// `MOELESS_CHAOS_NETWORK=loopback` asks for it (to exercise the unprivileged path).
    pub fn best(nodes: usize) -> Network {
        if std::env::var("MOELESS_CHAOS_NETWORK").is_ok_and(|v| v == "loopback") {
            return Network::Loopback;
        }
        match Namespaces::create(nodes) {
            Ok(n) => Network::Namespaces(n),
            Err(e) => {
                tracing::warn!(error = %format!("{e:#}"), "network namespaces unavailable; nodes share loopback and partitions are disabled");
                Network::Loopback
            }
        }
    }

    pub fn supports_partitions(&self) -> bool {
        matches!(self, Network::Namespaces(_))
    }

    /// The address node `i` listens on (and is reached at).
    pub fn node_ip(&self, i: usize) -> IpAddr {
        match self {
            Network::Loopback => IpAddr::V4(Ipv4Addr::LOCALHOST),
            Network::Namespaces(n) => IpAddr::V4(n.node_ip(i)),
        }
    }

    /// The command prefix that runs a program as node `i` (empty on loopback).
    pub fn exec_prefix(&self, i: usize) -> Vec<String> {
        match self {
            Network::Loopback => Vec::new(),
            Network::Namespaces(n) => vec!["ip".into(), "netns".into(), "exec".into(), n.netns(i)],
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Network::Loopback => "loopback (no partitions)".into(),
            Network::Namespaces(n) => format!(
                "network namespaces + veth on bridge {} (10.{}.{}.0/24)",
                n.bridge, n.subnet.0, n.subnet.1
            ),
        }
    }
}

/// One namespace per node behind one bridge.
pub struct Namespaces {
    tag: String,
    bridge: String,
    subnet: (u8, u8),
    nodes: usize,
}

fn ip(args: &[&str]) -> Result<String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .with_context(|| format!("running ip {}", args.join(" ")))?;
    if !out.status.success() {
        bail!(
            "ip {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Bridged packets pass iptables' FORWARD chain here (`br_netfilter` loaded and
/// `bridge-nf-call-iptables` on, as Docker leaves a host); its policy may drop them.
fn bridged_traffic_filtered() -> bool {
    std::fs::read_to_string("/proc/sys/net/bridge/bridge-nf-call-iptables").is_ok_and(|v| v.trim() == "1")
}

/// The FORWARD rule that lets the bridge's nodes reach each other and the harness.
fn forward_rule(bridge: &str) -> [&str; 6] {
    ["-i", bridge, "-o", bridge, "-j", "ACCEPT"]
}

fn iptables(op: &str, rule: &[&str]) -> Result<()> {
    let out = Command::new("iptables")
        .args(["-w", op, "FORWARD"])
        .args(rule)
        .output()
        .context("running iptables")?;
    if !out.status.success() {
        bail!(
            "iptables {op} FORWARD {} failed: {}",
            rule.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Namespaces {
    fn create(nodes: usize) -> Result<Self> {
        static RUN: AtomicU32 = AtomicU32::new(0);
        remove_stale();
        let pid = std::process::id();
        let run = RUN.fetch_add(1, Ordering::Relaxed) % 100;
        let tag = format!("{pid}x{run}");
        let used = ip(&["-o", "addr"]).unwrap_or_default();
        let subnet = (0..250u8)
            .map(|k| (213u8, k))
            .find(|(a, b)| !used.contains(&format!("10.{a}.{b}.")))
            .context("no free 10.213.x.0/24 subnet")?;
        let me = Self {
            bridge: format!("mb{tag}"),
            tag,
            subnet,
            nodes,
        };
        // On error, drop tears down whatever was made so far.
        me.setup()?;
        Ok(me)
    }

    fn setup(&self) -> Result<()> {
        let gw = format!("10.{}.{}.1/24", self.subnet.0, self.subnet.1);
        ip(&["link", "add", &self.bridge, "type", "bridge"])?;
        ip(&["addr", "add", &gw, "dev", &self.bridge])?;
        ip(&["link", "set", &self.bridge, "up"])?;
        if bridged_traffic_filtered() {
            iptables("-I", &forward_rule(&self.bridge)).context("letting the bridge's traffic past iptables")?;
        }
        for i in 0..self.nodes {
            let ns = self.netns(i);
            let veth = self.veth(i);
            ip(&["netns", "add", &ns])?;
            ip(&[
                "link", "add", &veth, "type", "veth", "peer", "name", "eth0", "netns", &ns,
            ])?;
            ip(&["link", "set", &veth, "master", &self.bridge])?;
            ip(&["link", "set", &veth, "up"])?;
            let addr = format!("{}/24", self.node_ip(i));
            ip(&["-n", &ns, "addr", "add", &addr, "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &ns, "link", "set", "lo", "up"])?;
        }
        Ok(())
    }

    pub fn netns(&self, i: usize) -> String {
        format!("{NETNS_PREFIX}{}-{i}", self.tag)
    }

    fn veth(&self, i: usize) -> String {
        format!("mv{}n{i}", self.tag)
    }

    fn node_ip(&self, i: usize) -> Ipv4Addr {
        Ipv4Addr::new(10, self.subnet.0, self.subnet.1, 10 + i as u8)
    }

    /// Drops every packet to and from node `i` (or lets them through again).
    pub fn set_isolated(&self, i: usize, isolated: bool) -> Result<()> {
        let state = if isolated { "down" } else { "up" };
        ip(&["link", "set", &self.veth(i), state]).map(|_| ())
    }
}

impl Drop for Namespaces {
    fn drop(&mut self) {
        for i in 0..self.nodes {
            let _ = ip(&["link", "del", &self.veth(i)]);
            let _ = ip(&["netns", "del", &self.netns(i)]);
        }
        let _ = ip(&["link", "del", &self.bridge]);
        if bridged_traffic_filtered() {
            let _ = iptables("-D", &forward_rule(&self.bridge));
        }
    }
}

/// Removes namespaces, bridges and veths of harnesses that no longer run (killed mid-run), and
/// any process still living in such a namespace.
fn remove_stale() {
    let owner = |name: &str| -> Option<u32> { name.split('x').next()?.parse().ok() };
    if let Ok(list) = ip(&["netns", "list"]) {
        for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
            let Some(rest) = name.strip_prefix(NETNS_PREFIX) else {
                continue;
            };
            if owner(rest).is_some_and(|pid| !pid_alive(pid)) {
                if let Ok(pids) = ip(&["netns", "pids", name]) {
                    for pid in pids.split_whitespace() {
                        let _ = Command::new("kill").args(["-KILL", pid]).status();
                    }
                }
                let _ = ip(&["netns", "del", name]);
            }
        }
    }
    if let Ok(links) = ip(&["-o", "link"]) {
        for l in links.lines() {
            let Some(name) = l.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("")) else {
                continue;
            };
            let rest = name.strip_prefix("mb").or_else(|| name.strip_prefix("mv"));
            if rest.and_then(owner).is_some_and(|pid| !pid_alive(pid)) {
                let _ = ip(&["link", "del", name]);
            }
        }
    }
    // FORWARD rules of dead harnesses' bridges.
    if let Ok(out) = Command::new("iptables").args(["-w", "-S", "FORWARD"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let words: Vec<&str> = line.split_whitespace().collect();
            if let ["-A", "FORWARD", "-i", bridge, "-o", same, "-j", "ACCEPT"] = words.as_slice() {
                let dead = bridge
                    .strip_prefix("mb")
                    .and_then(owner)
                    .is_some_and(|pid| !pid_alive(pid));
                if bridge == same && dead {
                    let _ = iptables("-D", &forward_rule(bridge));
                }
            }
        }
    }
}
