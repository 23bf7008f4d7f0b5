//! What a function can reach on the network: its own loopback always, the host's
//! never; nothing outside without `network: egress`.

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::sync::Mutex;
use std::time::Duration;

use sprout_tests::netns::{self, TestNetns};
use sprout_tests::{body_json, json, nft_tables, require_root, text, wait_for, Daemon, Env, Value};

/// Egress tests take turns: each checks at its end that no sandbox link is left.
static EGRESS: Mutex<()> = Mutex::new(());

/// Listens and connects on the sandbox's own 127.0.0.1, then tries each address in
/// `event["reach"]` (`"host:port"`). Never raises: every observation is a value.
const NET_PY: &str = r#"import errno, os, socket

def _try(host, port):
    try:
        s = socket.create_connection((host, port), timeout=2)
        s.sendall(b"ping")
        got = s.recv(64)
        s.close()
        return "connected:" + got.decode(errors="replace")
    except OSError as e:
        return errno.errorcode.get(e.errno, type(e).__name__) if e.errno else type(e).__name__

def f(event):
    out = {}
    srv = socket.socket()
    try:
        srv.bind(("127.0.0.1", 0))
        srv.listen(1)
        port = srv.getsockname()[1]
        c = socket.create_connection(("127.0.0.1", port), timeout=2)
        peer, _ = srv.accept()
        c.sendall(b"hello")
        out["loopback"] = peer.recv(64).decode()
        peer.close(); c.close()
    except OSError as e:
        out["loopback"] = errno.errorcode.get(e.errno, str(e))
    finally:
        srv.close()
    out["reach"] = {a: _try(a.rsplit(":", 1)[0], int(a.rsplit(":", 1)[1])) for a in event.get("reach", [])}
    gw = None
    with open("/proc/net/route") as fh:
        for line in fh.readlines()[1:]:
            f = line.split()
            if f[1] == "00000000":
                gw = socket.inet_ntoa(bytes.fromhex(f[2])[::-1])
    out["gateway"] = gw
    if gw and "gateway_port" in event:
        out["reach_gateway"] = _try(gw, event["gateway_port"])
    out["resolv_conf"] = os.path.exists("/etc/resolv.conf") and open("/etc/resolv.conf").read() != ""
    return out
"#;

/// A listener on the host's loopback that counts nothing but the connections it
/// accepts (answers "pong" to each).
fn host_listener() -> (TcpListener, String) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    l.set_nonblocking(true).unwrap();
    (l, addr)
}

/// Whether `l` accepted any connection.
fn accepted_any(l: &TcpListener) -> bool {
    match l.accept() {
        Ok((mut s, _)) => {
            let mut b = [0u8; 4];
            let _ = s.read(&mut b);
            true
        }
        Err(_) => false,
    }
}

fn run(env: &Env, args: &[&str], event: Value) -> Value {
    let dir = env.function("net", &[("f.py", NET_PY)]);
    let run = env
        .sprout()
        .arg("invoke")
        .arg(&dir)
        .args(args)
        .arg(event.to_string())
        .run();
    run.success();
    let out = run.json();
    env.assert_clean(run.pid);
    out
}

#[test]
fn a_function_uses_its_own_loopback_but_not_the_hosts() {
    let env = require_root!();
    let (host, addr) = host_listener();
    let out = run(&env, &[], json!({"reach": [addr]}));
    assert_eq!(out["loopback"], "hello", "{out}");
    let tried = &out["reach"][&addr];
    assert!(
        !tried.as_str().unwrap_or("").starts_with("connected"),
        "the sandbox reached the host's loopback: {out}"
    );
    assert!(!accepted_any(&host), "the host's listener saw a connection");
}

/// A network namespace of the test's own ([`TestNetns`], `sprout-t<n>` on the host,
/// 10.232/16) whose process is a TCP server answering "pong" to whatever connects
/// on port 8080, also at a link-local address (where clouds put their metadata
/// service). Removed when dropped.
struct TestNet {
    netns: TestNetns,
    /// The server's `address:port`.
    addr: String,
    /// The host side's address.
    host_addr: String,
    /// The same server at a link-local address.
    link_local: String,
}

