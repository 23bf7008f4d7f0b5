//! A sandbox's network: none but its own loopback by default, outbound IPv4 for a
//! function registered with `network: egress`.
//!
//! An egress sandbox gets a veth pair: `sprout-e<slot>` on the host, `eth0` in the
//! sandbox, with the /30 `10.231.0.0/16` block number `slot` (host `.1`, sandbox
//! `.2` of the block) and a default route through the host. The slot is claimed by
//! creating the host link: link names are unique on the host, so agents running at
//! once never share one. Its traffic leaves the host masqueraded behind the host's
//! address. The agent's nftables table `inet sprout-<agent id>` (made once its first
//! egress sandbox's link exists, removed with its last, and by crash clean-up) drops
//! everything a `sprout-e*` link sends to the host itself (any of its addresses,
//! loopback included, IPv4 or IPv6), before the host's own port forwarding (DNAT)
//! can rewrite it, and anything the host's DNAT rewrote on its way out; everything it
//! sends to another sandbox or to a cloud's metadata service ([`METADATA`]); IPv6
//! forwarding and any new connection into a sandbox. Every agent's table holds the
//! same rules for every `sprout-e*` link, so one agent's removing its own never
//! opens another's; and no table is removed as stale while any `sprout-e*` link
//! exists (see [`remove_stale_tables`]).
//! Forwarding must be on: when `net.ipv4.ip_forward` was off, it is turned on and
//! [`FORWARDING_MARK`] remembers it, so that whoever removes the last sprout table
//! turns it off again.
//!
//! What is decided here (slots, names, addresses, rule text, the order of steps) is
//! plain code; what touches the kernel goes through [`Tools`] (the `ip` and `nft`
//! commands, `/proc/sys`, `/sys/class/net`), faked in the tests.

use std::collections::HashMap;
use std::net::Ipv4Addr;

/// What network a function's sandbox has.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Network {
    /// Only the sandbox's own loopback.
    #[default]
    None,
    /// Outbound IPv4 through the host (NAT), and the host's DNS configuration.
    Egress,
}

impl Network {
    /// Every network a registration may name.
    pub const ALL: [Network; 2] = [Network::None, Network::Egress];

    /// Its name in a registration.
    pub fn name(self) -> &'static str {
        match self {
            Network::None => "none",
            Network::Egress => "egress",
        }
    }

    /// The network named `name`; the error says what is accepted.
    pub fn parse(name: &str) -> Result<Network, String> {
        Network::ALL
            .into_iter()
            .find(|n| n.name() == name)
            .ok_or_else(|| format!("unknown network {name:?} (none or egress)"))
    }
}

/// What every host-side link's name starts with (a slot number follows).
pub const LINK_PREFIX: &str = "sprout-e";
/// The sandbox's end of its veth pair.
pub const SANDBOX_LINK: &str = "eth0";
/// The first two octets of the block the sandboxes' addresses come from (/16).
const BLOCK: [u8; 2] = [10, 231];
/// /30 blocks in the /16: one per egress sandbox on the host.
pub const SLOTS: u16 = 16384;
/// Present while sprout has turned `net.ipv4.ip_forward` on (it was off).
pub const FORWARDING_MARK: &str = "/run/sprout.ip_forward-was-off";
/// The host's DNS configuration, bind-mounted read-only into an egress sandbox.
pub const RESOLV_CONF: &str = "/etc/resolv.conf";

/// Where clouds put their metadata services, which hand out the host's credentials:
/// the link-local block (AWS, GCP, Azure IMDS, OpenStack: 169.254.169.254), Azure's
/// WireServer and Alibaba Cloud's. An egress sandbox reaches none of them.
pub const METADATA: [&str; 3] = ["169.254.0.0/16", "168.63.129.16/32", "100.100.100.200/32"];

/// One egress sandbox's /30 block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Slot(u16);

impl Slot {
    /// The slot named by a host link, if it is one of sprout's.
    pub fn of_link(name: &str) -> Option<Slot> {
        let n: u16 = name.strip_prefix(LINK_PREFIX)?.parse().ok()?;
        (n < SLOTS && name == Slot(n).host_link()).then_some(Slot(n))
    }

    /// The host link's name (at most 13 characters, under the kernel's 15).
    pub fn host_link(self) -> String {
        format!("{LINK_PREFIX}{}", self.0)
    }

    fn address(self, host: u8) -> Ipv4Addr {
        let base = u32::from(self.0) * 4;
        Ipv4Addr::new(
            BLOCK[0],
            BLOCK[1],
            (base >> 8) as u8,
            (base & 0xff) as u8 + host,
        )
    }

