//! The sprout paths of the latency suite, each against a daemon set up for it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc::client::{Client, ClientResponse};
use serde_json::json;

use crate::daemon::{ok, Daemon};
use crate::stats::Row;

const EVENT: &[u8] = b"{}";

pub(crate) fn invoke(c: &mut Client, name: &str) -> anyhow::Result<ClientResponse> {
    let r = c.request(
        "POST",
        &format!("/functions/{name}/invoke"),
        Some("application/json"),
        EVENT,
    )?;
    ok(&r, "invoke")?;
    Ok(r)
}

pub(crate) fn expect_start(r: &ClientResponse, want: &str) -> anyhow::Result<()> {
    match r.header("x-sprout-start") {
        Some(got) if got == want => Ok(()),
        got => bail!("expected a {want} start, got {got:?}"),
    }
}

/// Never freeze, never evict: a warm instance stays running.
pub(crate) const KEEP_RUNNING: &[&str] = &["--stem-cells", "0", "--pause-grace", "3600000"];

/// A no-op function of one runtime, as the suite registers it.
pub struct Noop<'a> {
    /// The runtime's name (`python`, `nodejs`, `native`), as `--stem-cells` takes it.
    pub runtime: &'a str,
    pub dir: &'a Path,
    /// The handler, when not the runtime's default.
    pub handler: Option<&'a str>,
}

impl Noop<'_> {
    fn settings(&self) -> serde_json::Value {
        let mut settings = json!({ "runtime": self.runtime });
        if let Some(handler) = self.handler {
            settings["handler"] = json!(handler);
        }
        settings
    }
}

/// Warm invoke of a no-op function through the daemon's socket (keep-alive).
pub fn warm(bin: &Path, label: &str, noop: &Noop, runs: usize) -> anyhow::Result<Row> {
    let d = Daemon::start(bin, KEEP_RUNNING)?;
    let mut c = d.client()?;
    d.register(&mut c, "noop", noop.dir, noop.settings())?;
    invoke(&mut c, "noop")?;
    for _ in 0..runs / 10 {
        invoke(&mut c, "noop")?; // warm-up
    }
    let mut samples = Vec::with_capacity(runs);
    for _ in 0..runs {
        let t = Instant::now();
        let r = invoke(&mut c, "noop")?;
        samples.push(t.elapsed());
        expect_start(&r, "warm")?;
    }
    Ok(Row::new(label, &samples))
}

/// Warm invoke of a no-op function through the daemon's TCP listener (`--listen`,
/// keep-alive), with a key checked on every request, and with TLS if `tls`; and, as a
/// control, the same function on the same daemon's Unix socket, the two interleaved
/// call by call so that both see the same machine: the listener's cost is the
/// difference.
pub fn warm_tcp(
    bin: &Path,
    label: &str,
    noop: &Noop,
    runs: usize,
    tls: bool,
) -> anyhow::Result<(Row, Row)> {
    let files = tempfile::Builder::new()
        .prefix("sprout-bench-tcp-")
        .tempdir()?;
    let key = "bench-0000-4000-8000-000000000001:bench-secret-0123456789abcdef0123456789";
    let keys = files.path().join("keys");
    std::fs::write(&keys, format!("* {key}\n"))?;
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    // A free port: bound and let go (the daemon binds it right after).
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (addr_arg, keys_arg) = (addr.to_string(), keys.display().to_string());
    let mut args: Vec<String> = KEEP_RUNNING.iter().map(|a| (*a).to_owned()).collect();
    args.extend(["--listen".into(), addr_arg, "--auth".into(), keys_arg]);
    let ca = if tls {
        let (ca, cert, key) = tls_files(files.path())?;
        args.extend([
            "--tls-cert".into(),
            cert.display().to_string(),
            "--tls-key".into(),
            key.display().to_string(),
        ]);
        Some(ca)
    } else {
        None
    };
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let d = Daemon::start(bin, &args)?;
    let mut unix = d.client()?;
    d.register(&mut unix, "noop", noop.dir, noop.settings())?;
    let scheme = if tls { "https" } else { "http" };
    let options = ipc::client::TcpOptions {
        key: Some(key.to_owned()),
        ca_cert: ca,
    };
    let mut tcp = Client::connect_url(&format!("{scheme}://{addr}"), &options)
        .with_context(|| format!("connect to {scheme}://{addr}"))?;
    invoke(&mut unix, "noop")?;
    for _ in 0..runs / 10 {
        invoke(&mut tcp, "noop")?; // warm-up
        invoke(&mut unix, "noop")?;
    }
    let mut samples = (Vec::with_capacity(runs), Vec::with_capacity(runs));
    for _ in 0..runs {
        for (c, into) in [(&mut tcp, &mut samples.0), (&mut unix, &mut samples.1)] {
            let t = Instant::now();
            let r = invoke(c, "noop")?;
            into.push(t.elapsed());
            expect_start(&r, "warm")?;
        }
    }
    Ok((
        Row::new(label, &samples.0),
        Row::new(
            &format!("  control: the same daemon's Unix socket, interleaved ({scheme})"),
            &samples.1,
        ),
    ))
}