impl TestNet {
    fn new() -> TestNet {
        let server = r#"import socket, threading
s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 8080)); s.listen(16)
def serve(c):
    try:
        c.settimeout(5); c.recv(64); c.sendall(b"pong")
    finally:
        c.close()
while True:
    c, _ = s.accept()
    threading.Thread(target=serve, args=(c,), daemon=True).start()
"#;
        let netns = TestNetns::new('t', 232, &["python3", "-c", server]);
        let (a, b) = netns.slot;
        netns::run(
            "ip",
            &[
                "addr",
                "add",
                &format!("169.254.{a}.{}/30", b + 1),
                "dev",
                netns.link(),
            ],
        );
        netns.ip_inside(&[
            "addr",
            "add",
            &format!("169.254.{a}.{}/30", b + 2),
            "dev",
            "eth0",
        ]);
        let net = TestNet {
            addr: format!("{}:8080", netns.addr),
            host_addr: netns.host_addr.clone(),
            link_local: format!("169.254.{a}.{}:8080", b + 2),
            netns,
        };
        let ready = wait_for(Duration::from_secs(10), || {
            TcpStream::connect_timeout(&net.addr.parse().unwrap(), Duration::from_millis(200))
        });
        assert!(
            ready.is_ok(),
            "the test's server at {} (namespace of {}) never answered",
            net.addr,
            net.netns.pid()
        );
        net
    }
}

/// The host's own address on its default route.
fn host_address() -> Option<String> {
    let out = Command::new("ip")
        .args(["-4", "route", "get", "1.1.1.1"])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let mut words = text.split_whitespace();
    words.find(|w| *w == "src")?;
    words.next().map(str::to_owned)
}

/// The host's `sprout-e*` links (egress sandboxes'), from any agent.
fn sandbox_links() -> Vec<String> {
    std::fs::read_dir("/sys/class/net")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with("sprout-e"))
        .collect()
}

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .unwrap()
        .trim()
        .to_owned()
}

/// Checks that egress left nothing: no sandbox link, not agent `pid`'s table, and
/// forwarding as it was `before` once no sprout table is left.
#[track_caller]
fn assert_network_clean(pid: u32, before: &str) {
    let left = wait_for(Duration::from_secs(10), || {
        let links = sandbox_links();
        links.is_empty().then_some(()).ok_or(links)
    });
    assert!(left.is_ok(), "sandbox links left: {left:?}");
    let tables = nft_tables();
    assert!(!tables.contains(&format!("sprout-{pid}")), "{tables:?}");
    if !tables.iter().any(|t| t.starts_with("sprout-")) {
        assert_eq!(ip_forward(), before, "net.ipv4.ip_forward was not restored");
        assert!(!std::path::Path::new("/run/sprout.ip_forward-was-off").exists());
    }
}

#[test]
fn only_an_egress_function_reaches_a_server_outside_and_never_the_host() {
    let env = require_root!();
    let _turn = EGRESS.lock().unwrap_or_else(|e| e.into_inner());
    let forward_before = ip_forward();
    let net = TestNet::new();
    let (host_lo, host_lo_addr) = host_listener();
    // Everything the host listens on (0.0.0.0): its own addresses, the sandbox's
    // gateway, the test link's host side.
    let host_any = TcpListener::bind("0.0.0.0:0").unwrap();
    host_any.set_nonblocking(true).unwrap();
    let port = host_any.local_addr().unwrap().port();
    let mut reach = vec![
        net.addr.clone(),
        net.link_local.clone(),
        host_lo_addr.clone(),
        format!("{}:{port}", net.host_addr),
    ];
    if let Some(a) = host_address() {
        reach.push(format!("{a}:{port}"));
    }
    let event = json!({"reach": reach, "gateway_port": port});

    let none = run(&env, &[], event.clone());
    assert_ne!(none["reach"][&net.addr], "connected:pong", "{none}");
    assert_eq!(none["resolv_conf"], false, "{none}");
    assert_eq!(none["gateway"], Value::Null, "{none}");

    let egress = run(&env, &["--network", "egress"], event.clone());
    assert_eq!(egress["reach"][&net.addr], "connected:pong", "{egress}");
    assert_eq!(egress["loopback"], "hello", "{egress}");
    assert_eq!(egress["resolv_conf"], true, "{egress}");
    assert!(
        egress["gateway"]
            .as_str()
            .unwrap_or("")
            .starts_with("10.231."),
        "{egress}"
    );
    for (what, tried) in egress["reach"].as_object().unwrap() {
        if *what != net.addr {
            assert!(
                !tried.as_str().unwrap().starts_with("connected"),
                "{what}: {egress}"
            );
        }
    }
    assert!(
        !egress["reach_gateway"]
            .as_str()
            .unwrap()
            .starts_with("connected"),
        "{egress}"
    );
    assert!(
        !accepted_any(&host_lo),
        "the host's loopback saw a connection"
    );
    assert!(
        !accepted_any(&host_any),
        "the host's own addresses saw a connection"
    );
    let pid = std::process::id();
    let _ = pid;
    assert_network_clean(0, &forward_before);
}