    /// The host side's address (the sandbox's gateway).
    pub fn host_address(self) -> Ipv4Addr {
        self.address(1)
    }

    /// The sandbox's address.
    pub fn sandbox_address(self) -> Ipv4Addr {
        self.address(2)
    }
}

/// The first slot from `from` on that is not `taken`.
fn free_slot(from: u16, taken: impl Fn(Slot) -> bool) -> Option<Slot> {
    (from..SLOTS).map(Slot).find(|s| !taken(*s))
}

/// The name of agent `agent_id`'s nftables table (family `inet`).
pub fn table_name(agent_id: &str) -> String {
    format!("sprout-{agent_id}")
}

/// The agent id a table of sprout's belongs to.
fn table_agent(name: &str) -> Option<&str> {
    let id = name.strip_prefix("sprout-")?;
    (!id.is_empty() && id.bytes().all(|b| b.is_ascii_digit())).then_some(id)
}

/// The `nft -f` script that (re)makes agent `agent_id`'s table in one transaction.
pub fn table_script(agent_id: &str) -> String {
    let t = table_name(agent_id);
    let links = format!("\"{LINK_PREFIX}*\"");
    let block = format!("{}.{}.0.0/16", BLOCK[0], BLOCK[1]);
    let unreachable = [block.as_str()]
        .into_iter()
        .chain(METADATA)
        .collect::<Vec<_>>()
        .join(", ");
    // The prerouting chain runs before the host's own DNAT (priority dstnat), which
    // would otherwise turn a packet to a published port of the host into a
    // forwarded one; the forward chain drops what DNAT rewrote anyway (a published
    // port on an address the host does not own, a Kubernetes service's).
    format!(
        "add table inet {t}\n\
         delete table inet {t}\n\
         table inet {t} {{\n\
         \tchain prerouting {{\n\
         \t\ttype filter hook prerouting priority dstnat - 10; policy accept;\n\
         \t\tiifname {links} fib daddr type local drop\n\
         \t}}\n\
         \tchain input {{\n\
         \t\ttype filter hook input priority filter - 10; policy accept;\n\
         \t\tiifname {links} drop\n\
         \t}}\n\
         \tchain forward {{\n\
         \t\ttype filter hook forward priority filter - 10; policy accept;\n\
         \t\tiifname {links} meta nfproto ipv6 drop\n\
         \t\tiifname {links} ip daddr {{ {unreachable} }} drop\n\
         \t\tiifname {links} ct status dnat drop\n\
         \t\tiifname {links} oifname {links} drop\n\
         \t\toifname {links} ct state established,related accept\n\
         \t\toifname {links} drop\n\
         \t}}\n\
         \tchain postrouting {{\n\
         \t\ttype nat hook postrouting priority srcnat; policy accept;\n\
         \t\tip saddr {block} oifname != {links} masquerade\n\
         \t}}\n\
         }}\n"
    )
}

/// The `ip` command that claims `slot`: its veth pair, the sandbox end (`eth0`)
/// straight in the namespace of process `pid`. Run alone, so that its failure alone
/// says whether the slot was taken.
pub fn link_add(slot: Slot, pid: i32) -> String {
    format!(
        "link add {} type veth peer name {SANDBOX_LINK} netns {pid}\n",
        slot.host_link()
    )
}

/// The `ip -batch` script run on the host once `slot`'s veth pair exists: its host
/// end addressed and up.
pub fn host_batch(slot: Slot) -> String {
    let link = slot.host_link();
    format!(
        "addr add {}/30 dev {link}\n\
         link set {link} up\n",
        slot.host_address()
    )
}

/// The `ip -batch` script run inside the sandbox's network namespace for `slot`.
pub fn sandbox_batch(slot: Slot) -> String {
    format!(
        "addr add {}/30 dev {SANDBOX_LINK}\n\
         link set {SANDBOX_LINK} up\n\
         route add default via {}\n",
        slot.sandbox_address(),
        slot.host_address()
    )
}

/// Why a step failed, as the tool said it.
pub type Failure = String;

