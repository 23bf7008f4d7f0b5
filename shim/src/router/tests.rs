//! The router against fake instances: synchronous tests drive [`Router::turn`] by hand
//! with a fake [`Spawn`] whose instances the test plays; `threaded` runs the whole
//! loop in a thread against a fake zygote that speaks the real fork handshake.

use std::cell::RefCell;
use std::collections::VecDeque;
use std::io::Write;
use std::os::fd::AsRawFd;
use std::rc::Rc;

use ipc::proto::{FunctionError, Handler, InstanceRequest, Runtime, ShimEvent};

use super::*;

/// Pids no kernel hands out (above the largest `pid_max`): killing one hits nothing.
const FAKE_PID: i32 = 1 << 28;

fn spec(function: &str, version: u64, timeout_ms: u64) -> CallSpec {
    CallSpec {
        function: function.into(),
        version,
        code_dir: super::attached_dir(function, version),
        handler: Handler::parse("f:f").unwrap(),
        timeout_ms,
        namespace: "default".into(),
        memory_mb: 128,
        deps: Vec::new(),
        env: Default::default(),
    }
}

fn error(message: &str) -> FunctionError {
    FunctionError {
        kind: "ValueError".into(),
        message: message.into(),
        traceback: String::new(),
    }
}

/// What a fake local instance answers to `load`, queued before the shim sends it.
enum OnLoad {
    Loaded,
    Fail(FunctionError),
    Silent,
}

/// The test's side of a forked instance.
struct FakeInstance {
    pid: i32,
    label: u64,
    channel: Option<Channel>,
    calls: Option<Channel>,
    stdout: File,
}

#[derive(Default)]
struct FakeState {
    forks: Vec<FakeInstance>,
    killed: Vec<i32>,
    /// One entry per fork to come that the shim will `load` itself.
    on_load: VecDeque<OnLoad>,
    refuse: Option<String>,
}

#[derive(Clone, Default)]
struct Fake(Rc<RefCell<FakeState>>);

impl Spawn for Fake {
    fn runtime(&self) -> Runtime {
        Runtime::Python
    }

    fn fork(
        &mut self,
        instance: u64,
        stdout: BorrowedFd<'_>,
        _stderr: BorrowedFd<'_>,
    ) -> Result<Result<Forked, String>, zygote::Error> {
        let mut st = self.0.borrow_mut();
        if let Some(message) = st.refuse.clone() {
            return Ok(Err(message));
        }
        let (ours, theirs) = Channel::pair().unwrap();
        let (calls, calls_theirs) = Channel::pair().unwrap();
        match st.on_load.pop_front() {
            Some(OnLoad::Loaded) => theirs
                .send(&InstanceEvent::Loaded { http: None }, b"", &[])
                .unwrap(),
            Some(OnLoad::Fail(error)) => theirs
                .send(&InstanceEvent::LoadFailed { error }, b"", &[])
                .unwrap(),
            Some(OnLoad::Silent) | None => {}
        }
        let pid = FAKE_PID + st.forks.len() as i32;
        st.forks.push(FakeInstance {
            pid,
            label: instance,
            channel: Some(theirs),
            calls: Some(calls_theirs),
            stdout: File::from(stdout.try_clone_to_owned().unwrap()),
        });
        Ok(Ok(Forked {
            pid,
            channel: InstanceLink(ours),
            calls,
        }))
    }

    fn kill(&mut self, pid: i32) {
        let mut st = self.0.borrow_mut();
        st.killed.push(pid);
        if let Some(f) = st.forks.iter_mut().find(|f| f.pid == pid) {
            f.channel = None;
            f.calls = None;
        }
    }
}

impl Fake {
    fn forks(&self) -> usize {
        self.0.borrow().forks.len()
    }

    fn killed(&self) -> Vec<i32> {
        self.0.borrow().killed.clone()
    }

    fn pid(&self, i: usize) -> i32 {
        self.0.borrow().forks[i].pid
    }

    fn expect_loads(&self, loads: impl IntoIterator<Item = OnLoad>) {
        self.0.borrow_mut().on_load.extend(loads);
    }

    /// Takes the test's end of fork `i`'s channel (its calls channel stays open).
    fn channel(&self, i: usize) -> Channel {
        self.0.borrow_mut().forks[i].channel.take().unwrap()
    }

    /// Takes the test's end of fork `i`'s calls channel.
    fn calls(&self, i: usize) -> Channel {
        self.0.borrow_mut().forks[i].calls.take().unwrap()
    }

    fn write_stdout(&self, i: usize, text: &str) {
        self.0.borrow_mut().forks[i]
            .stdout
            .write_all(text.as_bytes())
            .unwrap();
    }
}

/// A router with a fake zygote; the test holds the agent's end.
fn setup() -> (Router<Fake>, Channel, Fake) {
    let (agent, shim) = Channel::pair().unwrap();
    let fake = Fake::default();
    let router = Router::new(AgentLink(shim), fake.clone()).unwrap();
    (router, agent, fake)
}

fn turn(r: &mut Router<Fake>) {
    assert_eq!(r.turn(None).unwrap(), Turn::Served);
}

/// The instance handed to the agent: its channel, output read ends, calls channel.
struct Main {
    stdout: File,
    calls: Channel,
}