/// Stays up between invocations (warm): `{"listen": port}` starts a listener that
/// counts connections and returns the sandbox's address; `{}` returns the count.
const LISTENER_PY: &str = r#"import socket, threading
_count = [0]
def _serve(s):
    while True:
        c, _ = s.accept()
        _count[0] += 1
        c.close()
def f(event):
    if "listen" in event:
        s = socket.socket(); s.bind(("0.0.0.0", event["listen"])); s.listen(4)
        threading.Thread(target=_serve, args=(s,), daemon=True).start()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM); u.connect((event["via"], 9))
        return {"address": u.getsockname()[0]}
    return {"accepted": _count[0]}
"#;

#[test]
fn egress_sandboxes_cannot_reach_each_other_and_their_network_goes_with_them() {
    let env = require_root!();
    let _turn = EGRESS.lock().unwrap_or_else(|e| e.into_inner());
    let forward_before = ip_forward();
    let net = TestNet::new();
    let mut d = env.daemon();
    let listener = env.function("listener", &[("f.py", LISTENER_PY)]);
    let prober = env.function("net", &[("f.py", NET_PY)]);
    d.register("listener", &listener, json!({"network": "egress"}));
    d.register("prober", &prober, json!({"network": "egress"}));
    let via = net.addr.split(':').next().unwrap().to_owned();
    let r = d.invoke("listener", &json!({"listen": 7777, "via": via}).to_string());
    assert_eq!(r.status, 200, "{}", text(&r));
    let address = body_json(&r)["address"].as_str().unwrap().to_owned();
    assert!(address.starts_with("10.231."), "{address}");
    let target = format!("{address}:7777");
    let r = d.invoke("prober", &json!({"reach": [target, net.addr]}).to_string());
    assert_eq!(r.status, 200, "{}", text(&r));
    let out = body_json(&r);
    assert_eq!(out["reach"][&net.addr], "connected:pong", "{out}");
    assert!(
        !out["reach"][&target]
            .as_str()
            .unwrap()
            .starts_with("connected"),
        "{out}"
    );
    let r = d.invoke("listener", "{}");
    assert_eq!(
        body_json(&r)["accepted"],
        0,
        "another sandbox got through: {}",
        text(&r)
    );
    assert_eq!(sandbox_links().len(), 2, "{:?}", sandbox_links());
    assert!(
        nft_tables().contains(&format!("sprout-{}", d.pid())),
        "{:?}",
        nft_tables()
    );

    // A network name sprout does not know is refused, naming what it accepts.
    let r = d.request(
        "PUT",
        "/functions/bad",
        Some("application/json"),
        json!({"path": prober.to_str().unwrap(), "network": "host"})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(
        body_json(&r)["error"]["kind"],
        "bad_request",
        "{}",
        text(&r)
    );
    assert_eq!(
        body_json(&r)["error"]["message"],
        "unknown network \"host\" (none or egress)"
    );

    let pid = d.pid();
    d.terminate();
    env.assert_clean(pid);
    assert_network_clean(pid, &forward_before);
}

/// Registers and invokes an egress function on `d`; returns its sandbox's link.
fn egress_instance(env: &Env, d: &sprout_tests::Daemon) {
    let dir = env.function("net", &[("f.py", NET_PY)]);
    d.register("net", &dir, json!({"network": "egress"}));
    let r = d.invoke("net", "{}");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(sandbox_links().len(), 1, "{:?}", sandbox_links());
    assert!(
        nft_tables().contains(&format!("sprout-{}", d.pid())),
        "{:?}",
        nft_tables()
    );
}

#[test]
fn a_crashed_agents_network_is_removed_by_its_spawner() {
    let env = require_root!();
    let (_turn, forward_before, mut d) = egress_daemon(&env);
    let pid = d.pid();
    d.kill();
    env.assert_clean_within(pid, Duration::from_secs(10));
    assert_network_clean(pid, &forward_before);
}

/// Takes the egress turn, notes forwarding, and starts a daemon with one egress
/// instance up.
fn egress_daemon(env: &Env) -> (std::sync::MutexGuard<'static, ()>, String, Daemon) {
    let turn = EGRESS.lock().unwrap_or_else(|e| e.into_inner());
    let forward_before = ip_forward();
    let d = env.daemon();
    egress_instance(env, &d);
    (turn, forward_before, d)
}

/// SIGKILLs the daemon's spawner, runs `then` at once, waits for the spawner to be
/// gone and checks that the agent's table stayed.
fn kill_spawner(d: &mut Daemon, then: impl FnOnce(&mut Daemon)) {
    let (pid, spawner) = (d.pid(), d.spawner_pid());
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(spawner as i32),
        nix::sys::signal::Signal::SIGKILL,
    );
    then(d);
    let gone = wait_for(Duration::from_secs(5), || {
        (!sprout_tests::alive(spawner)).then_some(()).ok_or(())
    });
    assert!(gone.is_ok(), "the spawner {spawner} outlived SIGKILL");
    assert!(
        nft_tables().contains(&format!("sprout-{pid}")),
        "{:?}",
        nft_tables()
    );
}