/// PEM files of a CA, and of a certificate it issued for 127.0.0.1 with its key.
fn tls_files(dir: &Path) -> anyhow::Result<(PathBuf, PathBuf, PathBuf)> {
    let ca_key = rcgen::KeyPair::generate()?;
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = ca_params.self_signed(&ca_key)?;
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate()?;
    let cert =
        rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])?.signed_by(&key, &issuer)?;
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem())?;
    std::fs::write(&paths.1, cert.pem())?;
    std::fs::write(&paths.2, key.serialize_pem())?;
    // sprout refuses a TLS private key others can read.
    std::fs::set_permissions(
        &paths.2,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )?;
    Ok(paths)
}

/// Idle time before each frozen (and idle-control) invoke.
const IDLE_GAP: Duration = Duration::from_millis(10);

/// Invoke of a warm function whose sandbox is frozen (thaw + invoke), each after
/// [`IDLE_GAP`] idle; and, as a control, a warm instance that is never frozen after
/// the same gap: the difference is what freezing costs, the rest is waking up an
/// idle machine.
pub fn frozen(bin: &Path, noop: &Path, runs: usize) -> anyhow::Result<(Row, Row)> {
    let mut rows = Vec::new();
    for (grace, start, path) in [
        (
            "1",
            "thawed",
            "frozen warm invoke (thaw + invoke, after 10 ms idle)",
        ),
        ("3600000", "warm", "  control: warm invoke after 10 ms idle"),
    ] {
        let d = Daemon::start(bin, &["--stem-cells", "0", "--pause-grace", grace])?;
        let mut c = d.client()?;
        d.register(&mut c, "noop", noop, json!({}))?;
        invoke(&mut c, "noop")?;
        // Only samples that took the path count: a busy machine may not have frozen
        // the instance within the gap.
        let mut samples = Vec::with_capacity(runs);
        for _ in 0..runs {
            std::thread::sleep(IDLE_GAP);
            let t = Instant::now();
            let r = invoke(&mut c, "noop")?;
            let took = t.elapsed();
            if expect_start(&r, start).is_ok() {
                samples.push(took);
            }
        }
        if samples.len() < runs.div_ceil(2) {
            bail!(
                "{path}: only {} of {runs} invokes started {start}",
                samples.len()
            );
        }
        rows.push(Row::new(path, &samples));
    }
    let control = rows.pop().expect("two rows");
    Ok((rows.pop().expect("two rows"), control))
}

/// How a daemon makes new sandboxes: `sprout serve --new-sandboxes fork|create`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NewSandboxes {
    /// Forked from the fork server's zygote (the default).
    Fork,
    /// Created by libcontainer, as before the fork server.
    Create,
}

impl NewSandboxes {
    /// The value of `--new-sandboxes`.
    pub fn arg(self) -> &'static str {
        match self {
            NewSandboxes::Fork => "fork",
            NewSandboxes::Create => "create",
        }
    }

    /// Sandboxes made so far (forked, created), from `GET /status`.
    pub(crate) fn made(d: &Daemon, c: &mut Client) -> anyhow::Result<(u64, u64)> {
        let s = d.status(c)?;
        let count = |field: &str| {
            s[field]
                .as_u64()
                .with_context(|| format!("GET /status has no {field}: {s}"))
        };
        Ok((count("sandboxes_forked")?, count("sandboxes_created")?))
    }

    /// Checks that the sandboxes made between `before` and `after` (as [`Self::made`]
    /// counts them) were made this way, and at least `at_least` of them: a fork server
    /// that fails makes the agent fall back to libcontainer, and the row would then
    /// measure the wrong path.
    pub(crate) fn check_made(
        self,
        before: (u64, u64),
        after: (u64, u64),
        at_least: u64,
    ) -> anyhow::Result<()> {
        let (forked, created) = (after.0 - before.0, after.1 - before.1);
        let (this, other) = match self {
            NewSandboxes::Fork => (forked, created),
            NewSandboxes::Create => (created, forked),
        };
        if this < at_least || other > 0 {
            bail!(
                "with --new-sandboxes {}: {forked} sandboxes forked and {created} created, \
                 expected at least {at_least} {} and none otherwise",
                self.arg(),
                match self {
                    NewSandboxes::Fork => "forked",
                    NewSandboxes::Create => "created",
                }
            );
        }
        Ok(())
    }
}