/// Asks for an instance as the agent does; returns the agent's ends of it.
fn spawn_main(r: &mut Router<Fake>, agent: &mut Channel, fake: &Fake, instance: u64) -> Main {
    let forks = fake.forks();
    let spare = r.spare.as_ref().map(|s| s.key);
    agent
        .send(
            &ShimRequest::SpawnInstance {
                instance,
                runtime: Runtime::Python,
            },
            b"",
            &[],
        )
        .unwrap();
    turn(r);
    let m = agent.recv::<ShimEvent>().unwrap();
    assert!(matches!(m.header, ShimEvent::InstanceSpawned { instance: i, .. } if i == instance));
    let [_channel, stdout, _stderr]: [OwnedFd; 3] = m.fds.try_into().unwrap();
    // The spare's fork (if there was one) or a new one.
    let i = if spare.is_some() { 0 } else { forks };
    let calls = fake.calls(i);
    set_nonblocking(&stdout);
    Main {
        stdout: File::from(stdout),
        calls,
    }
}

fn set_nonblocking(fd: &OwnedFd) {
    use nix::fcntl::{fcntl, FcntlArg, OFlag};
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL).unwrap());
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK)).unwrap();
}

fn read_now(f: &mut File) -> String {
    let mut buf = vec![0u8; 1 << 16];
    match f.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(e) if e.kind() == ErrorKind::WouldBlock => String::new(),
        Err(e) => panic!("{e}"),
    }
}

fn call(on: &Channel, id: u64, function: &str, depth: u32, spec: Option<CallSpec>, event: &[u8]) {
    let req = CallRequest::Call {
        id,
        function: function.into(),
        depth,
        raw: false,
        spec,
    };
    on.send(&req, event, &[]).unwrap();
}

/// Reads the `load` and the `invoke` a fresh callee got; returns the invoke's id.
fn expect_load_and_invoke(ch: &mut Channel, function: &str, depth: u32, event: &[u8]) -> u64 {
    let m = ch.recv::<InstanceRequest>().unwrap();
    assert!(
        matches!(&m.header, InstanceRequest::Load(l) if l.function == function && l.code_dir.starts_with(&format!("/fns/{function}-"))),
        "{:?}",
        m.header
    );
    expect_invoke(ch, depth, event)
}

/// One call of `function` (version 1) from `main` that forks a fresh callee, which
/// gets its `load` and `invoke`: the callee's channel and the invoke's id.
fn first_call(r: &mut Router<Fake>, fake: &Fake, main: &Main, function: &str) -> (Channel, u64) {
    fake.expect_loads([OnLoad::Loaded]);
    call(
        &main.calls,
        1,
        function,
        1,
        Some(spec(function, 1, 5_000)),
        b"{}",
    );
    turn(r);
    let mut callee = fake.channel(1);
    let invoke = expect_load_and_invoke(&mut callee, function, 1, b"{}");
    (callee, invoke)
}

fn expect_invoke(ch: &mut Channel, depth: u32, event: &[u8]) -> u64 {
    let m = ch.recv::<InstanceRequest>().unwrap();
    let InstanceRequest::Invoke {
        id, depth: d, raw, ..
    } = m.header
    else {
        panic!("expected invoke, got {:?}", m.header)
    };
    assert_eq!((d, raw, &*m.payload), (depth, false, event));
    id
}

fn returned(ch: &Channel, id: u64, result: &[u8]) {
    let ev = InstanceEvent::Returned {
        id,
        raw: false,
        called: true,
    };
    ch.send(&ev, result, &[]).unwrap();
}

fn reply(ch: &mut Channel) -> (CallReply, Vec<u8>) {
    let m = ch.recv::<CallReply>().unwrap();
    (m.header, m.payload.into_vec())
}

fn failed(id: u64, function: &str, message: &str) -> CallReply {
    CallReply::CallFailed {
        id,
        function: function.into(),
        message: message.into(),
    }
}

#[test]
fn idle_pools_keep_the_most_recent_two_per_version() {
    let mut idle = IdlePools::default();
    assert_eq!(idle.put("f", 1, Key(1)), None);
    assert_eq!(idle.put("f", 1, Key(2)), None);
    assert_eq!(idle.put("f", 2, Key(3)), None);
    // A third idle instance of f v1 pushes out the least recently used.
    assert_eq!(idle.put("f", 1, Key(4)), Some(Key(1)));
    assert_eq!(idle.len(), 3);
    assert_eq!(idle.take("f", 1), Some(Key(4)));
    assert!(idle.remove(Key(2)));
    assert!(!idle.remove(Key(2)));
    assert_eq!(idle.take("f", 1), None);
    assert_eq!(idle.take("g", 2), None);
    assert_eq!(idle.retire(|f, v, _| f == "f" && v < 3), vec![Key(3)]);
    assert_eq!(idle.len(), 0);
}

#[test]
fn deadlines_and_poll_timeouts() {
    let (mut r, _agent, fake) = setup();
    assert_eq!(r.next_deadline(), None);
    let now = Instant::now();
    for (i, after) in [(0, 50u64), (1, 10), (2, 30)] {
        let Ok(Ok(f)) = fake
            .clone()
            .fork(i, r.output.stdout.as_fd(), r.output.stderr.as_fd())
        else {
            panic!("fake fork")
        };
        let pending = (i != 2).then(|| Pending {
            origin: Origin::Agent,
            id: i,
            invoke_id: i,
            function: "f".into(),
            timeout_ms: after,
            deadline: now + Duration::from_millis(after),
        });
        let local = Local {
            pid: f.pid,
            link: f.channel,
            function: "f".into(),
            version: 1,
            generation: 0,
            busy: pending,
            bound_to: None,
        };
        r.locals.insert(Key(100 + i), local);
    }
    // The idle one (2) has no deadline.
    assert_eq!(r.next_deadline(), Some(now + Duration::from_millis(10)));
    assert_eq!(
        poll_timeout(Duration::from_micros(1)),
        PollTimeout::from(1u8)
    );
    assert_eq!(
        poll_timeout(Duration::from_micros(2001)),
        PollTimeout::from(3u8)
    );
    assert_eq!(poll_timeout(Duration::ZERO), PollTimeout::ZERO);
}