/// The spawner dies with an egress sandbox and its table; the agent lives on (with a
/// new spawner, which made no table) and removes that table when it stops: its
/// state directory says a spawner of its own began to give a sandbox a network.
#[test]
fn a_dead_spawners_table_is_removed_when_its_agent_stops() {
    let env = require_root!();
    let (_turn, forward_before, mut d) = egress_daemon(&env);
    let pid = d.pid();
    kill_spawner(&mut d, |_| ());
    d.terminate();
    env.assert_clean(pid);
    assert_network_clean(pid, &forward_before);
}

#[test]
fn a_crashed_agent_and_spawner_network_is_removed_by_the_next_agent() {
    let env = require_root!();
    let (_turn, forward_before, mut d) = egress_daemon(&env);
    let pid = d.pid();
    // Both die at once: the sandbox, its link and the agent's table stay.
    kill_spawner(&mut d, Daemon::kill);

    // The next agent on the same state directory removes it all.
    let run = env
        .sprout()
        .arg("invoke")
        .arg(env.work_dir().join("fns/net"))
        .arg("{}")
        .run();
    run.success();
    env.assert_clean(pid);
    env.assert_clean(run.pid);
    assert_network_clean(pid, &forward_before);
}

/// Port forwards on the host, as Docker's `-p` or a Kubernetes hostPort makes one
/// (TCP to port `port` of any of the host's own addresses goes to `to`) and as
/// kube-proxy makes one for a service address the host does not own
/// ([`SERVICE_ADDRESS`], same port). They live in an nftables table of the test's
/// own (`ip sprout-t<pid>`), removed when dropped.
struct HostPortForward {
    table: String,
    port: u16,
}