/// Cold invoke: a function never invoked before, from a stem cell of its runtime or,
/// with `stem_cells` 0, from a new sandbox. Each function is removed after its invoke.
/// With `made`, the daemon makes its sandboxes that way (`--new-sandboxes`) and every
/// sample's new sandbox is checked to have been made that way (status counters);
/// without, the daemon's default, unchecked.
pub fn cold(
    bin: &Path,
    path: &str,
    noop: &Noop,
    runs: usize,
    stem_cells: usize,
    made: Option<NewSandboxes>,
) -> anyhow::Result<Row> {
    let target = format!("{}={stem_cells}", noop.runtime);
    let mut args = vec!["--stem-cells", &target, "--pause-grace", "3600000"];
    if let Some(m) = made {
        args.extend(["--new-sandboxes", m.arg()]);
    }
    let d = Daemon::start(bin, &args)?;
    let mut c = d.client()?;
    let start = if stem_cells > 0 {
        "stem_cell"
    } else {
        "new_sandbox"
    };
    let mut samples = Vec::with_capacity(runs);
    for i in 0..runs + 2 {
        // Only measure with the pool full (stem cells made and frozen).
        d.wait_status(&mut c, "stem cells", |s| {
            s["stem_cells"].as_u64() == Some(stem_cells as u64)
                && s["frozen"].as_u64() >= Some(stem_cells as u64)
        })?;
        let name = format!("cold{i}");
        d.register(&mut c, &name, noop.dir, noop.settings())?;
        let before = match made {
            Some(_) => NewSandboxes::made(&d, &mut c)?,
            None => (0, 0),
        };
        let t = Instant::now();
        let r = invoke(&mut c, &name)?;
        let took = t.elapsed();
        expect_start(&r, start)?;
        if let Some(m) = made {
            let at_least = u64::from(stem_cells == 0);
            m.check_made(before, NewSandboxes::made(&d, &mut c)?, at_least)?;
        }
        if i >= 2 {
            samples.push(took); // the first two warm up caches
        }
        let r = c.request("DELETE", &format!("/functions/{name}"), None, b"")?;
        ok(&r, "remove")?;
    }
    Ok(Row::new(path, &samples))
}

/// Stem cells of the storm's daemon: the default pool (`python=2`).
const STORM_STEM_CELLS: u64 = 2;

/// Cold-start storm: `width` Python no-op functions never invoked before, invoked at
/// once (one keep-alive client thread each, connected first, released together by a
/// barrier) on a daemon with the default pool (2 Python stem cells) that makes new
/// sandboxes as `made` says. Each of `rounds` rounds registers `width` new functions
/// with the pool settled (stem cells made and frozen, the last round's sandboxes
/// gone), and removes them after; the samples of every round are pooled. Each invoke
/// must start in a stem cell or a new sandbox, and every sandbox made must have been
/// made as `made` says.
pub fn storm(
    bin: &Path,
    path: &str,
    noop: &Path,
    made: NewSandboxes,
    width: usize,
    rounds: usize,
) -> anyhow::Result<Row> {
    let stem_cells = format!("python={STORM_STEM_CELLS}");
    let d = Daemon::start(
        bin,
        &["--stem-cells", &stem_cells, "--new-sandboxes", made.arg()],
    )?;
    let mut c = d.client()?;
    let mut samples = Vec::with_capacity(width * rounds);
    for round in 0..rounds {
        d.wait_status(&mut c, "the pool to settle", |s| {
            s["sandboxes"].as_u64() == Some(STORM_STEM_CELLS)
                && s["stem_cells"].as_u64() == Some(STORM_STEM_CELLS)
                && s["frozen"].as_u64() == Some(STORM_STEM_CELLS)
        })?;
        let names: Vec<String> = (0..width).map(|i| format!("storm{round}-{i}")).collect();
        for name in &names {
            d.register(&mut c, name, noop, json!({}))?;
        }
        let before = NewSandboxes::made(&d, &mut c)?;
        let clients = names
            .iter()
            .map(|_| d.client())
            .collect::<anyhow::Result<Vec<_>>>()?;
        let barrier = Barrier::new(width);
        let results: Vec<anyhow::Result<(Duration, String)>> = std::thread::scope(|s| {
            let threads: Vec<_> = clients
                .into_iter()
                .zip(&names)
                .map(|(mut c, name)| {
                    let barrier = &barrier;
                    s.spawn(move || -> anyhow::Result<(Duration, String)> {
                        barrier.wait();
                        let t = Instant::now();
                        let r = invoke(&mut c, name)?;
                        let took = t.elapsed();
                        let start = r.header("x-sprout-start").unwrap_or("none").to_owned();
                        Ok((took, start))
                    })
                })
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("storm client thread"))
                .collect()
        });
        let mut new = 0;
        for r in results {
            let (took, start) = r.context("storm invoke")?;
            match start.as_str() {
                "new_sandbox" => new += 1,
                "stem_cell" => {}
                other => {
                    bail!("a storm invoke started {other:?}, not in a new sandbox or a stem cell")
                }
            }
            samples.push(took);
        }
        made.check_made(before, NewSandboxes::made(&d, &mut c)?, new)?;
        for name in &names {
            let r = c.request("DELETE", &format!("/functions/{name}"), None, b"")?;
            ok(&r, "remove")?;
        }
    }
    Ok(Row::new(path, &samples))
}

