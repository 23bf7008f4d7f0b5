//! One sandbox and its state machine.

use std::path::PathBuf;

use crate::Error;

/// Where a sandbox is in its life. Every change goes through [`Sandbox::transition`],
/// which rejects illegal moves and traces legal ones.
///
/// ```text
/// Creating ──▶ Idle ◀──▶ Running
///    │          │           │
///    └──────────┴───────────┴──▶ Dead
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SandboxState {
    /// The spawner is creating it and its shim is starting its zygote.
    Creating,
    /// Its shim is up; it may hold warm function instances; nothing runs.
    Idle,
    /// An invocation is in flight.
    Running,
    /// Destroyed (or being destroyed); terminal.
    Dead,
}

impl SandboxState {
    fn can_become(self, to: SandboxState) -> bool {
        use SandboxState::*;
        matches!(
            (self, to),
            (Creating, Idle)
                | (Idle, Running)
                | (Running, Idle)
                | (Creating | Idle | Running, Dead)
        )
    }
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
}

impl Sandbox {
    pub(crate) fn new(id: String, pid: i32, cgroup: PathBuf) -> Sandbox {
        Sandbox {
            id,
            pid,
            cgroup,
            state: SandboxState::Creating,
        }
    }

    pub fn id(&self) -> &str {
        &self.id
    }

    pub fn pid(&self) -> i32 {
        self.pid
    }

    pub fn cgroup(&self) -> &std::path::Path {
        &self.cgroup
    }

    pub fn state(&self) -> SandboxState {
        self.state
    }

    pub fn transition(&mut self, to: SandboxState) -> Result<(), Error> {
        if !self.state.can_become(to) {
            return Err(Error::Transition {
                id: self.id.clone(),
                from: self.state,
                to,
            });
        }
        tracing::trace!(sandbox_id = %self.id, from = ?self.state, to = ?to, "sandbox transition");
        self.state = to;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use SandboxState::*;

    #[test]
    fn legal_and_illegal_transitions() {
        let mut s = Sandbox::new("sprout-1-1".into(), 10, "/sprout/1/sprout-1-1".into());
        assert_eq!(s.state(), Creating);
        assert!(s.transition(Running).is_err(), "cannot run before it is up");
        s.transition(Idle).unwrap();
        s.transition(Running).unwrap();
        s.transition(Idle).unwrap();
        s.transition(Dead).unwrap();
        let err = s.transition(Idle).unwrap_err().to_string();
        assert!(
            err.contains("sprout-1-1") && err.contains("Dead -> Idle"),
            "{err}"
        );
    }
}
