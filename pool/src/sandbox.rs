//! One sandbox and its state machine.

use std::path::{Path, PathBuf};

use oci_spec::runtime::LinuxResources;

use crate::{Error, Freezer};

/// Where a sandbox is in its life. Every change goes through [`Sandbox`]'s methods,
/// which reject illegal moves and trace legal ones (with sandbox and function ids).
///
/// ```text
///             bind                      invoke
/// Creating ─▶ StemCell ───────▶ Bound ◀────────▶ Running
///               │  ▲             │  ▲
///        freeze │  │ thaw  freeze │  │ thaw
///               ▼  │             ▼  │
///              Frozen (unbound)  Frozen (bound)
///
/// every state but Dead ──destroy──▶ Dead
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// The spawner is creating it and its shim is starting its zygotes.
    Creating,
    /// Up, zygotes ready, bound to no function: a prewarmed stem cell.
    StemCell,
    /// A function's code is visible and a warm instance of it waits; nothing runs.
    Bound,
    /// An invocation is in flight.
    Running,
    /// Its cgroup is frozen (a stem cell or a bound sandbox; see [`Sandbox::function`]).
    Frozen,
    /// Destroyed (or being destroyed); terminal.
    Dead,
}

/// A sandbox: a libcontainer container whose PID 1 is the shim.
#[derive(Debug)]
pub struct Sandbox {
    id: String,
    /// Host pid of the shim.
    pid: i32,
    /// Cgroup path from the hierarchy root.
    cgroup: PathBuf,
    state: SandboxState,
    function: Option<String>,
    freezer: Freezer,
}

