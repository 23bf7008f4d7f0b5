//! The output of sandboxes' shims and zygotes.
//!
//! A sandbox's PID 1 (the shim) and its Python zygote write their stdout and stderr
//! into one pipe per sandbox, made by the agent; the agent keeps the read end and the
//! spawner gives the write end to the container as its stdout and stderr. Nothing in
//! a sandbox holds the agent's own stderr (a function could open it through
//! `/proc/1/fd/2` and read, forge or truncate the daemon's log, or fill its disk).
//!
//! One thread reads every sandbox's pipe ([`SandboxOutput`], a `mio::Poll`) and
//! forwards each line as a `tracing` event (target `sprout::sandbox_output`, level
//! warn) with the sandbox id and, once bound, its function, under limits a hostile
//! function cannot get past ([`Limiter`]):
//! - a line is at most [`LINE_CAP`] bytes; a longer one is forwarded cut (`cut=true`)
//!   and the rest of it is dropped;
//! - each sandbox may forward [`RATE`] bytes a second with a burst of [`BURST`], and
//!   all sandboxes together [`TOTAL_RATE`] with a burst of [`TOTAL_BURST`] (so
//!   neither many sandboxes nor their churn multiply the log's growth); a line costs
//!   what it takes in the log, escaping and [`LINE_OVERHEAD`] included. Lines over
//!   either are read and dropped, and one event per [`WINDOW`] says how many bytes
//!   were dropped;
//! - memory is fixed: one line buffer of [`LINE_CAP`] bytes per sandbox and one read
//!   buffer for all; the thread never blocks on a pipe, and reads at most
//!   [`TURN_BUDGET`] bytes of one pipe before it serves the others.
//!
//! A pipe is dropped at end of file (every process of the sandbox is gone) or when
//! the sandbox is removed ([`SandboxOutput::remove`], after what is left in it is
//! read). The lines are written escaped (`output="..."`), so a sandbox cannot make
//! one look like a line of the agent's own.
//!
//! Function logs (an instance's own stdout and stderr) are not read here: the agent
//! captures them per invocation for the caller (`instance::Output`), with the same
//! non-blocking reads ([`read_pipe`]).

use std::collections::{HashMap, VecDeque};
use std::fs::File;
use std::io::{ErrorKind, Read};
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};
use nix::fcntl::{fcntl, FcntlArg, OFlag};
use parking_lot::Mutex;

/// The longest line forwarded; a longer one is cut.
pub const LINE_CAP: usize = 4 << 10;
/// Bytes a second one sandbox may forward.
pub const RATE: u64 = 64 << 10;
/// Bytes one sandbox may forward at once after a quiet spell.
pub const BURST: u64 = 256 << 10;
/// Bytes a second all sandboxes together may forward.
pub const TOTAL_RATE: u64 = 256 << 10;
/// Bytes all sandboxes together may forward at once after a quiet spell.
pub const TOTAL_BURST: u64 = 1 << 20;
/// What a forwarded line costs besides its text: the fields the log line carries.
pub const LINE_OVERHEAD: u64 = 128;
/// How often at most a sandbox's dropped bytes are reported.
pub const WINDOW: Duration = Duration::from_secs(1);
/// The most bytes read from one pipe before the other pipes get their turn.
pub const TURN_BUDGET: usize = 256 << 10;
/// One read.
const READ_CHUNK: usize = 64 << 10;

const WAKER: Token = Token(0);

/// Sets `fd` non-blocking: what the agent reads from a sandbox never blocks it.
pub(crate) fn set_nonblocking(fd: &OwnedFd) -> std::io::Result<()> {
    let flags = OFlag::from_bits_truncate(fcntl(fd.as_raw_fd(), FcntlArg::F_GETFL)?);
    fcntl(fd.as_raw_fd(), FcntlArg::F_SETFL(flags | OFlag::O_NONBLOCK))?;
    Ok(())
}

/// What one non-blocking read of a pipe gave.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Got {
    Bytes(usize),
    /// Nothing there now.
    Empty,
    /// Every writer is gone (or the pipe failed).
    Closed,
}