/// `clients` concurrent keep-alive clients invoking a no-op for `duration`.
pub fn throughput(
    bin: &Path,
    noop: &Path,
    clients: usize,
    duration: Duration,
) -> anyhow::Result<Row> {
    let d = Daemon::start(bin, KEEP_RUNNING)?;
    let mut c = d.client()?;
    d.register(&mut c, "noop", noop, json!({ "max_instances": 4 }))?;
    // Make the instances first, so the run measures warm throughput.
    std::thread::scope(|s| {
        for _ in 0..clients.min(4) {
            s.spawn(|| -> anyhow::Result<()> {
                let mut c = d.client()?;
                invoke(&mut c, "noop").map(drop)
            });
        }
    });
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let results: Vec<anyhow::Result<Vec<Duration>>> = std::thread::scope(|s| {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                let stop = stop.clone();
                let d = &d;
                s.spawn(move || -> anyhow::Result<Vec<Duration>> {
                    let mut c = d.client()?;
                    let mut lat = Vec::new();
                    while !stop.load(Ordering::Relaxed) {
                        let t = Instant::now();
                        invoke(&mut c, "noop")?;
                        lat.push(t.elapsed());
                    }
                    Ok(lat)
                })
            })
            .collect();
        std::thread::sleep(duration);
        stop.store(true, Ordering::Relaxed);
        workers
            .into_iter()
            .map(|w| w.join().expect("client thread"))
            .collect()
    });
    let elapsed = started.elapsed();
    let mut all = Vec::new();
    for r in results {
        all.extend(r.context("throughput client")?);
    }
    let ops = all.len() as f64 / elapsed.as_secs_f64();
    Ok(Row::new(&format!("throughput, {clients} clients (no-op)"), &all).with_ops_per_s(ops))
}

