//! Builds a sprout sandbox's filesystem view and its OCI bundle.
//!
//! A sandbox's root is a small shared skeleton ([`Skeleton`]): empty mount points,
//! `bin -> usr/bin`-style links and a minimal `/etc`. Everything else comes in as
//! mounts made by the runtime inside the sandbox's own mount namespace, so the host's
//! mount table never changes:
//!
//! | inside     | what                                   | mode            |
//! |------------|----------------------------------------|-----------------|
//! | `/usr`     | the host's `/usr`                      | bind, read-only |
//! | `/.sprout` | the agent's runtime directory (shim, Python runtime) | bind, read-only |
//! | `/code`    | the function's directory               | bind, read-only |
//! | `/tmp`     | a tmpfs (charged to the sandbox's memory cgroup) | read-write |
//! | `/workflow` | the workflow scratch: the sandbox's own tmpfs, or a workflow's attached over it (`SPROUT_WORKFLOW_DIR`) | read-write |
//! | `/fns/<name>-<version>` | code of functions called in this sandbox, attached while it runs | bind, read-only |
//! | `/proc`, `/dev`, `/sys` | the usual, `/sys` read-only, no `/sys/fs/cgroup` | |
//!
//! [`bundle_spec`] turns a [`SandboxConfig`] into an `oci_spec::runtime::Spec`.
//! Every process of a sandbox runs as an unprivileged host user of its own
//! ([`SandboxUser`], handed out by [`SandboxUsers`] from a [`SandboxUids`] range), so
//! the skeleton, the runtime directory and a function's code must be readable by
//! "other" ([`check_readable`]); `/tmp` and `/workflow` are writable by everyone
//! (sticky), `/fns` stays root's.

mod access;
mod seccomp;
mod skeleton;
mod spec;

pub use access::{check_module_readable, check_readable, readable_by_others, Unreadable};
pub use seccomp::{default_filter, zygote_filter};
pub use skeleton::Skeleton;
pub use spec::{
    bundle_spec, bundle_spec_as, resources, write_bundle, Limits, SandboxConfig, SandboxUids,
    SandboxUser, SandboxUsers, SANDBOX_UMASK,
};
pub use spec::{install_spec, zygote_spec, InstallSpec};

pub use ipc::sandbox_paths::{
    CODE_DIR, DEPS_DIR, FUNCTIONS_DIR, RUNTIME_DIR, SHIM_PATH, WORKFLOW_DIR,
};

/// Size limit of a sandbox's own workflow scratch tmpfs, in MiB (as `/tmp`'s).
pub const WORKFLOW_DIR_MB: u64 = 64;
/// The largest file a sandbox may write (`RLIMIT_FSIZE`, bytes): the largest shared
/// payload (a memfd is a file) and the size of a declarative run's scratch.
pub const MAX_FILE_SIZE: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("create {path}")]
    Create {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} path {path} must be absolute")]
    RelativePath {
        what: &'static str,
        path: std::path::PathBuf,
    },
    #[error("{field} {value} is not accepted: the sandbox's user and group must not be root (accepted: 1 to 4294967294)")]
    SandboxUser { field: &'static str, value: u32 },
    #[error("a sandbox uid range of {count} ids from {base} is not accepted: it must not be empty, hold more than 1048576 ids, include 0 (root) or go past 4294967294 (accepted: base 1 to 4294967294, count 1 to 1048576, base + count - 1 at most 4294967294)")]
    SandboxUids { base: u32, count: u32 },
    #[error("all {count} sandbox uids (from {base}) are in use: at most {count} sandboxes at once (--sandbox-uids)")]
    NoSandboxUid { count: u32, base: u32 },
    #[error("the fork server's user (uid {uid}, gid {gid}) is not in the sandbox uid range {base} to {} (its user namespace maps the rest of that range)", u64::from(*base) + u64::from(*count) - 1)]
    ZygoteUser {
        uid: u32,
        gid: u32,
        base: u32,
        count: u32,
    },
    #[error("an install sandbox needs a program to run")]
    NoInstaller,
    #[error("sandbox spec is not valid OCI")]
    Spec(#[source] serde_json::Error),
    #[error("write bundle {path}")]
    Save {
        path: std::path::PathBuf,
        #[source]
        source: oci_spec::OciSpecError,
    },
}