#[test]
fn an_instance_calls_a_local_function_and_gets_its_answer() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 7);

    fake.expect_loads([OnLoad::Loaded]);
    call(
        &main.calls,
        41,
        "sq",
        1,
        Some(spec("sq", 1, 5_000)),
        b"{\"n\":3}",
    );
    turn(&mut r);
    assert_eq!(fake.forks(), 2);
    let mut callee = fake.channel(1);
    let invoke = expect_load_and_invoke(&mut callee, "sq", 1, b"{\"n\":3}");
    assert!(r.next_deadline().is_some());

    // The callee's output goes to the pipes the agent reads for its instance.
    fake.write_stdout(1, "from sq\n");
    assert_eq!(read_now(&mut main.stdout), "from sq\n");

    returned(&callee, invoke, b"9");
    turn(&mut r);
    let (answer, payload) = reply(&mut main.calls);
    assert_eq!(answer, CallReply::CallReturned { id: 41, raw: false });
    assert_eq!(payload, b"9");
    assert_eq!(r.next_deadline(), None);

    // The next call reuses the idle instance: no fork, no load.
    call(
        &main.calls,
        42,
        "sq",
        1,
        Some(spec("sq", 1, 5_000)),
        b"{\"n\":4}",
    );
    turn(&mut r);
    assert_eq!(fake.forks(), 2);
    let invoke = expect_invoke(&mut callee, 1, b"{\"n\":4}");
    let raised = InstanceEvent::Raised {
        id: invoke,
        error: error("negative"),
        called: false,
    };
    callee.send(&raised, b"", &[]).unwrap();
    turn(&mut r);
    let raised = CallReply::CallRaised {
        id: 42,
        function: "sq".into(),
        error: error("negative"),
    };
    assert_eq!(reply(&mut main.calls).0, raised);
    assert!(fake.killed().is_empty());
}

#[test]
fn calls_the_shim_cannot_run_fail_by_name() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    main.calls
        .send(
            &CallRequest::Resolve {
                id: 1,
                function: "x".into(),
            },
            b"",
            &[],
        )
        .unwrap();
    call(&main.calls, 2, "y", 1, None, b"{}");
    call(
        &main.calls,
        3,
        "deep",
        17,
        Some(spec("deep", 1, 100)),
        b"{}",
    );
    turn(&mut r);
    assert_eq!(reply(&mut main.calls).0, failed(1, "x", NOT_HERE));
    assert_eq!(reply(&mut main.calls).0, failed(2, "y", NOT_HERE));
    let depth = check_depth("deep", 17).unwrap_err();
    assert_eq!(reply(&mut main.calls).0, failed(3, "deep", &depth));
    assert_eq!(fake.forks(), 1, "nothing was forked for them");
}

#[test]
fn a_spec_naming_code_the_agent_did_not_attach_is_refused() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    let mut forged = spec("b", 3, 100);
    forged.code_dir = "/tmp/evil".into();
    call(&main.calls, 1, "b", 1, Some(forged), b"{}");
    // Another function's spec under this name is refused too.
    call(&main.calls, 2, "b", 1, Some(spec("c", 3, 100)), b"{}");
    turn(&mut r);
    for id in [1, 2] {
        let (got, _) = reply(&mut main.calls);
        let CallReply::CallFailed { id: i, message, .. } = got else {
            panic!("expected call_failed, got {got:?}")
        };
        assert_eq!(i, id);
        assert!(
            message.contains("not the code the agent attached"),
            "{message}"
        );
    }
    assert_eq!(fake.forks(), 1, "nothing was forked for them");
}

#[test]
fn a_callee_past_its_deadline_is_killed() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Loaded]);
    call(&main.calls, 5, "slow", 1, Some(spec("slow", 1, 30)), b"{}");
    let started = Instant::now();
    turn(&mut r);
    let _callee = fake.channel(1);
    // Nothing arrives: the next turn wakes at the deadline.
    turn(&mut r);
    assert!(started.elapsed() >= Duration::from_millis(30));
    assert_eq!(
        reply(&mut main.calls).0,
        failed(5, "slow", "slow timed out after 30 ms")
    );
    assert_eq!(fake.killed(), vec![fake.pid(1)]);
    assert!(r.locals.is_empty() && r.idle.len() == 0);
}

#[test]
fn a_callee_that_dies_fails_its_call() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Loaded]);
    call(&main.calls, 5, "oom", 1, Some(spec("oom", 1, 5_000)), b"{}");
    turn(&mut r);
    let (callee, callee_calls) = (fake.channel(1), fake.calls(1));
    drop((callee, callee_calls));
    turn(&mut r);
    let pid = fake.pid(1);
    let message =
        format!("oom's instance (pid {pid}) died while running (out of memory or killed?)");
    assert_eq!(reply(&mut main.calls).0, failed(5, "oom", &message));
    assert!(fake.killed().is_empty());
    assert!(r.locals.is_empty() && !r.calls.contains_key(&Key(2)));
}