/// One non-blocking read of `pipe` into `buf`.
pub(crate) fn read_pipe(pipe: &mut File, buf: &mut [u8]) -> Got {
    loop {
        return match pipe.read(buf) {
            Ok(0) => Got::Closed,
            Ok(n) => Got::Bytes(n),
            Err(e) if e.kind() == ErrorKind::WouldBlock => Got::Empty,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(_) => Got::Closed,
        };
    }
}

/// A new pipe for a sandbox's output, both ends close-on-exec: (read end, write end).
pub(crate) fn pipe() -> std::io::Result<(OwnedFd, OwnedFd)> {
    Ok(nix::unistd::pipe2(OFlag::O_CLOEXEC)?)
}

/// What [`Limiter`] forwards.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Event<'a> {
    /// A line without its newline; `cut`: it was longer than [`LINE_CAP`].
    Line { text: &'a [u8], cut: bool },
    /// Bytes read and not forwarded since the last report.
    Dropped { over_rate: u64, past_cap: u64 },
}

/// A token bucket: `rate` bytes a second, at most `burst` at once.
#[derive(Debug)]
pub(crate) struct Bucket {
    rate: u64,
    burst: u64,
    tokens: u64,
    refilled: Instant,
}

impl Bucket {
    pub(crate) fn new(rate: u64, burst: u64, now: Instant) -> Bucket {
        Bucket {
            rate,
            burst,
            tokens: burst,
            refilled: now,
        }
    }

    /// The bucket all sandboxes share.
    pub(crate) fn total(now: Instant) -> Bucket {
        Bucket::new(TOTAL_RATE, TOTAL_BURST, now)
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.refilled);
        let earned = (elapsed.as_micros() as u64).saturating_mul(self.rate) / 1_000_000;
        if earned > 0 {
            self.tokens = (self.tokens + earned).min(self.burst);
            self.refilled = now;
        }
    }
}

/// What `text` costs in the log: its length once escaped (an upper bound: `"` and `\`
/// take 2 bytes, other control bytes 6, a byte past ASCII 3, as a replacement
/// character when it is not UTF-8) plus [`LINE_OVERHEAD`].
pub(crate) fn log_cost(text: &[u8]) -> u64 {
    let escaped: u64 = text
        .iter()
        .map(|&b| match b {
            b'"' | b'\\' | b'\t' | b'\r' | b'\n' => 2,
            0..=0x1f | 0x7f => 6,
            0x80.. => 3,
            _ => 1,
        })
        .sum();
    escaped + LINE_OVERHEAD
}

/// Splits one sandbox's output into lines and applies the line cap and the rate limits.
/// Pure: the caller supplies the time and the bucket all sandboxes share.
#[derive(Debug)]
pub(crate) struct Limiter {
    line: Vec<u8>,
    /// Dropping the rest of a line that was cut.
    cutting: bool,
    own: Bucket,
    over_rate: u64,
    past_cap: u64,
    /// When the current report window began (there is something to report).
    window: Option<Instant>,
}

impl Limiter {
    pub(crate) fn new(now: Instant) -> Limiter {
        Limiter {
            line: Vec::with_capacity(LINE_CAP),
            cutting: false,
            own: Bucket::new(RATE, BURST, now),
            over_rate: 0,
            past_cap: 0,
            window: None,
        }
    }

    fn drop_bytes(&mut self, now: Instant, over_rate: u64, past_cap: u64) {
        self.over_rate += over_rate;
        self.past_cap += past_cap;
        self.window.get_or_insert(now);
    }