/// The kernel touchpoints: every command and file the network needs.
pub trait Tools {
    /// The names of the host's network links.
    fn links(&mut self) -> Vec<String>;
    /// The interface index of host link `name`, if it exists.
    fn ifindex(&mut self, name: &str) -> Option<u32>;
    /// Runs `ip -batch -` on the host with `script`.
    fn ip_host(&mut self, script: &str) -> Result<(), Failure>;
    /// Runs `ip -batch -` inside the network namespace of process `pid`.
    fn ip_in(&mut self, pid: i32, script: &str) -> Result<(), Failure>;
    /// Runs `nft -f -` with `script`.
    fn nft(&mut self, script: &str) -> Result<(), Failure>;
    /// The names of the host's `inet` nftables tables.
    fn tables(&mut self) -> Vec<String>;
    /// `net.ipv4.ip_forward`.
    fn forwarding(&mut self) -> bool;
    fn set_forwarding(&mut self, on: bool) -> Result<(), Failure>;
    /// Whether [`FORWARDING_MARK`] exists; `set_mark` makes or removes it.
    fn mark(&mut self) -> bool;
    fn set_mark(&mut self, present: bool);
    /// Holds the host-wide lock ([`FORWARDING_LOCK`]) of forwarding and of the
    /// tables' coming and going until the guard is dropped.
    fn hold(&mut self) -> Result<Held, Failure>;
}

/// The host-wide lock of forwarding decisions, held by every agent (and spawner)
/// from "is forwarding on?" to its table existing, and from "is any sprout table
/// left?" to turning forwarding off: without it, an agent that stops (and removes
/// its table, or merely checks) between another's turning forwarding on and that
/// one's table appearing saw no table and turned forwarding off under a live egress
/// sandbox. A file in `/run` (it is never removed: a lock file).
pub const FORWARDING_LOCK: &str = "/run/sprout.network.lock";