#[test]
fn load_failures_and_load_timeouts() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Fail(error("no module f")), OnLoad::Silent]);
    call(&main.calls, 1, "bad", 1, Some(spec("bad", 1, 5_000)), b"{}");
    call(&main.calls, 2, "hang", 1, Some(spec("hang", 1, 20)), b"{}");
    turn(&mut r);
    let raised = CallReply::CallRaised {
        id: 1,
        function: "bad".into(),
        error: error("no module f"),
    };
    assert_eq!(reply(&mut main.calls).0, raised);
    assert_eq!(
        reply(&mut main.calls).0,
        failed(2, "hang", "hang timed out after 20 ms while loading")
    );
    assert_eq!(fake.killed(), vec![fake.pid(2)]);
    assert!(r.locals.is_empty());
    assert_eq!(r.calls.len(), 1, "only the agent's instance is left");

    fake.0.borrow_mut().refuse = Some("fork: out of pids".into());
    call(&main.calls, 3, "f", 1, Some(spec("f", 1, 5_000)), b"{}");
    turn(&mut r);
    let message = "could not start an instance of f: fork: out of pids";
    assert_eq!(reply(&mut main.calls).0, failed(3, "f", message));
}

#[test]
fn the_agent_runs_a_step_and_large_payloads_are_forwarded_not_copied() {
    let (mut r, mut agent, fake) = setup();
    let _main = spawn_main(&mut r, &mut agent, &fake, 1);
    let big = vec![b'x'; 200 << 10];
    let event = Payload::share(&big).unwrap();
    let req = ShimRequest::Call {
        id: 9,
        depth: 0,
        raw: true,
        spec: spec("step", 3, 5_000),
    };
    fake.expect_loads([OnLoad::Loaded]);
    agent.send_payload(&req, &event, &[]).unwrap();
    turn(&mut r);
    let mut callee = fake.channel(1);
    callee.recv::<InstanceRequest>().unwrap(); // load
    let m = callee.recv::<InstanceRequest>().unwrap();
    assert!(matches!(
        m.header,
        InstanceRequest::Invoke {
            depth: 0,
            raw: true,
            ..
        }
    ));
    let InstanceRequest::Invoke { id, .. } = m.header else {
        unreachable!()
    };
    assert!(m.payload.is_shared());
    assert_eq!(inode(&m.payload), inode(&event), "the agent's own memfd");

    let ret = InstanceEvent::Returned {
        id,
        raw: true,
        called: false,
    };
    callee.send_payload(&ret, &m.payload, &[]).unwrap();
    turn(&mut r);
    let m = agent.recv::<CallReply>().unwrap();
    assert_eq!(m.header, CallReply::CallReturned { id: 9, raw: true });
    assert_eq!(inode(&m.payload), inode(&event));
}

fn inode(p: &Payload) -> u64 {
    nix::sys::stat::fstat(p.shared_fd().unwrap().as_raw_fd())
        .unwrap()
        .st_ino
}

#[test]
fn nested_calls_are_served_while_their_caller_waits() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Loaded, OnLoad::Loaded]);
    call(&main.calls, 1, "b", 1, Some(spec("b", 1, 5_000)), b"\"a\"");
    turn(&mut r);
    let (mut b, b_calls) = (fake.channel(1), fake.calls(1));
    let b_invoke = expect_load_and_invoke(&mut b, "b", 1, b"\"a\"");

    // While b runs, it calls c through its own calls channel.
    let mut b_calls = b_calls;
    call(&b_calls, 1, "c", 2, Some(spec("c", 1, 5_000)), b"\"b\"");
    turn(&mut r);
    let mut c = fake.channel(2);
    let c_invoke = expect_load_and_invoke(&mut c, "c", 2, b"\"b\"");
    returned(&c, c_invoke, b"\"c\"");
    turn(&mut r);
    assert_eq!(
        reply(&mut b_calls),
        (
            CallReply::CallReturned { id: 1, raw: false },
            b"\"c\"".to_vec()
        )
    );
    returned(&b, b_invoke, b"\"bc\"");
    turn(&mut r);
    assert_eq!(
        reply(&mut main.calls),
        (
            CallReply::CallReturned { id: 1, raw: false },
            b"\"bc\"".to_vec()
        )
    );
    assert_eq!(r.idle.len(), 2);
}

#[test]
fn an_answer_whose_caller_is_gone_is_dropped() {
    let (mut r, mut agent, fake) = setup();
    let main = spawn_main(&mut r, &mut agent, &fake, 1);
    let (b, invoke) = first_call(&mut r, &fake, &main, "b");
    drop(main); // the caller died
    turn(&mut r);
    assert!(!r.calls.contains_key(&Key(1)));
    returned(&b, invoke, b"1");
    turn(&mut r);
    assert_eq!(r.idle.len(), 1, "the callee is idle again");
}