impl HostPortForward {
    fn new(to: &str) -> HostPortForward {
        // A port nothing on the host listens on, held while the rule exists.
        let port = TcpListener::bind("0.0.0.0:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let table = format!("sprout-t{}", std::process::id());
        let forward = HostPortForward { table, port };
        let script = format!(
            "table ip {t} {{\n\tchain prerouting {{\n\t\ttype nat hook prerouting priority dstnat; policy accept;\n\t\tfib daddr type local tcp dport {port} dnat to {to}\n\t\tip daddr {SERVICE_ADDRESS} tcp dport {port} dnat to {to}\n\t}}\n}}\n",
            t = forward.table
        );
        let mut nft = Command::new("nft")
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        use std::io::Write;
        nft.stdin
            .take()
            .unwrap()
            .write_all(script.as_bytes())
            .unwrap();
        assert!(nft.wait().unwrap().success(), "nft -f:\n{script}");
        forward
    }
}

/// A service address forwarded by [`HostPortForward`] (TEST-NET-2: nobody's).
const SERVICE_ADDRESS: &str = "198.51.100.77";

impl Drop for HostPortForward {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "ip", &self.table])
            .output();
    }
}

#[test]
fn an_egress_function_does_not_reach_what_the_host_publishes_by_port_forwarding() {
    let env = require_root!();
    let _turn = EGRESS.lock().unwrap_or_else(|e| e.into_inner());
    let forward_before = ip_forward();
    let net = TestNet::new();
    let published = HostPortForward::new(&net.addr);
    let port = published.port;
    let mut reach = vec![
        format!("{}:{port}", net.host_addr),
        format!("{SERVICE_ADDRESS}:{port}"),
    ];
    if let Some(a) = host_address() {
        reach.push(format!("{a}:{port}"));
    }
    let event = json!({"reach": reach, "gateway_port": port});
    let egress = run(&env, &["--network", "egress"], event);
    let mut tried = vec![egress["reach_gateway"].clone()];
    tried.extend(egress["reach"].as_object().unwrap().values().cloned());
    for t in tried {
        assert!(
            !t.as_str().unwrap_or("").starts_with("connected"),
            "a port the host forwards to {} was reached: {egress}",
            net.addr
        );
    }
    drop(published);
    assert!(
        !nft_tables_ip().iter().any(|t| t.starts_with("sprout-t")),
        "{:?}",
        nft_tables_ip()
    );
    assert_network_clean(0, &forward_before);
}

/// The host's `ip` nftables tables.
fn nft_tables_ip() -> Vec<String> {
    let out = Command::new("nft")
        .args(["list", "tables", "ip"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.strip_prefix("table ip "))
        .map(|t| t.trim().to_owned())
        .collect()
}

/// An nftables table named as agent `id`'s (an agent this test's pid namespace does
/// not see), removed when dropped.
struct ForeignTable(String);

impl ForeignTable {
    fn new(id: u32) -> ForeignTable {
        let name = format!("sprout-{id}");
        let out = Command::new("nft")
            .args(["add", "table", "inet", &name])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        ForeignTable(name)
    }
}

impl Drop for ForeignTable {
    fn drop(&mut self) {
        let _ = Command::new("nft")
            .args(["delete", "table", "inet", &self.0])
            .output();
    }
}

#[test]
fn no_agents_table_is_taken_for_stale_while_a_sandbox_link_exists() {
    let env = require_root!();
    let _turn = EGRESS.lock().unwrap_or_else(|e| e.into_inner());
    let forward_before = ip_forward();
    let mut d = env.daemon();
    egress_instance(&env, &d);
    // Above any pid_max: no process here has this id, as none has the id of an
    // agent in another pid namespace sharing this network namespace.
    let foreign = ForeignTable::new(999_999_999);
    // Another agent starts (and cleans up) while a sandbox link exists.
    let run = env
        .sprout()
        .arg("invoke")
        .arg(env.work_dir().join("fns/net"))
        .arg("{}")
        .run();
    run.success();
    env.assert_clean(run.pid);
    assert!(
        nft_tables().contains(&foreign.0),
        "a table was removed while a sandbox link existed: {:?}",
        nft_tables()
    );
    let pid = d.pid();
    d.terminate();
    env.assert_clean(pid);
    // With no link left, the next agent's clean-up removes it.
    let run = env
        .sprout()
        .arg("invoke")
        .arg(env.work_dir().join("fns/net"))
        .arg("{}")
        .run();
    run.success();
    env.assert_clean(run.pid);
    assert!(
        !nft_tables().contains(&foreign.0),
        "a stale table outlived the last sandbox link: {:?}",
        nft_tables()
    );
    drop(foreign);
    assert_network_clean(pid, &forward_before);
}
