//! Scale-out under an OpenWhisk-style controller: three sprout nodes, each in a
//! network namespace of its own with its own TCP listener (reached over a veth
//! pair), driven by one client that places `POST /invoke` as OpenWhisk's sharding
//! load balancer does: each action has a home invoker (a hash of its names, as
//! upstream computes it), and an
//! activation overflows to the next invoker (by a step coprime with the number of
//! invokers) when its home has no free slot. The test checks that activations
//! spread and that each node's acknowledgements, activation records and metrics
//! agree; then it kills one node mid-run: its in-flight activations, acknowledged
//! early, come back as system errors (the connection ends before the completion,
//! which a controller takes as one), the balancer stops placing on it, and the
//! other nodes carry on.
//!
//! The namespaces are the test's own (`sprout_tests::netns`): nothing is named in
//! `/run/netns`, and the veth pairs are `sprout-l<n>` on the host.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use prometheus_parse::{Scrape, Value as Metric};
use sprout_tests::invoker::{
    activation_message, basic_auth, connect, key_file, read_body, send_invoke,
};
use sprout_tests::netns::TestNetns;
use sprout_tests::{body_json, json, require_root, text, wait_for, Daemon, Env, Value};

const STAR: &str = "3f2c7a1e-00ff-4c4e-9a55-0000000000ff:controller-secret-0123456789abcdef012345";
const NAMESPACE: &str = "lb";
const NODES: usize = 3;
/// How many activations the balancer places on one invoker at once before it
/// overflows (OpenWhisk's invoker user memory divided by the action's memory).
const SLOTS: usize = 2;
/// The actions: every one is the same echo with an optional sleep.
const ACTIONS: [&str; 4] = ["resize", "thumbnail", "transcode", "notify"];
const ECHO_PY: &str = "import time\n\ndef f(event):\n    time.sleep(event.get(\"sleep_ms\", 0) / 1000)\n    return {\"n\": event.get(\"n\")}\n";

/// One sprout node: a network namespace of the test's ([`TestNetns`], `sprout-l<n>`
/// on the host) and `sprout serve` inside it, listening on the namespace's address.
struct Node {
    daemon: Option<Daemon>,
    netns: Option<TestNetns>,
}

impl Node {
    fn start(env: &Env, index: usize, keys: &str) -> Node {
        let netns = TestNetns::new('l', 233, &["sleep", "3600"]);
        let listen = format!("{}:0", netns.addr);
        let id = index.to_string();
        // Each node its own sandbox uid range, as two agents on one host need.
        let uid_base = (0x7008_0000 + index * 1024).to_string();
        let net = format!("--net={}", netns.path());
        let data = env.work_dir().join(format!("node-{index}"));
        let daemon = Daemon::start_under(
            env,
            &data,
            &["nsenter", &net, "--"],
            &[
                "--stem-cells",
                "1",
                "--listen",
                &listen,
                "--auth",
                keys,
                "--invoker-id",
                &id,
                "--sandbox-uid-base",
                &uid_base,
                "--sandbox-uids",
                "1024",
            ],
        );
        Node {
            daemon: Some(daemon),
            netns: Some(netns),
        }
    }

    fn daemon(&self) -> &Daemon {
        self.daemon.as_ref().expect("a running node")
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        // The daemon (terminated and checked) before the namespace and its link.
        self.daemon.take();
        self.netns.take();
    }
}

/// Java's `String.hashCode`, which OpenWhisk's balancer hashes names with.
fn java_hash(text: &str) -> i32 {
    text.encode_utf16()
        .fold(0i32, |h, u| h.wrapping_mul(31).wrapping_add(i32::from(u)))
}