#[test]
fn at_most_two_idle_per_version_and_none_of_older_ones() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Loaded, OnLoad::Loaded, OnLoad::Loaded]);
    for id in 1..=3 {
        call(&main.calls, id, "f", 1, Some(spec("f", 1, 5_000)), b"{}");
    }
    turn(&mut r);
    assert_eq!(fake.forks(), 4, "three callees at once");
    let mut callees: Vec<Channel> = (1..=3).map(|i| fake.channel(i)).collect();
    for c in &mut callees {
        let invoke = expect_load_and_invoke(c, "f", 1, b"{}");
        returned(c, invoke, b"0");
    }
    turn(&mut r);
    for _ in 1..=3 {
        assert!(matches!(
            reply(&mut main.calls).0,
            CallReply::CallReturned { .. }
        ));
    }
    assert_eq!(r.idle.len(), 2);
    assert_eq!(fake.killed().len(), 1);

    // A newer version retires the older one's idle instances.
    fake.expect_loads([OnLoad::Loaded]);
    call(&main.calls, 4, "f", 1, Some(spec("f", 2, 5_000)), b"{}");
    turn(&mut r);
    assert_eq!(fake.killed().len(), 3);
    assert_eq!(fake.forks(), 5);
}

#[test]
fn a_new_main_instance_retires_idle_instances_writing_to_old_pipes() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    let (f, invoke) = first_call(&mut r, &fake, &main, "f");
    returned(&f, invoke, b"0");
    turn(&mut r);
    reply(&mut main.calls);
    assert_eq!(r.idle.len(), 1);
    let mut second = spawn_main(&mut r, &mut agent, &fake, 2);
    assert_eq!(r.idle.len(), 0);
    assert_eq!(fake.killed(), vec![fake.pid(1)]);
    // The next local instance writes to the new main instance's pipes.
    fake.expect_loads([OnLoad::Loaded]);
    call(&second.calls, 1, "f", 1, Some(spec("f", 1, 5_000)), b"{}");
    turn(&mut r);
    fake.write_stdout(3, "to the second\n");
    assert_eq!(read_now(&mut second.stdout), "to the second\n");
    assert_eq!(read_now(&mut main.stdout), "");
}

#[test]
fn the_spare_serves_a_call_made_before_any_hand_over() {
    let (mut r, mut agent, fake) = setup();
    r.fork_spare().unwrap();
    assert_eq!(fake.0.borrow().forks[0].label, 0);
    let load = InstanceEvent::Loaded { http: None };
    fake.0.borrow().forks[0]
        .channel
        .as_ref()
        .unwrap()
        .send(&load, b"", &[])
        .unwrap();
    let req = ShimRequest::Call {
        id: 1,
        depth: 0,
        raw: false,
        spec: spec("f", 1, 5_000),
    };
    agent.send(&req, b"{}", &[]).unwrap();
    turn(&mut r);
    assert_eq!(fake.forks(), 1, "the spare, not a fork");
    let mut spare = fake.channel(0);
    let invoke = expect_load_and_invoke(&mut spare, "f", 0, b"{}");
    // Its output is read and thrown away: a pipe holds 64 KiB, so the second write
    // would block if the first had not been drained.
    assert_eq!(r.discard.len(), 2);
    fake.write_stdout(0, &"x".repeat(60 << 10));
    returned(&spare, invoke, b"1");
    turn(&mut r);
    fake.write_stdout(0, &"x".repeat(60 << 10));
    assert_eq!(
        agent.recv::<CallReply>().unwrap().header,
        CallReply::CallReturned { id: 1, raw: false }
    );
    // A hand-over now forks a new instance.
    spawn_main(&mut r, &mut agent, &fake, 3);
    assert_eq!(fake.forks(), 2);
    assert_eq!(fake.0.borrow().forks[1].label, 3);
}

#[test]
fn the_agent_closing_its_channel_ends_the_loop() {
    let (mut r, agent, _fake) = setup();
    drop(agent);
    assert_eq!(r.turn(None).unwrap(), Turn::AgentGone);
}

#[test]
fn the_extra_descriptor_wakes_the_caller() {
    let (mut r, _agent, _fake) = setup();
    let (rd, mut wr) = io::pipe().unwrap();
    wr.write_all(b"!").unwrap();
    assert_eq!(r.turn(Some(rd.as_fd())).unwrap(), Turn::Woken);
}

mod threaded {
    //! The loop in a thread, a fake zygote in another that forks a thread per
    //! instance, and the test as the agent: a workflow `main → mid → leaf` runs
    //! through the shim's calls channels, and its output lands in main's pipe.

    use std::sync::{Arc, Mutex};
    use std::thread::{self, JoinHandle};

    use ipc::proto::{ShimLink, ZygoteEvent, ZygoteLink, ZygoteRequest};

    use super::*;

    struct ThreadZygote {
        link: ZygoteLink,
        killed: Arc<Mutex<Vec<i32>>>,
    }

    impl Spawn for ThreadZygote {
        fn runtime(&self) -> Runtime {
            Runtime::Python
        }

        fn fork(
            &mut self,
            instance: u64,
            stdout: BorrowedFd<'_>,
            stderr: BorrowedFd<'_>,
        ) -> Result<Result<Forked, String>, zygote::Error> {
            zygote::fork_ready(&mut self.link, Runtime::Python, instance, stdout, stderr)
        }

        fn kill(&mut self, pid: i32) {
            self.killed.lock().unwrap().push(pid);
        }
    }

