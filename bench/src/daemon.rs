//! A `sprout serve` started for a measurement, stopped (SIGTERM, by pid) when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use ipc::client::{Client, ClientResponse};

pub struct Daemon {
    child: Child,
    pub socket: PathBuf,
    _dir: tempfile::TempDir,
}

impl Daemon {
    pub fn start(bin: &Path, args: &[&str]) -> anyhow::Result<Daemon> {
        let dir = tempfile::Builder::new().prefix("sprout-bench-").tempdir()?;
        let socket = dir.path().join("api.sock");
        let log_path = dir.path().join("daemon.log");
        let log = std::fs::File::create(&log_path).context("create the daemon's log")?;
        let child = Command::new(bin.join("sprout"))
            .args(["serve", "--socket"])
            .arg(&socket)
            .arg("--data-dir")
            .arg(dir.path().join("data"))
            .args(args)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start sprout serve")?;
        let mut daemon = Daemon {
            child,
            socket,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Client::connect(&daemon.socket).is_err() {
            if let Some(status) = daemon.child.try_wait()? {
                let log = std::fs::read_to_string(&log_path).unwrap_or_default();
                bail!("sprout serve exited ({status}) before serving; its log:\n{log}");
            }
            if Instant::now() > deadline {
                bail!("daemon did not come up on {}", daemon.socket.display());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(daemon)
    }

    /// The daemon's pid: its agent id, which names its cgroups
    /// (`/sprout/<pid>/sprout-<pid>-<n>`) and its fork server's (`sprout-<pid>.forks`).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn client(&self) -> anyhow::Result<Client> {
        Ok(Client::connect(&self.socket)?)
    }

    /// Registers `dir` as `name` with extra settings (JSON object fields).
    pub fn register(
        &self,
        c: &mut Client,
        name: &str,
        dir: &Path,
        extra: serde_json::Value,
    ) -> anyhow::Result<()> {
        let mut body = serde_json::json!({ "path": dir });
        if let serde_json::Value::Object(m) = extra {
            body.as_object_mut().unwrap().extend(m);
        }
        let r = c.request(
            "PUT",
            &format!("/functions/{name}"),
            Some("application/json"),
            body.to_string().as_bytes(),
        )?;
        ok(&r, "register")?;
        Ok(())
    }

    pub fn status(&self, c: &mut Client) -> anyhow::Result<serde_json::Value> {
        let r = c.request("GET", "/status", None, b"")?;
        ok(&r, "status")?;
        Ok(serde_json::from_slice(&r.body)?)
    }

    /// Waits until `ready` holds for the daemon's status.
    pub fn wait_status(
        &self,
        c: &mut Client,
        what: &str,
        ready: impl Fn(&serde_json::Value) -> bool,
    ) -> anyhow::Result<()> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let s = self.status(c)?;
            if ready(&s) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!("timed out waiting for {what}: {s}");
            }
            std::thread::sleep(Duration::from_millis(5));
        }
    }
}

pub fn ok(r: &ClientResponse, what: &str) -> anyhow::Result<()> {
    if r.status != 200 {
        bail!("{what}: {} {}", r.status, String::from_utf8_lossy(&r.body));
    }
    Ok(())
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let _ = self.child.wait();
    }
}