/// OpenWhisk's invoker contract, warm: `POST /invoke` with an `ActivationMessage`
/// for the no-op function over a kept TCP connection with the `*` key, timed to the
/// early acknowledgement (the response's head) and to its body (the acknowledgement
/// with the activation); and, interleaved call by call on the same daemon, sprout's
/// own warm invoke over TCP with the same key: the invoker path's cost is the
/// difference of the bodies.
pub fn warm_invoker(bin: &Path, noop: &Noop, runs: usize) -> anyhow::Result<[Row; 3]> {
    use std::io::{Read, Write};

    let files = tempfile::Builder::new()
        .prefix("sprout-bench-invoker-")
        .tempdir()?;
    let key = "bench-0000-4000-8000-000000000002:bench-secret-0123456789abcdef0123456789";
    let keys = files.path().join("keys");
    std::fs::write(&keys, format!("* {key}\n"))?;
    std::fs::set_permissions(&keys, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    let addr = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let (addr_arg, keys_arg) = (addr.to_string(), keys.display().to_string());
    let mut args: Vec<&str> = KEEP_RUNNING.to_vec();
    args.extend(["--listen", &addr_arg, "--auth", &keys_arg]);
    let d = Daemon::start(bin, &args)?;
    let mut unix = d.client()?;
    d.register(&mut unix, "noop", noop.dir, noop.settings())?;
    let options = ipc::client::TcpOptions {
        key: Some(key.to_owned()),
        ca_cert: None,
    };
    let mut own = Client::connect_url(&format!("http://{addr}"), &options)
        .with_context(|| format!("connect to http://{addr}"))?;
    let mut raw = std::net::TcpStream::connect(addr)?;
    raw.set_nodelay(true)?;
    raw.set_read_timeout(Some(Duration::from_secs(30)))?;
    let authorization = format!("Basic {}", base64_standard(key.as_bytes()));
    let mut n: u128 = 0;
    let mut buf = Vec::with_capacity(8192);
    // One `POST /invoke`: (to the head, to the body's end).
    let mut activation = |raw: &mut std::net::TcpStream| -> anyhow::Result<(Duration, Duration)> {
        n += 1;
        let msg = json!({
            "transid": [format!("bench-{n}"), 1700000000000_u64],
            "action": {"path": "default", "name": "noop", "version": "0.0.1"},
            "revision": null,
            "user": {"subject": "bench", "namespace": {"name": "default", "uuid": "b"},
                     "authkey": {"api_key": "b:k"}},
            "activationId": format!("{n:032x}"),
            "rootControllerIndex": {"asString": "0"},
            "blocking": true,
            "content": {}
        })
        .to_string();
        let req = format!(
            "POST /invoke HTTP/1.1\r\nAuthorization: {authorization}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{msg}",
            msg.len()
        );
        buf.clear();
        let t = Instant::now();
        raw.write_all(req.as_bytes())?;
        let mut head = None;
        let mut chunk = [0u8; 8192];
        loop {
            let got = raw.read(&mut chunk)?;
            if got == 0 {
                bail!(
                    "POST /invoke: the connection closed: {}",
                    String::from_utf8_lossy(&buf)
                );
            }
            buf.extend_from_slice(&chunk[..got]);
            if head.is_none() && buf.windows(4).any(|w| w == b"\r\n\r\n") {
                head = Some(t.elapsed());
            }
            if buf.ends_with(b"\r\n0\r\n\r\n") {
                break;
            }
        }
        let body = t.elapsed();
        if !buf.starts_with(b"HTTP/1.1 200 ") {
            bail!("POST /invoke: {}", String::from_utf8_lossy(&buf));
        }
        // A failed activation is not a measurement of the warm path.
        let text = String::from_utf8_lossy(&buf);
        if !text.contains("\"statusCode\":0") {
            bail!("POST /invoke: the activation did not succeed: {text}");
        }
        Ok((head.unwrap_or(body), body))
    };
    invoke(&mut own, "noop")?;
    for _ in 0..runs / 10 + 1 {
        activation(&mut raw)?; // warm-up
        invoke(&mut own, "noop")?;
    }
    let (mut heads, mut bodies, mut owns) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..runs {
        let (head, body) = activation(&mut raw)?;
        heads.push(head);
        bodies.push(body);
        let t = Instant::now();
        let r = invoke(&mut own, "noop")?;
        owns.push(t.elapsed());
        expect_start(&r, "warm")?;
    }
    Ok([
        Row::new(
            "POST /invoke warm (no-op, TCP): early acknowledgement",
            &heads,
        ),
        Row::new(
            "POST /invoke warm (no-op, TCP): acknowledgement body",
            &bodies,
        ),
        Row::new(
            "  control: sprout's own warm invoke, same daemon and key, interleaved",
            &owns,
        ),
    ])
}

/// Standard base64 (the basic auth header).
fn base64_standard(bytes: &[u8]) -> String {
    const TABLE: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() {
                TABLE[((n >> (18 - 6 * i)) & 63) as usize] as char
            } else {
                '='
            });
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sandboxes_made_the_other_way_fail() {
        let fork = NewSandboxes::Fork;
        fork.check_made((3, 1), (4, 1), 1).unwrap();
        fork.check_made((3, 1), (35, 1), 30).unwrap();
        // The libcontainer fallback: created, not forked.
        let err = format!("{:#}", fork.check_made((3, 1), (3, 2), 1).unwrap_err());
        assert!(
            err.contains("--new-sandboxes fork: 0 sandboxes forked and 1 created"),
            "{err}"
        );
        // Some forked, one created: still the wrong path for one sample.
        assert!(fork.check_made((0, 0), (31, 1), 30).is_err());
        // Too few.
        assert!(fork.check_made((0, 0), (29, 0), 30).is_err());
        let create = NewSandboxes::Create;
        create.check_made((0, 5), (0, 6), 1).unwrap();
        assert!(create.check_made((0, 5), (1, 6), 1).is_err());
        // A stem-cell start makes no sandbox before it answers: none is required.
        create.check_made((0, 5), (0, 5), 0).unwrap();
    }
}