    /// Serves `fork` like the Python zygote, with a thread per instance.
    fn fake_zygote(mut ch: Channel) {
        let mut instances: Vec<JoinHandle<()>> = Vec::new();
        ch.send(&ZygoteEvent::Ready { pid: 2 }, b"", &[]).unwrap();
        while let Ok(m) = ch.recv::<ZygoteRequest>() {
            let ZygoteRequest::Fork { instance, .. } = m.header else {
                panic!("the fake zygote only forks instances: {:?}", m.header);
            };
            let [channel, stdout, _stderr, calls]: [OwnedFd; 4] = m.fds.try_into().unwrap();
            instances.push(thread::spawn(move || {
                fake_instance(
                    Channel::from_fd(channel),
                    File::from(stdout),
                    Channel::from_fd(calls),
                )
            }));
            let pid = FAKE_PID + instance as i32;
            ch.send(&ZygoteEvent::Forked { instance, pid }, b"", &[])
                .unwrap();
        }
        for t in instances {
            t.join().unwrap();
        }
    }

    /// `main` calls `mid`, `mid` calls `leaf`, `leaf` echoes; each prints a line.
    fn fake_instance(mut ch: Channel, mut stdout: File, mut calls: Channel) {
        ch.send(&InstanceEvent::Ready, b"", &[]).unwrap();
        let Ok(m) = ch.recv::<InstanceRequest>() else {
            return;
        };
        let InstanceRequest::Load(load) = m.header else {
            panic!("expected load")
        };
        ch.send(&InstanceEvent::Loaded { http: None }, b"", &[])
            .unwrap();
        let mut next_call = 0;
        while let Ok(m) = ch.recv::<InstanceRequest>() {
            let InstanceRequest::Invoke { id, depth, raw, .. } = m.header else {
                panic!("expected invoke")
            };
            writeln!(stdout, "{} at depth {depth}", load.function).unwrap();
            let callee = match load.function.as_str() {
                "main" => Some("mid"),
                "mid" => Some("leaf"),
                _ => None,
            };
            let (raw, result) = match callee {
                None => (raw, m.payload),
                Some(callee) => {
                    next_call += 1;
                    let req = CallRequest::Call {
                        id: next_call,
                        function: callee.into(),
                        depth: depth + 1,
                        raw,
                        spec: Some(spec(callee, 1, 10_000)),
                    };
                    calls.send_payload(&req, &m.payload, &[]).unwrap();
                    let r = calls.recv::<CallReply>().unwrap();
                    let CallReply::CallReturned { id: rid, raw } = r.header else {
                        panic!("{callee} failed: {:?}", r.header)
                    };
                    assert_eq!(rid, next_call);
                    (raw, r.payload)
                }
            };
            let ev = InstanceEvent::Returned {
                id,
                raw,
                called: callee.is_some(),
            };
            ch.send_payload(&ev, &result, &[]).unwrap();
        }
    }

    #[test]
    fn a_workflow_runs_through_the_shim_and_its_output_reaches_the_caller() {
        let (agent_end, shim_end) = Channel::pair().unwrap();
        let (zygote_end, zygote_theirs) = Channel::pair().unwrap();
        let zygote = thread::spawn(move || fake_zygote(zygote_theirs));
        let killed = Arc::new(Mutex::new(Vec::new()));
        let shim_killed = killed.clone();
        let shim = thread::spawn(move || -> Result<(), Error> {
            let mut link = ZygoteLink(zygote_end);
            link.wait_ready().unwrap();
            let zygote = ThreadZygote {
                link,
                killed: shim_killed,
            };
            let mut r = Router::new(AgentLink(shim_end), zygote)?;
            r.fork_spare()?;
            r.announce_ready(2)?;
            while r.turn(None)? != Turn::AgentGone {}
            Ok(())
        });

        let mut agent = ShimLink(agent_end);
        assert_eq!(agent.wait_ready().unwrap(), 2);
        let spawned = agent.spawn_instance(1, Runtime::Python).unwrap().unwrap();
        assert_eq!(spawned.pid, FAKE_PID);
        let mut main = InstanceLink(spawned.channel);
        main.send_load(&LoadSpec {
            env: Default::default(),
            function: "main".into(),
            code_dir: "/code/main".into(),
            handler: Handler::parse("f:f").unwrap(),
            deps: Vec::new(),
            about: Default::default(),
        })
        .unwrap();
        main.wait_loaded().unwrap().unwrap();

        // Big enough to travel as a memfd: forwarded by the shim at every hop.
        let event = Payload::share(&vec![b'e'; 100 << 10]).unwrap();
        main.0
            .send_payload(
                &InstanceRequest::Invoke {
                    id: 1,
                    depth: 0,
                    raw: true,
                    env: None,
                },
                &event,
                &[],
            )
            .unwrap();
        let m = main.0.recv::<InstanceEvent>().unwrap();
        assert_eq!(
            m.header,
            InstanceEvent::Returned {
                id: 1,
                raw: true,
                called: true
            }
        );
        assert_eq!(inode(&m.payload), inode(&event), "never copied");

        // A step the agent runs in the sandbox itself, reusing the idle leaf.
        agent
            .send_call(
                7,
                1,
                false,
                &spec("leaf", 1, 10_000),
                &Payload::from(b"[1]".to_vec()),
            )
            .unwrap();
        let m = agent.wait_call().unwrap();
        assert_eq!(m.header, CallReply::CallReturned { id: 7, raw: false });
        assert_eq!(&*m.payload, b"[1]");

        drop((main, agent));
        shim.join().unwrap().unwrap();
        zygote.join().unwrap();
        let mut out = String::new();
        File::from(spawned.stdout).read_to_string(&mut out).unwrap();
        assert_eq!(
            out,
            "main at depth 0\nmid at depth 1\nleaf at depth 2\nleaf at depth 1\n"
        );
        assert!(killed.lock().unwrap().is_empty());
    }
}