/// A held [`Tools::hold`] (an `flock`ed file; nothing for a fake).
pub struct Held(#[allow(dead_code)] Option<std::fs::File>);

/// Whether `failure` (of [`link_add`]) says the link name is taken (another agent
/// claimed the slot).
fn name_taken(failure: &str) -> bool {
    failure.contains("File exists")
}

/// One spawner's egress sandboxes.
pub struct Egress<T: Tools> {
    agent_id: String,
    tools: T,
    /// Sandbox id → its slot and its host link's interface index (when it could
    /// be read), which tells this spawner's link from one another agent made under
    /// the same name once this one went with its sandbox's namespace.
    slots: HashMap<String, (Slot, Option<u32>)>,
}

impl<T: Tools> Egress<T> {
    pub fn new(agent_id: String, tools: T) -> Egress<T> {
        Egress {
            agent_id,
            tools,
            slots: HashMap::new(),
        }
    }

    /// Gives sandbox `id` (its init is `pid`) outbound network: forwarding on, a
    /// free slot's veth pair, then the agent's table (with its first egress
    /// sandbox), and last the sandbox's end, through which traffic starts to flow.
    /// The link exists before the table, so that no clean-up takes the table for a
    /// stale one (see [`remove_stale_tables`]) while the sandbox could send. Undoes
    /// what it did when a step fails.
    pub fn attach(&mut self, id: &str, pid: i32) -> Result<Slot, Failure> {
        if self.slots.contains_key(id) {
            return Err(format!("sandbox {id} already has a network"));
        }
        let attached = {
            let _held = self.tools.hold()?;
            self.attach_held(id, pid)
        };
        if attached.is_err() {
            // Forwarding goes back off if no sprout table is left.
            self.remove_table_if_unused();
        }
        attached
    }

    /// [`Egress::attach`], holding the host's forwarding lock.
    fn attach_held(&mut self, id: &str, pid: i32) -> Result<Slot, Failure> {
        let slot = self.forward().and_then(|()| self.claim(pid))?;
        let first = self.slots.is_empty();
        let made = if first {
            self.tools
                .nft(&table_script(&self.agent_id))
                .map_err(|e| format!("make the nftables table: {e}"))
        } else {
            Ok(())
        }
        .and_then(|()| {
            self.tools
                .ip_in(pid, &sandbox_batch(slot))
                .map_err(|e| format!("configure the sandbox's {SANDBOX_LINK}: {e}"))
        });
        if let Err(e) = made {
            self.delete_link(slot);
            return Err(e);
        }
        let ifindex = self.tools.ifindex(&slot.host_link());
        self.slots.insert(id.to_owned(), (slot, ifindex));
        Ok(slot)
    }

    /// Removes sandbox `id`'s link (if it had one) and, with the last, the table.
    /// Call it before the sandbox is killed: while its namespace lives, no other
    /// agent can take the link's name.
    pub fn detach(&mut self, id: &str) {
        let Some((slot, ifindex)) = self.slots.remove(id) else {
            return;
        };
        // The link is gone already when the sandbox's namespace went first, and its
        // name may be another agent's by now: a link of another index is left.
        if ifindex.is_some() && self.tools.ifindex(&slot.host_link()) == ifindex {
            self.delete_link(slot);
        }
        self.remove_table_if_unused();
    }

    /// Deletes `slot`'s host link: only ever one this spawner created, while its
    /// sandbox lives.
    fn delete_link(&mut self, slot: Slot) {
        let _ = self
            .tools
            .ip_host(&format!("link del {}\n", slot.host_link()));
    }

    /// Whether sandbox `id` has a network of its own.
    pub fn has(&self, id: &str) -> bool {
        self.slots.contains_key(id)
    }

    /// Turns forwarding on if it is off, leaving the mark.
    fn forward(&mut self) -> Result<(), Failure> {
        if self.tools.forwarding() {
            return Ok(());
        }
        self.tools.set_mark(true);
        self.tools
            .set_forwarding(true)
            .map_err(|e| format!("turn net.ipv4.ip_forward on: {e}"))
    }

    /// Claims the first free slot by creating its veth pair, then addresses its host
    /// end. Only the creation's "File exists" means another agent has the slot; a
    /// failure after the creation deletes the link (this call's), one before it
    /// deletes nothing (the name may be another agent's).
    fn claim(&mut self, pid: i32) -> Result<Slot, Failure> {
        let taken: Vec<Slot> = self
            .tools
            .links()
            .iter()
            .filter_map(|l| Slot::of_link(l))
            .collect();
        let mut from = 0;
        // A few rounds: another agent may claim the slot between the listing and
        // the creation.
        for _ in 0..8 {
            let slot = free_slot(from, |s| taken.contains(&s))
                .ok_or_else(|| format!("all {SLOTS} network slots are in use"))?;
            match self.tools.ip_host(&link_add(slot, pid)) {
                Ok(()) => {}
                Err(e) if name_taken(&e) => {
                    from = slot.0 + 1;
                    continue;
                }
                Err(e) => return Err(format!("make the veth pair {}: {e}", slot.host_link())),
            }
            return match self.tools.ip_host(&host_batch(slot)) {
                Ok(()) => Ok(slot),
                Err(e) => {
                    self.delete_link(slot);
                    Err(format!("address the link {}: {e}", slot.host_link()))
                }
            };
        }
        Err("network slots kept being taken by other agents".into())
    }

    fn remove_table_if_unused(&mut self) {
        if self.slots.is_empty() {
            remove_table(&mut self.tools, &self.agent_id);
        }
    }
}

/// Removes agent `agent_id`'s table (absent: nothing happens) and, when no sprout
/// table is left and sprout turned forwarding on, turns it off again.
pub fn remove_table<T: Tools>(tools: &mut T, agent_id: &str) {
    let _held = match tools.hold() {
        Ok(held) => held,
        Err(e) => {
            // Without the lock forwarding is left as it is (on): safe, if untidy.
            tracing::warn!(error = %e, "could not take the host's forwarding lock");
            Held(None)
        }
    };
    let name = table_name(agent_id);
    if tools.tables().contains(&name) {
        if let Err(e) = tools.nft(&format!("delete table inet {name}\n")) {
            tracing::warn!(table = %name, error = %e, "could not remove an nftables table");
        }
    }
    if tools.mark()
        && !tools.tables().iter().any(|t| table_agent(t).is_some())
        && tools.set_forwarding(false).is_ok()
    {
        tools.set_mark(false);
    }
}

/// Removes the tables of agents that are gone (`alive` says which ids still run)
/// and returns their ids. `alive` judges by pid in this pid namespace, which cannot
/// see an agent in another one sharing this network namespace; so, as a backstop,
/// no table is removed while any `sprout-e*` link exists: every egress sandbox's
/// link exists before its agent's table and goes with it (or with its namespace),
/// so a table with no link anywhere filters nothing. The error names the link that
/// held the stale tables back (a later clean-up removes them).
pub fn remove_stale_tables<T: Tools>(
    tools: &mut T,
    alive: impl Fn(&str) -> bool,
) -> Result<Vec<String>, Failure> {
    let stale: Vec<String> = tools
        .tables()
        .iter()
        .filter_map(|t| table_agent(t))
        .filter(|id| !alive(id))
        .map(str::to_owned)
        .collect();
    if stale.is_empty() {
        return Ok(stale);
    }
    if let Some(link) = tools
        .links()
        .into_iter()
        .find(|l| Slot::of_link(l).is_some())
    {
        return Err(format!(
            "the tables of agents {} are kept: link {link} exists",
            stale.join(", ")
        ));
    }
    for id in &stale {
        remove_table(tools, id);
    }
    Ok(stale)
}

/// The real [`Tools`]: the `ip` and `nft` commands and the host's files.
pub struct HostTools;

/// Runs `program` with `args`, `stdin` on its standard input; the error is its
/// standard error (or why it could not run).
fn run(program: &str, args: &[&str], stdin: &str) -> Result<String, Failure> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let path = tool(program).ok_or_else(|| format!("{program} is not installed"))?;
    let mut child = Command::new(path)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("run {program}: {e}"))?;
    if let Some(mut input) = child.stdin.take() {
        input
            .write_all(stdin.as_bytes())
            .map_err(|e| format!("write to {program}: {e}"))?;
    }
    let out = child
        .wait_with_output()
        .map_err(|e| format!("wait for {program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{program} {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

const IP_FORWARD: &str = "/proc/sys/net/ipv4/ip_forward";

impl Tools for HostTools {
    fn links(&mut self) -> Vec<String> {
        std::fs::read_dir("/sys/class/net")
            .map(|d| {
                d.filter_map(Result::ok)
                    .filter_map(|e| e.file_name().into_string().ok())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn ifindex(&mut self, name: &str) -> Option<u32> {
        std::fs::read_to_string(format!("/sys/class/net/{name}/ifindex"))
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    fn ip_host(&mut self, script: &str) -> Result<(), Failure> {
        run("ip", &["-batch", "-"], script).map(drop)
    }

    fn ip_in(&mut self, pid: i32, script: &str) -> Result<(), Failure> {
        use std::fs::File;
        use std::os::fd::AsFd;
        let open = |p: &str| File::open(p).map_err(|e| format!("open {p}: {e}"));
        let ns = open(&format!("/proc/{pid}/ns/net"))?;
        let home = open("/proc/self/ns/net")?;
        crate::sys::in_net_ns(ns.as_fd(), home.as_fd(), || {
            Ok(run("ip", &["-batch", "-"], script))
        })
        .map_err(|e| format!("enter the sandbox's network namespace: {e}"))?
        .map(drop)
    }

    fn nft(&mut self, script: &str) -> Result<(), Failure> {
        run("nft", &["-f", "-"], script).map(drop)
    }

    fn tables(&mut self) -> Vec<String> {
        run("nft", &["list", "tables", "inet"], "")
            .map(|out| {
                out.lines()
                    .filter_map(|l| l.strip_prefix("table inet "))
                    .map(|t| t.trim().to_owned())
                    .collect()
            })
            .unwrap_or_default()
    }

    fn forwarding(&mut self) -> bool {
        std::fs::read_to_string(IP_FORWARD).is_ok_and(|v| v.trim() == "1")
    }

    fn set_forwarding(&mut self, on: bool) -> Result<(), Failure> {
        std::fs::write(IP_FORWARD, if on { "1" } else { "0" })
            .map_err(|e| format!("write {IP_FORWARD}: {e}"))
    }

    fn mark(&mut self) -> bool {
        forwarding_marked()
    }

    fn set_mark(&mut self, present: bool) {
        let _ = if present {
            std::fs::write(FORWARDING_MARK, "0\n")
        } else {
            std::fs::remove_file(FORWARDING_MARK)
        };
    }

    fn hold(&mut self) -> Result<Held, Failure> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(FORWARDING_LOCK)
            .map_err(|e| format!("open {FORWARDING_LOCK}: {e}"))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| format!("lock {FORWARDING_LOCK}: {e}"))?;
        Ok(Held(Some(file)))
    }
}

/// Where the host's commands are looked for (the agent's `PATH` may lack the
/// `sbin` directories).
const TOOL_DIRS: [&str; 4] = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"];

/// The absolute path of command `name`, if it is installed.
fn tool(name: &str) -> Option<std::path::PathBuf> {
    TOOL_DIRS
        .iter()
        .map(|d| std::path::Path::new(d).join(name))
        .find(|p| p.is_file())
}

/// Whether sprout turned the host's forwarding on (its mark is there): an agent that
/// made no table still checks, as it stops, whether it is the last to need it.
pub(crate) fn forwarding_marked() -> bool {
    std::path::Path::new(FORWARDING_MARK).exists()
}

/// Whether the `nft` command is installed (without it no agent made a table).
pub fn nft_installed() -> bool {
    tool("nft").is_some()
}

/// Checks that the commands an egress sandbox needs are installed; the error names
/// what is missing and where it was looked for.
pub fn check_tools() -> Result<(), String> {
    for (name, package) in [("ip", "iproute2"), ("nft", "nftables")] {
        if tool(name).is_none() {
            return Err(format!(
                "network egress needs the {name} command ({package}); it is not in {}",
                TOOL_DIRS.join(", ")
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every step; links and tables live in memory.
    #[derive(Default)]
    struct Fake {
        steps: Vec<String>,
        links: Vec<String>,
        tables: Vec<String>,
        forwarding: bool,
        mark: bool,
        /// Fails `ip_in` (the sandbox side).
        fail_inside: bool,
        /// Fails `link add` with this error (before creating anything).
        fail_link_add: Option<String>,
        /// Fails `addr add` with this error.
        fail_addr: Option<String>,
        /// The interface indexes of the links `link add` made.
        ifindexes: HashMap<String, u32>,
    }

    impl Tools for Fake {
        fn hold(&mut self) -> Result<Held, Failure> {
            Ok(Held(None))
        }
        fn links(&mut self) -> Vec<String> {
            self.links.clone()
        }
        fn ifindex(&mut self, name: &str) -> Option<u32> {
            self.links.iter().any(|l| l == name).then_some(())?;
            // The index a link is made with; 0 for one the test put in `links`.
            Some(self.ifindexes.get(name).copied().unwrap_or(0))
        }
        fn ip_host(&mut self, script: &str) -> Result<(), Failure> {
            self.steps
                .push(format!("ip: {}", script.lines().next().unwrap()));
            let words: Vec<&str> = script.split_whitespace().collect();
            match words[..] {
                ["link", "add", name, ..] => {
                    assert_eq!(script.lines().count(), 1, "link add runs alone");
                    if let Some(e) = &self.fail_link_add {
                        return Err(e.clone());
                    }
                    if self.links.iter().any(|l| l == name) {
                        return Err("RTNETLINK answers: File exists".into());
                    }
                    self.links.push(name.into());
                    let index = 1 + self.ifindexes.len() as u32;
                    self.ifindexes.insert(name.into(), index);
                }
                ["addr", "add", ..] => {
                    if let Some(e) = &self.fail_addr {
                        return Err(e.clone());
                    }
                }
                ["link", "del", name] => self.links.retain(|l| l != name),
                _ => {}
            }
            Ok(())
        }
        fn ip_in(&mut self, pid: i32, script: &str) -> Result<(), Failure> {
            self.steps
                .push(format!("ip in {pid}: {}", script.lines().count()));
            if self.fail_inside {
                return Err("no".into());
            }
            Ok(())
        }
        fn nft(&mut self, script: &str) -> Result<(), Failure> {
            let first = script.lines().next().unwrap();
            self.steps.push(format!("nft: {first}"));
            let name = first.rsplit(' ').next().unwrap().to_owned();
            if first.starts_with("delete") {
                self.tables.retain(|t| *t != name);
            } else if !self.tables.contains(&name) {
                self.tables.push(name);
            }
            Ok(())
        }
        fn tables(&mut self) -> Vec<String> {
            self.tables.clone()
        }
        fn forwarding(&mut self) -> bool {
            self.forwarding
        }
        fn set_forwarding(&mut self, on: bool) -> Result<(), Failure> {
            self.steps.push(format!("forwarding {on}"));
            self.forwarding = on;
            Ok(())
        }
        fn mark(&mut self) -> bool {
            self.mark
        }
        fn set_mark(&mut self, present: bool) {
            self.mark = present;
        }
    }

    #[test]
    fn slots_name_links_under_fifteen_characters_and_own_a_slash_30() {
        let s = Slot(0);
        assert_eq!(s.host_link(), "sprout-e0");
        assert_eq!(s.host_address(), Ipv4Addr::new(10, 231, 0, 1));
        assert_eq!(s.sandbox_address(), Ipv4Addr::new(10, 231, 0, 2));
        let s = Slot(65);
        assert_eq!(s.host_address(), Ipv4Addr::new(10, 231, 1, 5));
        assert_eq!(s.sandbox_address(), Ipv4Addr::new(10, 231, 1, 6));
        let last = Slot(SLOTS - 1);
        assert_eq!(last.sandbox_address(), Ipv4Addr::new(10, 231, 255, 254));
        assert!(last.host_link().len() <= 15, "{}", last.host_link());
        assert_eq!(Slot::of_link("sprout-e65"), Some(Slot(65)));
        for other in [
            "sprout-e",
            "sprout-e065",
            "sprout-e16384",
            "eth0",
            "sprout-ex",
        ] {
            assert_eq!(Slot::of_link(other), None, "{other}");
        }
    }

    #[test]
    fn only_none_and_egress_are_networks() {
        assert_eq!(Network::parse("egress"), Ok(Network::Egress));
        assert_eq!(Network::parse("none"), Ok(Network::None));
        assert_eq!(
            Network::parse("host").unwrap_err(),
            "unknown network \"host\" (none or egress)"
        );
        assert_eq!(Network::default(), Network::None);
    }

    #[test]
    fn the_table_filters_every_sprout_link_and_masquerades_the_block() {
        let s = table_script("42");
        assert!(s.starts_with("add table inet sprout-42\ndelete table inet sprout-42\n"));
        for rule in [
            "type filter hook input priority filter - 10; policy accept;\n\t\tiifname \"sprout-e*\" drop",
            "iifname \"sprout-e*\" meta nfproto ipv6 drop",
            "type filter hook prerouting priority dstnat - 10; policy accept;\n\t\tiifname \"sprout-e*\" fib daddr type local drop",
            "iifname \"sprout-e*\" ip daddr { 10.231.0.0/16, 169.254.0.0/16, 168.63.129.16/32, 100.100.100.200/32 } drop",
            "iifname \"sprout-e*\" ct status dnat drop",
            "iifname \"sprout-e*\" oifname \"sprout-e*\" drop",
            "oifname \"sprout-e*\" ct state established,related accept\n\t\toifname \"sprout-e*\" drop",
            "ip saddr 10.231.0.0/16 oifname != \"sprout-e*\" masquerade",
        ] {
            assert!(s.contains(rule), "{rule} missing from\n{s}");
        }
        assert_eq!(
            link_add(Slot(1), 77),
            "link add sprout-e1 type veth peer name eth0 netns 77\n"
        );
        assert_eq!(
            host_batch(Slot(1)),
            "addr add 10.231.0.5/30 dev sprout-e1\nlink set sprout-e1 up\n"
        );
        assert_eq!(
            sandbox_batch(Slot(1)),
            "addr add 10.231.0.6/30 dev eth0\nlink set eth0 up\nroute add default via 10.231.0.5\n"
        );
    }

    #[test]
    fn the_table_comes_with_the_first_sandbox_and_goes_with_the_last() {
        let mut e = Egress::new("7".into(), Fake::default());
        // Another agent's sandbox holds slot 0; its table is not ours to remove.
        e.tools.links.push("sprout-e0".into());
        e.tools.tables.push("sprout-8".into());
        assert_eq!(e.attach("a", 100), Ok(Slot(1)));
        assert_eq!(e.attach("b", 101), Ok(Slot(2)));
        assert!(
            e.attach("a", 100).is_err(),
            "a second network for one sandbox"
        );
        assert_eq!(
            e.tools.steps,
            [
                "forwarding true",
                "ip: link add sprout-e1 type veth peer name eth0 netns 100",
                "ip: addr add 10.231.0.5/30 dev sprout-e1",
                "nft: add table inet sprout-7",
                "ip in 100: 3",
                "ip: link add sprout-e2 type veth peer name eth0 netns 101",
                "ip: addr add 10.231.0.9/30 dev sprout-e2",
                "ip in 101: 3",
            ]
        );
        assert!(e.tools.mark, "forwarding was off: the mark remembers it");
        e.tools.steps.clear();
        e.detach("a");
        e.detach("a");
        assert_eq!(e.tools.steps, ["ip: link del sprout-e1"]);
        e.detach("b");
        assert_eq!(e.tools.tables, ["sprout-8"]);
        assert!(
            e.tools.forwarding,
            "another agent's table is left: forwarding stays"
        );
        // Agent 8 looks gone (another pid namespace, maybe), but a sandbox link
        // exists: its table stays.
        let held = remove_stale_tables(&mut e.tools, |id| id != "8").unwrap_err();
        assert!(held.contains("link sprout-e0 exists"), "{held}");
        assert_eq!(e.tools.tables, ["sprout-8"]);
        assert_eq!(remove_stale_tables(&mut e.tools, |_| true), Ok(Vec::new()));
        // Its sandbox's namespace went, and the link with it.
        e.tools.links.clear();
        assert_eq!(
            remove_stale_tables(&mut e.tools, |id| id != "8"),
            Ok(vec!["8".to_owned()])
        );
        assert!(e.tools.tables.is_empty());
        assert!(
            !e.tools.forwarding && !e.tools.mark,
            "the last table restores forwarding"
        );
    }

    #[test]
    fn a_slot_taken_meanwhile_is_skipped_and_a_failure_undoes_everything() {
        let mut e = Egress::new("7".into(), Fake::default());
        e.tools.forwarding = true;
        // Slot 0 is claimed between the listing and the creation.
        let mut racing = Fake {
            forwarding: true,
            ..Fake::default()
        };
        racing.links.push("sprout-e0".into());
        // `links()` reports nothing, yet creating slot 0 fails: the next is used.
        struct Hidden(Fake);
        impl Tools for Hidden {
            fn hold(&mut self) -> Result<Held, Failure> {
                Ok(Held(None))
            }
            fn links(&mut self) -> Vec<String> {
                Vec::new()
            }
            fn ifindex(&mut self, name: &str) -> Option<u32> {
                self.0.ifindex(name)
            }
            fn ip_host(&mut self, s: &str) -> Result<(), Failure> {
                self.0.ip_host(s)
            }
            fn ip_in(&mut self, pid: i32, s: &str) -> Result<(), Failure> {
                self.0.ip_in(pid, s)
            }
            fn nft(&mut self, s: &str) -> Result<(), Failure> {
                self.0.nft(s)
            }
            fn tables(&mut self) -> Vec<String> {
                self.0.tables()
            }
            fn forwarding(&mut self) -> bool {
                self.0.forwarding()
            }
            fn set_forwarding(&mut self, on: bool) -> Result<(), Failure> {
                self.0.set_forwarding(on)
            }
            fn mark(&mut self) -> bool {
                self.0.mark()
            }
            fn set_mark(&mut self, present: bool) {
                self.0.set_mark(present)
            }
        }
        let mut h = Egress::new("7".into(), Hidden(racing));
        assert_eq!(h.attach("a", 5), Ok(Slot(1)));
        assert!(!h.tools.0.mark, "forwarding was on: nothing to restore");

        e.tools.fail_inside = true;
        let err = e.attach("a", 9).unwrap_err();
        assert!(err.contains("configure the sandbox's eth0"), "{err}");
        assert!(e.tools.links.is_empty(), "{:?}", e.tools.links);
        assert!(e.tools.tables.is_empty(), "{:?}", e.tools.tables);
        assert!(!e.has("a"));
    }

    #[test]
    fn only_the_link_creation_says_a_slot_is_taken_and_only_a_link_made_here_is_deleted() {
        // The host already uses the slot's address: an error, not "slot taken",
        // and the link this call made is gone.
        let mut e = Egress::new("7".into(), Fake::default());
        e.tools.fail_addr = Some("RTNETLINK answers: File exists".into());
        let err = e.attach("a", 9).unwrap_err();
        assert!(err.contains("address the link sprout-e0"), "{err}");
        assert!(e.tools.links.is_empty(), "{:?}", e.tools.links);
        assert!(e.tools.tables.is_empty(), "{:?}", e.tools.tables);
        assert_eq!(
            e.tools
                .steps
                .iter()
                .filter(|s| s.starts_with("ip: link add"))
                .count(),
            1,
            "{:?}",
            e.tools.steps
        );
        assert!(!e.tools.forwarding && !e.tools.mark, "forwarding restored");

        // Creating the link fails for another reason: nothing is deleted (the name
        // may be another agent's by now).
        let mut e = Egress::new("7".into(), Fake::default());
        e.tools.fail_link_add = Some("RTNETLINK answers: Operation not permitted".into());
        let err = e.attach("a", 9).unwrap_err();
        assert!(
            err.contains(
                "make the veth pair sprout-e0: RTNETLINK answers: Operation not permitted"
            ),
            "{err}"
        );
        assert!(
            !e.tools.steps.iter().any(|s| s.contains("link del")),
            "{:?}",
            e.tools.steps
        );
        assert!(!e.has("a"));
    }

    #[test]
    fn a_link_gone_with_its_sandbox_and_made_again_by_another_agent_is_left_alone() {
        let mut e = Egress::new("7".into(), Fake::default());
        assert_eq!(e.attach("a", 9), Ok(Slot(0)));
        assert_eq!(e.attach("b", 10), Ok(Slot(1)));
        // Sandbox a's namespace went, its link with it; another agent took the name.
        e.tools.links.retain(|l| l != "sprout-e0");
        e.tools.links.push("sprout-e0".into());
        e.tools.ifindexes.insert("sprout-e0".into(), 100);
        e.tools.steps.clear();
        e.detach("a");
        assert!(e.tools.links.contains(&"sprout-e0".to_owned()));
        assert!(e.tools.steps.is_empty(), "{:?}", e.tools.steps);
        // Sandbox b's link is its own: deleted.
        e.detach("b");
        assert_eq!(
            e.tools.steps,
            [
                "ip: link del sprout-e1",
                "nft: delete table inet sprout-7",
                "forwarding false"
            ]
        );
        assert_eq!(e.tools.links, ["sprout-e0"]);
    }
}