/// OpenWhisk's placement hash of an action: its namespace's hash XOR its fully
/// qualified name's, without the sign.
fn placement_hash(action: &str) -> usize {
    (java_hash(NAMESPACE) ^ java_hash(&format!("{NAMESPACE}/{action}"))).unsigned_abs() as usize
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// OpenWhisk's sharding placement, as its controller does it: the home invoker of
/// an action is its hash modulo the invokers, the step to the next is one of the
/// numbers coprime with their count, and an activation goes to the first healthy
/// invoker from home with a free slot; when none has one, to the first healthy one
/// (forced, as OpenWhisk does under overload).
struct Balancer {
    state: Mutex<Placement>,
}

struct Placement {
    in_flight: [usize; NODES],
    healthy: [bool; NODES],
}

impl Balancer {
    fn new() -> Balancer {
        Balancer {
            state: Mutex::new(Placement {
                in_flight: [0; NODES],
                healthy: [true; NODES],
            }),
        }
    }

    fn home(action: &str) -> usize {
        placement_hash(action) % NODES
    }

    fn step(action: &str) -> usize {
        let coprimes: Vec<usize> = (1..=NODES).filter(|&s| gcd(s, NODES) == 1).collect();
        coprimes[placement_hash(action) % coprimes.len()]
    }

    /// The invoker for `action`, its slot taken.
    fn place(&self, action: &str) -> usize {
        let mut s = self.state.lock().unwrap();
        let (home, step) = (Self::home(action), Self::step(action));
        let order: Vec<usize> = (0..NODES).map(|i| (home + i * step) % NODES).collect();
        let chosen = order
            .iter()
            .copied()
            .find(|&i| s.healthy[i] && s.in_flight[i] < SLOTS)
            .or_else(|| order.iter().copied().find(|&i| s.healthy[i]))
            .expect("a healthy invoker");
        s.in_flight[chosen] += 1;
        chosen
    }

    fn release(&self, invoker: usize) {
        self.state.lock().unwrap().in_flight[invoker] -= 1;
    }

    /// The invoker broke a connection: no more activations go to it.
    fn mark_unhealthy(&self, invoker: usize) {
        self.state.lock().unwrap().healthy[invoker] = false;
    }
}

/// What the controller made of one activation.
#[derive(Debug, Clone)]
struct Outcome {
    id: String,
    action: String,
    /// The invoker it was placed on.
    placed: usize,
    /// The completion message, or `None` when the connection ended before it.
    ack: Option<Value>,
    /// Whether the invoker acknowledged it (sent the head) before anything else.
    acknowledged: bool,
}

impl Outcome {
    /// A controller's verdict: the completion's, or a system error when the
    /// invoker went away without one.
    fn system_error(&self) -> bool {
        self.ack
            .as_ref()
            .is_none_or(|a| a["isSystemError"].as_bool() != Some(false))
    }
}

struct Controller {
    addrs: Vec<std::net::SocketAddr>,
    balancer: Balancer,
    next_id: AtomicU32,
}

impl Controller {
    /// Places and sends one activation of `action` with `content`; waits for its
    /// completion. `acked` is told once the early acknowledgement arrived.
    fn activate(
        &self,
        action: &str,
        content: Value,
        acked: Option<&(Mutex<usize>, Condvar)>,
    ) -> Outcome {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        let msg = activation_message(
            NAMESPACE,
            &format!("{NAMESPACE}/{action}"),
            0x5ca1_e000_0000 + u128::from(n),
            true,
            content,
        );
        let id = msg["activationId"].as_str().unwrap().to_owned();
        let placed = self.balancer.place(action);
        let mut outcome = Outcome {
            id,
            action: action.to_owned(),
            placed,
            ack: None,
            acknowledged: false,
        };
        let result =
            std::net::TcpStream::connect_timeout(&self.addrs[placed], Duration::from_secs(5))
                .and_then(|mut s| {
                    s.set_read_timeout(Some(Duration::from_secs(60)))?;
                    let head = send_invoke(&mut s, STAR, &msg)?;
                    assert!(
                        head.text.starts_with("HTTP/1.1 200 OK\r\n"),
                        "{}",
                        head.text
                    );
                    outcome.acknowledged = true;
                    if let Some((count, cv)) = acked {
                        *count.lock().unwrap() += 1;
                        cv.notify_all();
                    }
                    read_body(&mut s, head)
                });
        match result {
            Ok(answer) => outcome.ack = Some(answer.ack()),
            Err(_) => self.balancer.mark_unhealthy(placed),
        }
        self.balancer.release(placed);
        outcome
    }

    /// `jobs` (action, content) run by `threads` client threads at once.
    fn run_all(self: &Arc<Self>, jobs: Vec<(String, Value)>, threads: usize) -> Vec<Outcome> {
        let queue = Arc::new(Mutex::new(jobs));
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                let (me, queue) = (Arc::clone(self), Arc::clone(&queue));
                thread::spawn(move || {
                    let mut done = Vec::new();
                    loop {
                        let Some((action, content)) = queue.lock().unwrap().pop() else {
                            return done;
                        };
                        done.push(me.activate(&action, content, None));
                    }
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().expect("a client thread"))
            .collect()
    }
}

/// The invoker instance an acknowledgement names (functions-invoker's `invoker`).
fn acked_by(o: &Outcome) -> usize {
    let ack = o.ack.as_ref().expect("a completion");
    ack["invoker"]["instance"]
        .as_u64()
        .expect("an invoker instance") as usize
}

#[track_caller]
fn assert_succeeded(o: &Outcome) {
    let ack = o
        .ack
        .as_ref()
        .unwrap_or_else(|| panic!("{o:?}: no completion"));
    assert_eq!(ack["isSystemError"], false, "{ack}");
    let activation = &ack["response"];
    assert_eq!(activation["activationId"], o.id.as_str(), "{ack}");
    assert_eq!(activation["name"], o.action.as_str(), "{ack}");
    assert_eq!(activation["namespace"], NAMESPACE, "{ack}");
    assert_eq!(activation["response"]["statusCode"], 0, "{ack}");
    assert_eq!(
        acked_by(o),
        o.placed,
        "acknowledged by another invoker: {ack}"
    );
}

/// The activation ids node `d` has records of in the namespace.
fn recorded_ids(d: &Daemon) -> HashSet<String> {
    let r = d.request(
        "GET",
        &format!("/activations?namespace={NAMESPACE}&limit=200"),
        None,
        b"",
    );
    assert_eq!(r.status, 200, "{}", text(&r));
    let body = body_json(&r);
    let list = body
        .as_array()
        .or_else(|| body["activations"].as_array())
        .unwrap_or_else(|| panic!("a list of records: {body}"));
    list.iter()
        .map(|a| a["activation_id"].as_str().expect("an id").to_owned())
        .collect()
}

/// `sprout_namespace_invocations_total{namespace="lb"}` in node `d`'s metrics.
fn invocations_metric(d: &Daemon) -> f64 {
    let r = d.request("GET", "/metrics", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    let body = text(&r);
    let scrape = Scrape::parse(body.lines().map(|l| Ok(l.to_owned()))).expect("parse /metrics");
    scrape
        .samples
        .iter()
        .filter(|s| s.metric == "sprout_namespace_invocations_total")
        .filter(|s| s.labels.get("namespace") == Some(NAMESPACE))
        .map(|s| match s.value {
            Metric::Counter(n) | Metric::Untyped(n) => n,
            ref other => panic!("not a counter: {other:?}"),
        })
        .sum()
}

/// The ids each node acknowledged, from what the controller saw.
fn ids_by_node(outcomes: &[Outcome]) -> [HashSet<String>; NODES] {
    let mut by = [HashSet::new(), HashSet::new(), HashSet::new()];
    for o in outcomes.iter().filter(|o| o.ack.is_some()) {
        by[acked_by(o)].insert(o.id.clone());
    }
    by
}

/// Each node's records and metrics agree with what it acknowledged.
#[track_caller]
fn assert_books_agree(nodes: &[Node], outcomes: &[Outcome], skip: Option<usize>) {
    let by_node = ids_by_node(outcomes);
    for (i, node) in nodes.iter().enumerate() {
        if Some(i) == skip {
            continue;
        }
        let want = &by_node[i];
        let d = node.daemon();
        let found = wait_for(Duration::from_secs(10), || {
            let ids = recorded_ids(d);
            (ids == *want).then_some(()).ok_or(ids)
        });
        if let Err(ids) = found {
            panic!("node {i} has records of {ids:?}, acknowledged {want:?}");
        }
        assert_eq!(
            invocations_metric(d),
            want.len() as f64,
            "node {i}'s metric"
        );
    }
}

#[test]
fn activations_spread_over_nodes_and_a_killed_node_fails_only_its_own() {
    let env = require_root!();
    let keys = key_file(&env, "keys", &format!("* {STAR}\n"), 0o600);
    let keys = keys.to_str().unwrap();
    let mut nodes: Vec<Node> = (0..NODES).map(|i| Node::start(&env, i, keys)).collect();
    let function = env.function("echo", &[("f.py", ECHO_PY)]);
    for node in &nodes {
        for action in ACTIONS {
            node.daemon().register_in(NAMESPACE, action, &function);
        }
    }
    let homes: HashSet<usize> = ACTIONS.iter().map(|a| Balancer::home(a)).collect();
    assert_eq!(
        homes.len(),
        NODES,
        "the actions' homes cover every node: {homes:?}"
    );
    let controller = Arc::new(Controller {
        addrs: nodes.iter().map(|n| n.daemon().tcp_addr()).collect(),
        balancer: Balancer::new(),
        next_id: AtomicU32::new(1),
    });
    // The controller's health check: every invoker answers its ping.
    for (i, addr) in controller.addrs.iter().enumerate() {
        let mut s = connect(nodes[i].daemon());
        let ping = format!(
            "GET /ping HTTP/1.1\r\nHost: sprout\r\nAuthorization: {}\r\nConnection: close\r\n\r\n",
            basic_auth(STAR)
        );
        s.write_all(ping.as_bytes()).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 "), "ping {addr}: {answer}");
    }

    // One at a time, nothing overflows: every action runs on its home.
    let mut outcomes = Vec::new();
    for action in ACTIONS {
        let o = controller.activate(action, json!({"n": 0}), None);
        assert_succeeded(&o);
        assert_eq!(o.placed, Balancer::home(action), "{o:?}");
        outcomes.push(o);
    }

    // Six clients at once, each activation 150 ms long: homes fill and overflow.
    let jobs: Vec<(String, Value)> = (0..24)
        .map(|n| {
            (
                ACTIONS[n % ACTIONS.len()].to_owned(),
                json!({"n": n, "sleep_ms": 150}),
            )
        })
        .collect();
    let concurrent = controller.run_all(jobs, 6);
    for o in &concurrent {
        assert_succeeded(o);
    }
    let overflowed = concurrent
        .iter()
        .filter(|o| o.placed != Balancer::home(&o.action))
        .count();
    assert!(overflowed > 0, "nothing overflowed its home invoker");
    outcomes.extend(concurrent);
    let per_node: Vec<usize> = ids_by_node(&outcomes).iter().map(HashSet::len).collect();
    eprintln!("activations per node: {per_node:?}, {overflowed} off their home");
    assert!(per_node.iter().all(|&n| n > 0), "not spread: {per_node:?}");
    assert_books_agree(&nodes, &outcomes, None);

    // Two long activations in flight on the victim, acknowledged early; then the
    // victim is killed.
    let victim = 2;
    let long = ACTIONS
        .iter()
        .copied()
        .find(|a| Balancer::home(a) == victim)
        .unwrap();
    let acked = Arc::new((Mutex::new(0usize), Condvar::new()));
    let in_flight: Vec<_> = (0..2)
        .map(|n| {
            let (me, acked) = (Arc::clone(&controller), Arc::clone(&acked));
            thread::spawn(move || {
                me.activate(
                    long,
                    json!({"n": 100 + n, "sleep_ms": 20_000}),
                    Some(&acked),
                )
            })
        })
        .collect();
    {
        let (count, cv) = &*acked;
        let (count, timeout) = cv
            .wait_timeout_while(count.lock().unwrap(), Duration::from_secs(30), |c| *c < 2)
            .unwrap();
        assert!(!timeout.timed_out(), "{} of 2 acknowledged", *count);
    }
    // Let them reach the function.
    thread::sleep(Duration::from_millis(300));
    let victim_pid = nodes[victim].daemon().pid();
    let killed_at = Instant::now();
    nodes[victim].daemon.as_mut().unwrap().kill();
    let lost: Vec<Outcome> = in_flight.into_iter().map(|t| t.join().unwrap()).collect();
    let noticed = killed_at.elapsed();
    for o in &lost {
        assert_eq!(o.placed, victim, "{o:?}");
        assert!(o.acknowledged, "{o:?}: not acknowledged before the kill");
        assert!(o.system_error(), "{o:?}: not a system error");
        assert!(o.ack.is_none(), "{o:?}: a completion from a killed node");
    }
    assert!(
        noticed < Duration::from_secs(10),
        "the lost activations came back after {noticed:?}"
    );
    // The killed node's spawner removes its sandboxes.
    env.assert_clean_within(victim_pid, Duration::from_secs(10));

    // The rest carry on: thirty more, every action, none on the victim.
    let jobs: Vec<(String, Value)> = (0..30)
        .map(|n| {
            (
                ACTIONS[n % ACTIONS.len()].to_owned(),
                json!({"n": 200 + n, "sleep_ms": 20}),
            )
        })
        .collect();
    let after = controller.run_all(jobs, 6);
    let mut placed: HashMap<usize, usize> = HashMap::new();
    for o in &after {
        assert_succeeded(o);
        *placed.entry(o.placed).or_default() += 1;
    }
    assert!(
        !placed.contains_key(&victim),
        "placed on the killed node: {placed:?}"
    );
    assert_eq!(
        placed.len(),
        NODES - 1,
        "both survivors ran some: {placed:?}"
    );
    eprintln!("after the kill: {placed:?}; the lost ones came back {noticed:?} after it");
    outcomes.extend(after);
    assert_books_agree(&nodes, &outcomes, Some(victim));

    // The killed node's link and namespace go when its Node is dropped.
    let dead = nodes.remove(victim);
    drop(dead);
}