#[test]
fn idle_instances_that_died_are_forgotten_or_replaced() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    // Two idle instances of f.
    fake.expect_loads([OnLoad::Loaded, OnLoad::Loaded]);
    call(&main.calls, 1, "f", 1, Some(spec("f", 1, 5_000)), b"{}");
    call(&main.calls, 2, "f", 1, Some(spec("f", 1, 5_000)), b"{}");
    turn(&mut r);
    let mut f1 = fake.channel(1);
    let mut f2 = fake.channel(2);
    for f in [&mut f1, &mut f2] {
        let invoke = expect_load_and_invoke(f, "f", 1, b"{}");
        returned(f, invoke, b"0");
    }
    turn(&mut r);
    reply(&mut main.calls);
    reply(&mut main.calls);
    assert_eq!(r.idle.len(), 2);

    // f2 dies while idle: its calls channel closing tells.
    drop((f2, fake.calls(2)));
    turn(&mut r);
    assert_eq!(r.idle.len(), 1);
    assert!(!r.locals.contains_key(&Key(3)));

    // f1's channel is gone but its calls channel has not told yet: the invoke
    // cannot be sent, and a new instance takes the call.
    drop(f1);
    fake.expect_loads([OnLoad::Loaded]);
    call(&main.calls, 3, "f", 1, Some(spec("f", 1, 5_000)), b"{}");
    turn(&mut r);
    assert_eq!(fake.forks(), 4);
    let mut f3 = fake.channel(3);
    let invoke = expect_load_and_invoke(&mut f3, "f", 1, b"{}");
    returned(&f3, invoke, b"3");
    turn(&mut r);
    assert_eq!(reply(&mut main.calls).1, b"3");
    assert!(fake.killed().is_empty());
}

#[test]
fn a_callee_that_breaks_the_protocol_is_killed() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    let (f, invoke) = first_call(&mut r, &fake, &main, "f");
    returned(&f, invoke + 1, b"0");
    turn(&mut r);
    let pid = fake.pid(1);
    let message = format!(
        "f's instance (pid {pid}) broke the protocol: unexpected Returned while running call {invoke}"
    );
    assert_eq!(reply(&mut main.calls).0, failed(1, "f", &message));
    assert_eq!(fake.killed(), vec![pid]);
}

fn bind(on: &Channel, id: u64, function: &str) {
    let req = CallRequest::Bind {
        id,
        function: function.into(),
        spec: spec(function, 1, 5_000),
    };
    on.send(&req, b"", &[]).unwrap();
}

/// The caller's end of a `bound` reply, and the bind's token.
fn expect_bound(ch: &mut Channel, id: u64) -> (Channel, u64) {
    let m = ch.recv::<CallReply>().unwrap();
    let CallReply::Bound { id: got, callee } = m.header else {
        panic!("expected bound, got {:?}", m.header)
    };
    assert_eq!(got, id);
    let [end]: [OwnedFd; 1] = m.fds.try_into().unwrap();
    (
        Channel::new(std::os::unix::net::UnixStream::from(end)),
        callee,
    )
}

/// The callee's end of a `bind`, and its token.
fn expect_bind(ch: &mut Channel) -> (Channel, u64) {
    let m = ch.recv::<InstanceRequest>().unwrap();
    let InstanceRequest::Bind { token } = m.header else {
        panic!("expected bind, got {:?}", m.header)
    };
    let [end]: [OwnedFd; 1] = m.fds.try_into().unwrap();
    (
        Channel::new(std::os::unix::net::UnixStream::from(end)),
        token,
    )
}

#[test]
fn a_bound_callee_talks_to_its_caller_directly_and_is_idle_again_after() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Loaded]);
    bind(&main.calls, 5, "sq");
    turn(&mut r);
    let (mut caller_end, token) = expect_bound(&mut main.calls, 5);
    let mut callee = fake.channel(1);
    assert!(matches!(
        callee.recv::<InstanceRequest>().unwrap().header,
        InstanceRequest::Load(_)
    ));
    let (mut callee_end, told) = expect_bind(&mut callee);
    assert_eq!(told, token);
    // Neither idle nor a call with a deadline: the shim is out of the way.
    assert_eq!((r.idle.len(), r.next_deadline()), (0, None));
    caller_end.send(&"ping", b"3", &[]).unwrap();
    let m = callee_end.recv::<String>().unwrap();
    assert_eq!((&*m.header, &*m.payload), ("ping", &b"3"[..]));
    callee_end.send(&"pong", b"9", &[]).unwrap();
    assert_eq!(&*caller_end.recv::<String>().unwrap().payload, b"9");

    // Another instance may not have it killed; its own caller may.
    fake.expect_loads([OnLoad::Loaded]);
    call(&main.calls, 2, "g", 1, Some(spec("g", 1, 5_000)), b"{}");
    turn(&mut r);
    let stranger = fake.calls(2);
    stranger
        .send(&CallRequest::Unbind { callee: token }, b"", &[])
        .unwrap();
    turn(&mut r);
    assert!(fake.killed().is_empty());

    // The caller lets go: the callee says so and is idle again, reused by a call.
    drop(caller_end);
    drop(callee_end);
    let unbound = InstanceEvent::Unbound { token };
    callee.send(&unbound, b"", &[]).unwrap();
    turn(&mut r);
    assert_eq!(r.idle.len(), 1);
    call(&main.calls, 6, "sq", 1, Some(spec("sq", 1, 5_000)), b"1");
    turn(&mut r);
    let invoke = expect_invoke(&mut callee, 1, b"1");
    returned(&callee, invoke, b"1");
    turn(&mut r);
    assert_eq!(
        reply(&mut main.calls).0,
        CallReply::CallReturned { id: 6, raw: false }
    );
    assert_eq!(fake.forks(), 3);

    // Bound again, then past its time: the caller has it killed.
    bind(&main.calls, 7, "sq");
    turn(&mut r);
    let (_end, second) = expect_bound(&mut main.calls, 7);
    assert_ne!(second, token, "a token is never used twice");
    let _callee_end = expect_bind(&mut callee);
    // A stale token (the last bind's) names nothing now.
    main.calls
        .send(&CallRequest::Unbind { callee: token }, b"", &[])
        .unwrap();
    turn(&mut r);
    assert!(fake.killed().is_empty());
    main.calls
        .send(&CallRequest::Unbind { callee: second }, b"", &[])
        .unwrap();
    turn(&mut r);
    assert_eq!(fake.killed(), vec![fake.pid(1)]);
    assert_eq!(r.locals.len(), 1, "only g's instance is left");
}