impl Sandbox {
    pub(crate) fn new(id: String, pid: i32, cgroup: PathBuf, freezer: Freezer) -> Sandbox {
        Sandbox {
            id,
            pid,
            cgroup,
            state: SandboxState::Creating,
            function: None,
            freezer,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn cgroup(&self) -> &Path {
        &self.cgroup
    }

    pub fn state(&self) -> SandboxState {
        self.state
    }

    /// The function it is bound to, if any.
    pub fn function(&self) -> Option<&str> {
        self.function.as_deref()
    }

    fn go(&mut self, to: SandboxState) -> Result<(), Error> {
        use SandboxState::*;
        let bound = self.function.is_some();
        let legal = match (self.state, to) {
            (Creating, StemCell) | (StemCell, Frozen) | (Bound, Frozen) => true,
            (Frozen, StemCell) => !bound,
            (Frozen, Bound) | (StemCell, Bound) => bound,
            (Bound, Running) | (Running, Bound) => true,
            (from, Dead) => from != Dead,
            _ => false,
        };
        if !legal {
            return Err(Error::Transition {
                id: self.id.clone(),
                from: self.state,
                to,
            });
        }
        tracing::trace!(
            sandbox_id = %self.id,
            function = self.function.as_deref().unwrap_or(""),
            from = ?self.state,
            to = ?to,
            "sandbox transition"
        );
        self.state = to;
        Ok(())
    }

    /// Creating → StemCell: the shim reported ready.
    pub fn ready(&mut self) -> Result<(), Error> {
        self.go(SandboxState::StemCell)
    }

    /// StemCell → Bound: `function`'s code is visible and an instance is up.
    pub fn bind(&mut self, function: &str) -> Result<(), Error> {
        if self.state != SandboxState::StemCell {
            return Err(Error::Transition {
                id: self.id.clone(),
                from: self.state,
                to: SandboxState::Bound,
            });
        }
        self.function = Some(function.to_owned());
        self.go(SandboxState::Bound)
    }

    /// Bound → Running.
    pub fn start_invocation(&mut self) -> Result<(), Error> {
        self.go(SandboxState::Running)
    }

    /// Running → Bound.
    pub fn end_invocation(&mut self) -> Result<(), Error> {
        self.go(SandboxState::Bound)
    }

    /// StemCell or Bound → Frozen: stops every process of the sandbox.
    pub fn freeze(&mut self) -> Result<(), Error> {
        if !matches!(self.state, SandboxState::StemCell | SandboxState::Bound) {
            return Err(Error::Transition {
                id: self.id.clone(),
                from: self.state,
                to: SandboxState::Frozen,
            });
        }
        self.freezer.freeze()?;
        self.go(SandboxState::Frozen)
    }

    /// Frozen → StemCell or Bound. A sandbox that is not frozen is left as it is.
    pub fn thaw(&mut self) -> Result<(), Error> {
        if self.state != SandboxState::Frozen {
            return Ok(());
        }
        self.freezer.thaw()?;
        self.go(if self.function.is_some() {
            SandboxState::Bound
        } else {
            SandboxState::StemCell
        })
    }

    /// Any → Dead (the spawner does the destroying).
    pub(crate) fn die(&mut self) {
        if self.state != SandboxState::Dead {
            let _ = self.go(SandboxState::Dead);
        }
    }

    /// Changes the sandbox's cgroup limits (a stem cell made with default limits,
    /// bound to a function with its own).
    pub fn set_limits(&self, resources: &LinuxResources) -> Result<(), Error> {
        use libcgroups::common::{
            create_cgroup_manager, CgroupConfig, CgroupManager, ControllerOpt,
        };
        let manager = create_cgroup_manager(CgroupConfig {
            cgroup_path: self.cgroup.clone(),
            systemd_cgroup: false,
            container_name: self.id.clone(),
        })
        .map_err(|source| Error::CgroupManager {
            id: self.id.clone(),
            source,
        })?;
        let opt = ControllerOpt {
            resources,
            disable_oom_killer: false,
            oom_score_adj: None,
            freezer_state: None,
        };
        manager.apply(&opt).map_err(|source| Error::Limits {
            id: self.id.clone(),
            source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{CgroupVersion, Cgroups};
    use std::fs;
    use SandboxState::*;

    fn sandbox(root: &Path) -> Sandbox {
        let dir = root.join("freezer/sprout/1/s");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join("freezer.state"), "THAWED").unwrap();
        let freezer = Freezer::open(
            &Cgroups::at(root, CgroupVersion::V1),
            Path::new("/sprout/1/s"),
        )
        .unwrap();
        Sandbox::new("sprout-1-1".into(), 10, "/sprout/1/s".into(), freezer)
    }

    #[test]
    fn a_stem_cell_freezes_thaws_binds_and_runs() {
        let t = tempfile::tempdir().unwrap();
        let mut s = sandbox(t.path());
        assert!(s.bind("f").is_err(), "cannot bind before the shim is up");
        s.ready().unwrap();
        s.freeze().unwrap();
        assert_eq!(s.state(), Frozen);
        s.thaw().unwrap();
        assert_eq!(
            s.state(),
            StemCell,
            "an unbound sandbox thaws into a stem cell"
        );
        s.bind("hello").unwrap();
        assert_eq!((s.state(), s.function()), (Bound, Some("hello")));
        s.start_invocation().unwrap();
        assert!(s.freeze().is_err(), "a running sandbox is not frozen");
        s.end_invocation().unwrap();
        s.freeze().unwrap();
        s.thaw().unwrap();
        assert_eq!(s.state(), Bound, "a bound sandbox thaws into bound");
        s.die();
        let err = s.start_invocation().unwrap_err().to_string();
        assert!(
            err.contains("sprout-1-1") && err.contains("Dead -> Running"),
            "{err}"
        );
    }

    #[test]
    fn illegal_moves_are_refused() {
        let t = tempfile::tempdir().unwrap();
        let mut s = sandbox(t.path());
        assert!(s.start_invocation().is_err());
        s.ready().unwrap();
        assert!(s.start_invocation().is_err(), "a stem cell runs nothing");
        assert!(s.ready().is_err());
    }
}