    /// Forwards the line held (`len` bytes of output, its newline included) if both
    /// its own bucket and `total` hold what it costs.
    fn forward(
        &mut self,
        now: Instant,
        len: u64,
        cut: bool,
        total: &mut Bucket,
        emit: &mut impl FnMut(Event<'_>),
    ) {
        self.own.refill(now);
        total.refill(now);
        let cost = log_cost(&self.line);
        if self.own.tokens >= cost && total.tokens >= cost {
            self.own.tokens -= cost;
            total.tokens -= cost;
            emit(Event::Line {
                text: &self.line,
                cut,
            });
        } else {
            self.drop_bytes(now, len, 0);
        }
        self.line.clear();
    }

    /// Takes `bytes` read from the pipe at `now`.
    pub(crate) fn feed(
        &mut self,
        bytes: &[u8],
        now: Instant,
        total: &mut Bucket,
        emit: &mut impl FnMut(Event<'_>),
    ) {
        let mut rest = bytes;
        while !rest.is_empty() {
            let newline = rest.iter().position(|&b| b == b'\n');
            let (chunk, ended) = match newline {
                Some(i) => (&rest[..i], true),
                None => (rest, false),
            };
            rest = &rest[chunk.len() + usize::from(ended)..];
            if self.cutting {
                self.drop_bytes(now, 0, chunk.len() as u64 + u64::from(ended));
                self.cutting = !ended;
                continue;
            }
            let room = LINE_CAP - self.line.len();
            if chunk.len() > room {
                // Past the cap: forward what fits, drop the rest of the line.
                self.line.extend_from_slice(&chunk[..room]);
                self.forward(now, LINE_CAP as u64, true, total, emit);
                self.drop_bytes(now, 0, (chunk.len() - room) as u64 + u64::from(ended));
                self.cutting = !ended;
                continue;
            }
            self.line.extend_from_slice(chunk);
            if ended {
                let len = self.line.len() as u64 + 1;
                self.forward(now, len, false, total, emit);
            }
        }
        self.tick(now, emit);
    }

    /// Reports the bytes dropped in a window that is over.
    pub(crate) fn tick(&mut self, now: Instant, emit: &mut impl FnMut(Event<'_>)) {
        if self.window.is_some_and(|w| now >= w + WINDOW) {
            self.report(emit);
        }
    }

    /// When [`Limiter::tick`] has something to report.
    pub(crate) fn due(&self) -> Option<Instant> {
        self.window.map(|w| w + WINDOW)
    }

    fn report(&mut self, emit: &mut impl FnMut(Event<'_>)) {
        if self.over_rate + self.past_cap > 0 {
            emit(Event::Dropped {
                over_rate: self.over_rate,
                past_cap: self.past_cap,
            });
        }
        self.over_rate = 0;
        self.past_cap = 0;
        self.window = None;
    }

    /// The pipe is done: forwards a last line without its newline and what was dropped.
    pub(crate) fn finish(
        &mut self,
        now: Instant,
        total: &mut Bucket,
        emit: &mut impl FnMut(Event<'_>),
    ) {
        if !self.line.is_empty() {
            let len = self.line.len() as u64;
            self.forward(now, len, false, total, emit);
        }
        self.report(emit);
    }
}

enum Command {
    Add { sandbox: String, pipe: OwnedFd },
    Bind { sandbox: String, function: String },
    Remove { sandbox: String },
    Stop,
}

/// The reader of every sandbox's output: one thread, stopped when dropped.
#[derive(Debug)]
pub(crate) struct SandboxOutput {
    commands: Arc<Mutex<Vec<Command>>>,
    waker: Arc<Waker>,
    thread: Option<JoinHandle<()>>,
}

impl std::fmt::Debug for Command {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Command::Add { sandbox, .. } => write!(f, "add {sandbox}"),
            Command::Bind { sandbox, function } => write!(f, "bind {sandbox} to {function}"),
            Command::Remove { sandbox } => write!(f, "remove {sandbox}"),
            Command::Stop => write!(f, "stop"),
        }
    }
}

impl SandboxOutput {
    /// Starts the reader thread (`sprout-output`).
    pub(crate) fn start() -> std::io::Result<SandboxOutput> {
        let poll = Poll::new()?;
        let waker = Arc::new(Waker::new(poll.registry(), WAKER)?);
        let commands = Arc::new(Mutex::new(Vec::new()));
        let reader = Reader {
            poll,
            commands: commands.clone(),
            sources: HashMap::new(),
            by_sandbox: HashMap::new(),
            next_token: 1,
            unfinished: VecDeque::new(),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
            total: Bucket::total(Instant::now()),
        };
        let thread = std::thread::Builder::new()
            .name("sprout-output".into())
            .spawn(move || reader.run())?;
        Ok(SandboxOutput {
            commands,
            waker,
            thread: Some(thread),
        })
    }

    fn send(&self, command: Command) {
        self.commands.lock().push(command);
        if let Err(e) = self.waker.wake() {
            tracing::error!(error = %e, "wake the sandbox output reader");
        }
    }

    /// Reads `pipe` (the read end of `sandbox`'s output pipe) from now on.
    pub(crate) fn add(&self, sandbox: &str, pipe: OwnedFd) {
        self.send(Command::Add {
            sandbox: sandbox.to_owned(),
            pipe,
        });
    }

    /// Names `function` in `sandbox`'s output from now on.
    pub(crate) fn bind(&self, sandbox: &str, function: &str) {
        self.send(Command::Bind {
            sandbox: sandbox.to_owned(),
            function: function.to_owned(),
        });
    }

    /// Reads what is left in `sandbox`'s pipe (its processes are gone) and drops it.
    pub(crate) fn remove(&self, sandbox: &str) {
        self.send(Command::Remove {
            sandbox: sandbox.to_owned(),
        });
    }
}

impl Drop for SandboxOutput {
    fn drop(&mut self) {
        self.send(Command::Stop);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Source {
    sandbox: String,
    function: Option<String>,
    pipe: File,
    limiter: Limiter,
}

impl Source {
    fn emit(sandbox: &str, function: Option<&str>, event: Event<'_>) {
        let function = function.unwrap_or("");
        match event {
            Event::Line { text, cut } => tracing::warn!(
                target: "sprout::sandbox_output",
                sandbox_id = %sandbox,
                function,
                cut,
                output = ?String::from_utf8_lossy(text),
                "sandbox output"
            ),
            Event::Dropped {
                over_rate,
                past_cap,
            } => tracing::warn!(
                target: "sprout::sandbox_output",
                sandbox_id = %sandbox,
                function,
                dropped_bytes = over_rate + past_cap,
                over_rate,
                past_cap,
                rate_limit = RATE,
                line_cap = LINE_CAP,
                "sandbox output dropped"
            ),
        }
    }

    /// Reads at most [`TURN_BUDGET`] bytes; whether the pipe is still open, and
    /// whether it may hold more.
    fn read(&mut self, buf: &mut [u8], total: &mut Bucket) -> (bool, bool) {
        let mut read = 0;
        while read < TURN_BUDGET {
            match read_pipe(&mut self.pipe, buf) {
                Got::Bytes(n) => {
                    read += n;
                    let (sandbox, function) = (&self.sandbox, self.function.as_deref());
                    self.limiter
                        .feed(&buf[..n], Instant::now(), total, &mut |e| {
                            Source::emit(sandbox, function, e)
                        });
                }
                Got::Empty => return (true, false),
                Got::Closed => return (false, false),
            }
        }
        (true, true)
    }

    fn finish(&mut self, total: &mut Bucket) {
        let (sandbox, function) = (&self.sandbox, self.function.as_deref());
        self.limiter.finish(Instant::now(), total, &mut |e| {
            Source::emit(sandbox, function, e)
        });
    }
}

struct Reader {
    poll: Poll,
    commands: Arc<Mutex<Vec<Command>>>,
    sources: HashMap<Token, Source>,
    by_sandbox: HashMap<String, Token>,
    next_token: usize,
    /// Pipes that may hold more than their last turn read (edge-triggered polling
    /// reports them no more).
    unfinished: VecDeque<Token>,
    buf: Box<[u8]>,
    /// What all sandboxes together may still forward.
    total: Bucket,
}

impl Reader {
    fn run(mut self) {
        let mut events = Events::with_capacity(256);
        loop {
            let now = Instant::now();
            let timeout = if self.unfinished.is_empty() {
                self.sources
                    .values()
                    .filter_map(|s| s.limiter.due())
                    .min()
                    .map(|due| due.saturating_duration_since(now))
            } else {
                Some(Duration::ZERO)
            };
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != ErrorKind::Interrupted {
                    tracing::error!(error = %e, "sandbox output reader: poll failed; stopping");
                    return;
                }
            }
            for event in &events {
                if event.token() == WAKER {
                    continue;
                }
                if !self.unfinished.contains(&event.token()) {
                    self.unfinished.push_back(event.token());
                }
            }
            let commands = std::mem::take(&mut *self.commands.lock());
            for command in commands {
                match command {
                    Command::Stop => return,
                    Command::Add { sandbox, pipe } => self.add(sandbox, pipe),
                    Command::Bind { sandbox, function } => {
                        if let Some(s) = self
                            .by_sandbox
                            .get(&sandbox)
                            .and_then(|t| self.sources.get_mut(t))
                        {
                            s.function = Some(function);
                        }
                    }
                    Command::Remove { sandbox } => {
                        if let Some(token) = self.by_sandbox.get(&sandbox).copied() {
                            if let Some(s) = self.sources.get_mut(&token) {
                                s.read(&mut self.buf, &mut self.total);
                            }
                            self.close(token);
                        }
                    }
                }
            }
            // One turn for each pipe with something to read.
            for _ in 0..self.unfinished.len() {
                let Some(token) = self.unfinished.pop_front() else {
                    break;
                };
                let Some(source) = self.sources.get_mut(&token) else {
                    continue;
                };
                match source.read(&mut self.buf, &mut self.total) {
                    (false, _) => self.close(token),
                    (true, true) => self.unfinished.push_back(token),
                    (true, false) => {}
                }
            }
            let now = Instant::now();
            for s in self.sources.values_mut() {
                let (sandbox, function) = (&s.sandbox, s.function.as_deref());
                s.limiter
                    .tick(now, &mut |e| Source::emit(sandbox, function, e));
            }
        }
    }

    fn add(&mut self, sandbox: String, pipe: OwnedFd) {
        if let Some(old) = self.by_sandbox.get(&sandbox).copied() {
            self.close(old);
        }
        if let Err(e) = set_nonblocking(&pipe) {
            tracing::error!(sandbox_id = %sandbox, error = %e, "sandbox output pipe: set non-blocking; not read");
            return;
        }
        let token = Token(self.next_token);
        self.next_token += 1;
        let raw = pipe.as_raw_fd();
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut SourceFd(&raw), token, Interest::READABLE)
        {
            tracing::error!(sandbox_id = %sandbox, error = %e, "sandbox output pipe: register; not read");
            return;
        }
        self.by_sandbox.insert(sandbox.clone(), token);
        self.sources.insert(
            token,
            Source {
                sandbox,
                function: None,
                pipe: File::from(pipe),
                limiter: Limiter::new(Instant::now()),
            },
        );
        // Output written before it was registered is reported by the first poll.
    }

    fn close(&mut self, token: Token) {
        if let Some(mut s) = self.sources.remove(&token) {
            s.finish(&mut self.total);
            let raw = s.pipe.as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&raw));
            self.by_sandbox.remove(&s.sandbox);
        }
        self.unfinished.retain(|&t| t != token);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[derive(Debug, PartialEq, Eq)]
    enum Seen {
        Line(String, bool),
        Dropped(u64, u64),
    }

    /// A shared bucket that never runs out, for tests of one sandbox's limits.
    fn unlimited(now: Instant) -> Bucket {
        Bucket::new(u64::MAX >> 8, u64::MAX >> 8, now)
    }

    fn feed(l: &mut Limiter, bytes: &[u8], now: Instant) -> Vec<Seen> {
        let mut seen = Vec::new();
        l.feed(bytes, now, &mut unlimited(now), &mut |e| seen.push(see(e)));
        seen
    }

    fn see(e: Event<'_>) -> Seen {
        match e {
            Event::Line { text, cut } => Seen::Line(String::from_utf8_lossy(text).into(), cut),
            Event::Dropped {
                over_rate,
                past_cap,
            } => Seen::Dropped(over_rate, past_cap),
        }
    }

    #[test]
    fn lines_are_split_and_a_partial_one_waits_for_its_end() {
        let t = Instant::now();
        let mut l = Limiter::new(t);
        assert_eq!(
            feed(&mut l, b"one\ntw", t),
            vec![Seen::Line("one".into(), false)]
        );
        assert_eq!(
            feed(&mut l, b"o\n\nthree", t),
            vec![
                Seen::Line("two".into(), false),
                Seen::Line("".into(), false)
            ]
        );
        let mut seen = Vec::new();
        l.finish(t, &mut unlimited(t), &mut |e| seen.push(see(e)));
        assert_eq!(seen, vec![Seen::Line("three".into(), false)]);
    }

    #[test]
    fn a_long_line_is_cut_at_the_cap_and_its_rest_counted() {
        let t = Instant::now();
        let mut l = Limiter::new(t);
        let exact = [b'a'; LINE_CAP];
        let mut input = exact.to_vec();
        input.push(b'\n');
        let seen = feed(&mut l, &input, t);
        assert_eq!(seen.len(), 1, "a line of exactly the cap is whole");
        assert!(matches!(&seen[0], Seen::Line(s, false) if s.len() == LINE_CAP));

        // 10,000 bytes in three reads, then a short line.
        let mut seen = feed(&mut l, &[b'b'; 3000], t);
        seen.extend(feed(&mut l, &[b'b'; 3000], t));
        seen.extend(feed(&mut l, &[b'b'; 4000], t));
        seen.extend(feed(&mut l, b"\nshort\n", t));
        assert!(
            matches!(&seen[0], Seen::Line(s, true) if s.len() == LINE_CAP && s.bytes().all(|b| b == b'b'))
        );
        assert_eq!(seen[1], Seen::Line("short".into(), false));
        assert_eq!(seen.len(), 2, "{seen:?}");
        // The cut rest (10,000 - 4,096 bytes and the newline) is reported a window later.
        let mut later = Vec::new();
        l.tick(t + WINDOW, &mut |e| later.push(see(e)));
        assert_eq!(later, vec![Seen::Dropped(0, 10_000 - LINE_CAP as u64 + 1)]);
        let mut again = Vec::new();
        l.tick(t + 3 * WINDOW, &mut |e| again.push(see(e)));
        assert!(again.is_empty(), "reported once: {again:?}");
    }

    #[test]
    fn a_flood_is_held_to_the_burst_then_the_rate() {
        let t = Instant::now();
        let mut l = Limiter::new(t);
        let line = [b'x'; 1023];
        let mut one = line.to_vec();
        one.push(b'\n'); // 1 KiB a line
        let flood: Vec<u8> = one.repeat(1024); // 1 MiB
        let cost = log_cost(&line);
        assert_eq!(cost, 1023 + LINE_OVERHEAD);
        let seen = feed(&mut l, &flood, t);
        let first = seen.iter().filter(|s| matches!(s, Seen::Line(..))).count() as u64;
        assert_eq!(first, BURST / cost, "the burst goes through, no more");
        assert!(
            seen.iter().all(|s| matches!(s, Seen::Line(..))),
            "no report inside the window"
        );

        // Half a second later: half a second's rate more; a window after the first
        // drop, one report of the bytes read and not forwarded.
        let seen = feed(&mut l, &flood, t + WINDOW / 2);
        let second = (BURST - first * cost + RATE / 2) / cost;
        assert_eq!(seen.len() as u64, second, "{seen:?}");
        let seen = feed(&mut l, b"", t + WINDOW);
        let dropped = (2048 - first - second) * 1024;
        assert_eq!(seen, vec![Seen::Dropped(dropped, 0)]);
    }

    #[test]
    fn all_sandboxes_together_are_held_to_the_total() {
        let t = Instant::now();
        let mut total = Bucket::total(t);
        let line = [b'y'; 1023];
        let mut one = line.to_vec();
        one.push(b'\n');
        let flood: Vec<u8> = one.repeat(1024);
        let cost = log_cost(&line);
        // Many fresh sandboxes, each with a full burst of its own: together they
        // forward no more than the total burst.
        let mut forwarded = 0;
        for _ in 0..16 {
            let mut l = Limiter::new(t);
            l.feed(&flood, t, &mut total, &mut |e| {
                if matches!(e, Event::Line { .. }) {
                    forwarded += 1;
                }
            });
        }
        assert_eq!(forwarded, TOTAL_BURST / cost);
    }

    #[test]
    fn a_line_costs_what_it_takes_in_the_log() {
        assert_eq!(log_cost(b"plain"), 5 + LINE_OVERHEAD);
        assert_eq!(
            log_cost(b"\x1b[2J"),
            6 + 3 + LINE_OVERHEAD,
            "ESC becomes \\u{{1b}}"
        );
        assert_eq!(log_cost(b"\"\\"), 4 + LINE_OVERHEAD);
        assert_eq!(
            log_cost(&[0xff]),
            3 + LINE_OVERHEAD,
            "a replacement character"
        );
    }

    #[test]
    fn memory_stays_bounded_by_the_line_cap() {
        let t = Instant::now();
        let mut l = Limiter::new(t);
        for _ in 0..64 {
            feed(&mut l, &[b'z'; 64 << 10], t);
        }
        assert!(l.line.capacity() <= LINE_CAP, "{}", l.line.capacity());
    }

    /// The thread: a line written to a registered pipe is read, and a pipe whose
    /// writers are gone is dropped (its descriptor closed), as is a removed one.
    #[test]
    fn the_reader_drops_a_pipe_at_end_of_file_and_on_remove() {
        let out = SandboxOutput::start().unwrap();
        let (r, w) = pipe().unwrap();
        let ino = inode(&r);
        out.add("sprout-test-1", r);
        let mut w = File::from(w);
        writeln!(w, "hello from a shim").unwrap();
        drop(w);
        wait_until(|| pipe_fds(ino) == 0);
        assert_eq!(
            pipe_fds(ino),
            0,
            "the read end is still open after end of file"
        );

        let (r, w) = pipe().unwrap();
        let ino = inode(&r);
        out.add("sprout-test-2", r);
        out.remove("sprout-test-2");
        wait_until(|| pipe_fds(ino) == 1);
        assert_eq!(pipe_fds(ino), 1, "removed, yet its read end is open");
        drop(w);
        drop(out); // stops and joins the thread
    }

    /// A sandbox writing as fast as it can gets turns of [`TURN_BUDGET`] bytes: another
    /// sandbox's pipe is still read (here: its end of file seen and the pipe closed).
    #[test]
    fn a_flooding_sandbox_does_not_starve_another() {
        let out = SandboxOutput::start().unwrap();
        let (r, w) = pipe().unwrap();
        out.add("sprout-test-flood", r);
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flooder = {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut w = File::from(w);
                let chunk = [b'y'; 64 << 10];
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    if w.write_all(&chunk).is_err() {
                        break;
                    }
                }
            })
        };
        let (r, w) = pipe().unwrap();
        let ino = inode(&r);
        out.add("sprout-test-quiet", r);
        let mut w = File::from(w);
        writeln!(w, "one line").unwrap();
        drop(w);
        wait_until(|| pipe_fds(ino) == 0);
        let closed = pipe_fds(ino) == 0;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        out.remove("sprout-test-flood");
        flooder.join().unwrap();
        assert!(
            closed,
            "the quiet sandbox's pipe was not read while another flooded"
        );
        drop(out);
    }

    /// What a sandbox writes cannot pass for a line of the agent's own: it is one
    /// field, quoted, with control characters escaped.
    #[test]
    fn a_line_is_written_escaped_inside_the_agents_own() {
        #[derive(Clone, Default)]
        struct Buf(Arc<std::sync::Mutex<Vec<u8>>>);
        impl Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_ansi(false)
            .with_writer(move || writer.clone())
            .finish();
        let forged = b"\x1b[2K\r2026-01-01T00:00:00Z  INFO agent: \"forged\"";
        tracing::subscriber::with_default(subscriber, || {
            Source::emit(
                "sprout-1-2",
                Some("f"),
                Event::Line {
                    text: forged,
                    cut: false,
                },
            )
        });
        let logged = String::from_utf8(buf.0.lock().unwrap().clone()).unwrap();
        assert_eq!(logged.lines().count(), 1, "{logged:?}");
        assert!(
            !logged.contains('\r') && !logged.contains('\x1b'),
            "{logged:?}"
        );
        assert!(
            logged.contains(r#"output="\u{1b}[2K\r2026-01-01T00:00:00Z  INFO agent: \"forged\"""#),
            "{logged:?}"
        );
        assert!(
            logged.contains("sandbox_id=sprout-1-2") && logged.contains("function=\"f\""),
            "{logged:?}"
        );
    }

    use std::os::unix::fs::MetadataExt;

    fn inode(fd: &OwnedFd) -> u64 {
        std::fs::metadata(format!("/proc/self/fd/{}", fd.as_raw_fd()))
            .unwrap()
            .ino()
    }

    fn wait_until(done: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !done() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    /// How many descriptors of this process are on the pipe `ino` (either end).
    fn pipe_fds(ino: u64) -> usize {
        let want = format!("pipe:[{ino}]");
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .ok()
                    .and_then(|e| std::fs::read_link(e.path()).ok())
                    .is_some_and(|t| t.to_string_lossy() == want)
            })
            .count()
    }
}