#[test]
fn binds_are_bounded_per_caller_and_checked_like_calls() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    let mut ends = Vec::new();
    for i in 0..MAX_BOUND_PER_CALLER as u64 {
        fake.expect_loads([OnLoad::Loaded]);
        bind(&main.calls, i, &format!("f{i}"));
        turn(&mut r);
        ends.push(expect_bound(&mut main.calls, i));
    }
    bind(&main.calls, 99, "one_more");
    turn(&mut r);
    let (answer, _) = reply(&mut main.calls);
    assert!(
        matches!(&answer, CallReply::CallRefused { id: 99, kind: RefusalKind::TooManyChannels, message, .. } if message.contains("8 direct channels are bound to this instance")),
        "{answer:?}"
    );
    // A spec naming code the agent did not attach is refused, as for a call.
    let mut bad = spec("h", 1, 5_000);
    bad.code_dir = "/".into();
    let req = CallRequest::Bind {
        id: 100,
        function: "h".into(),
        spec: bad,
    };
    main.calls.send(&req, b"", &[]).unwrap();
    turn(&mut r);
    let (answer, _) = reply(&mut main.calls);
    assert!(
        matches!(&answer, CallReply::CallFailed { id: 100, message, .. } if message.contains("not the code the agent attached")),
        "{answer:?}"
    );
    // A new main instance: bound callees finish with their caller, and are not
    // reused after (they write to the old pipes).
    let _second = spawn_main(&mut r, &mut agent, &fake, 2);
    assert!(fake.killed().is_empty());
    let mut callee = fake.channel(1);
    let _load = callee.recv::<InstanceRequest>().unwrap();
    let (_, token) = expect_bind(&mut callee);
    callee
        .send(&InstanceEvent::Unbound { token }, b"", &[])
        .unwrap();
    turn(&mut r);
    assert_eq!(fake.killed(), vec![fake.pid(1)]);
}

#[test]
fn bound_callees_go_with_their_caller_and_a_wrong_unbound_ends_the_callee() {
    let (mut r, mut agent, fake) = setup();
    let mut main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Loaded, OnLoad::Loaded]);
    bind(&main.calls, 1, "b");
    turn(&mut r);
    let (_b_end, _) = expect_bound(&mut main.calls, 1);
    // b (fork 1) binds c (fork 2) in turn.
    let mut b_calls = fake.calls(1);
    bind(&b_calls, 1, "c");
    turn(&mut r);
    let (_c_end, _) = expect_bound(&mut b_calls, 1);
    // An `unbound` naming another bind is a broken protocol: c is killed, nothing else.
    let mut c = fake.channel(2);
    let _load = c.recv::<InstanceRequest>().unwrap();
    let (_, token) = expect_bind(&mut c);
    c.send(&InstanceEvent::Unbound { token: token + 100 }, b"", &[])
        .unwrap();
    turn(&mut r);
    assert_eq!(fake.killed(), vec![fake.pid(2)]);
    // b binds c again; then b is killed (its caller timed out): c goes with it.
    fake.expect_loads([OnLoad::Loaded]);
    bind(&b_calls, 2, "c");
    turn(&mut r);
    let (_c_end, _) = expect_bound(&mut b_calls, 2);
    let b_token = r.locals[&Key(2)].bound_to.unwrap().token;
    main.calls
        .send(&CallRequest::Unbind { callee: b_token }, b"", &[])
        .unwrap();
    turn(&mut r);
    assert_eq!(
        fake.killed(),
        vec![fake.pid(2), fake.pid(1), fake.pid(3)],
        "b, then the c bound to it"
    );
    assert!(r.locals.is_empty());
}

#[test]
fn a_caller_that_dies_takes_its_bound_callees_with_it() {
    let (mut r, mut agent, fake) = setup();
    let main = spawn_main(&mut r, &mut agent, &fake, 1);
    fake.expect_loads([OnLoad::Loaded]);
    bind(&main.calls, 1, "sq");
    turn(&mut r);
    let mut calls = main.calls;
    let (_end, key) = expect_bound(&mut calls, 1);
    // Its callee may be stuck in a loop: nobody would end it once the caller is gone.
    drop(calls);
    turn(&mut r);
    assert_eq!(fake.killed(), vec![fake.pid(1)]);
    assert!(!r.locals.contains_key(&Key(key)));
}
