//! Registered functions: validation of names, code directories, handlers and limits.

use std::path::{Path, PathBuf};

use ipc::api::{FunctionConfig, FunctionInfo};
use ipc::proto::Handler;

use crate::config::Defaults;
use crate::error::Error;

/// The handler OpenLambda uses: `f.py` with `def f(event)`.
pub const DEFAULT_HANDLER: &str = "f:f";

/// A registered function.
#[derive(Debug, Clone)]
pub struct Function {
    pub name: String,
    /// Host directory holding its code.
    pub dir: PathBuf,
    pub handler: Handler,
    pub memory_mb: u64,
    pub timeout_ms: u64,
    pub pids: u64,
    pub cpus: f64,
    pub max_instances: usize,
    /// Bumped on every registration; warm instances of an older version are retired.
    pub version: u64,
    /// Whether `dir` was unpacked by the agent (and is removed with the function).
    pub owns_dir: bool,
}

impl Function {
    /// Validates everything about a function before it is registered.
    pub fn new(
        name: &str,
        dir: &Path,
        config: &FunctionConfig,
        defaults: &Defaults,
        version: u64,
        owns_dir: bool,
    ) -> Result<Function, Error> {
        validate_name(name)?;
        let dir = dir.canonicalize().map_err(|source| Error::FunctionDir {
            path: dir.to_path_buf(),
            source,
        })?;
        if !dir.is_dir() {
            return Err(Error::FunctionDir {
                path: dir,
                source: std::io::Error::new(std::io::ErrorKind::NotADirectory, "not a directory"),
            });
        }
        let handler_text = config.handler.as_deref().unwrap_or(DEFAULT_HANDLER);
        let handler = Handler::parse(handler_text).map_err(Error::InvalidConfig)?;
        let file = handler.module_file();
        let package_init = format!("{}/__init__.py", handler.module.replace('.', "/"));
        if !dir.join(&file).is_file() && !dir.join(&package_init).is_file() {
            return Err(Error::HandlerFileMissing {
                handler: handler.to_string(),
                file,
                dir,
            });
        }
        let memory_mb = ranged(
            "memory_mb",
            config.memory_mb.unwrap_or(defaults.memory_mb),
            16,
            1 << 20,
        )?;
        let timeout_ms = ranged(
            "timeout_ms",
            config.timeout_ms.unwrap_or(defaults.timeout_ms),
            1,
            3_600_000,
        )?;
        let pids = ranged("pids", config.pids.unwrap_or(defaults.pids), 8, 1 << 22)?;
        let max_instances = ranged(
            "max_instances",
            config.max_instances.unwrap_or(defaults.max_instances) as u64,
            1,
            1024,
        )? as usize;
        let cpus = config.cpus.unwrap_or(defaults.cpus);
        if !(cpus > 0.0 && cpus <= 1024.0) {
            return Err(Error::InvalidConfig(format!(
                "cpus must be in (0, 1024], got {cpus}"
            )));
        }
        Ok(Function {
            name: name.to_owned(),
            dir,
            handler,
            memory_mb,
            timeout_ms,
            pids,
            cpus,
            max_instances,
            version,
            owns_dir,
        })
    }

    /// Whether an instance of `other` may run in this function's sandbox (a workflow's
    /// sequential step, a call): same runtime and the same limits.
    pub fn same_limits(&self, other: &Function) -> bool {
        (self.memory_mb, self.pids, self.cpus) == (other.memory_mb, other.pids, other.cpus)
    }

    /// Whether its limits differ from `defaults` (a stem cell bound to it needs new ones).
    pub fn has_own_limits(&self, defaults: &Defaults) -> bool {
        (self.memory_mb, self.pids, self.cpus) != (defaults.memory_mb, defaults.pids, defaults.cpus)
    }

    pub fn limits(&self) -> rootfs::Limits {
        rootfs::Limits {
            memory_bytes: self.memory_mb << 20,
            pids: self.pids,
            cpus: self.cpus,
        }
    }

    pub fn info(&self, warm_instances: usize) -> FunctionInfo {
        FunctionInfo {
            name: self.name.clone(),
            path: self.dir.display().to_string(),
            handler: self.handler.to_string(),
            memory_mb: self.memory_mb,
            timeout_ms: self.timeout_ms,
            pids: self.pids,
            cpus: self.cpus,
            max_instances: self.max_instances,
            warm_instances,
        }
    }
}

fn ranged(field: &str, v: u64, min: u64, max: u64) -> Result<u64, Error> {
    if (min..=max).contains(&v) {
        Ok(v)
    } else {
        Err(Error::InvalidConfig(format!(
            "{field} must be between {min} and {max}, got {v}"
        )))
    }
}

/// Names are path- and cgroup-safe: 1-64 of `[A-Za-z0-9_.-]`, not starting with `.` or `-`.
pub fn validate_name(name: &str) -> Result<(), Error> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with(['.', '-'])
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: name.to_owned(),
        })
    }
}

/// A function name derived from a directory (for `sprout invoke ./dir`).
pub fn name_from_dir(dir: &Path) -> String {
    let base = dir
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
        .unwrap_or_default();
    let cleaned: String = base
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(64)
        .collect();
    if validate_name(&cleaned).is_ok() {
        cleaned
    } else {
        "function".to_owned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fs;

    fn dir_with(files: &[&str]) -> tempfile::TempDir {
        let t = tempfile::tempdir().unwrap();
        for f in files {
            let p = t.path().join(f);
            fs::create_dir_all(p.parent().unwrap()).unwrap();
            fs::write(p, "def f(e): return e\n").unwrap();
        }
        t
    }

    #[test]
    fn defaults_fill_in_and_handler_file_is_checked() {
        let t = dir_with(&["f.py"]);
        let f = Function::new(
            "hello",
            t.path(),
            &FunctionConfig::default(),
            &Defaults::default(),
            1,
            false,
        )
        .unwrap();
        assert_eq!(
            (f.memory_mb, f.timeout_ms, f.pids, f.cpus),
            (128, 60_000, 64, 1.0)
        );
        assert_eq!(f.handler.to_string(), "f:f");

        let cfg = FunctionConfig {
            handler: Some("__main__:main".into()),
            ..Default::default()
        };
        let err = Function::new("hello", t.path(), &cfg, &Defaults::default(), 1, false)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("__main__.py") && err.contains("does not exist"),
            "{err}"
        );

        let t = dir_with(&["pkg/__init__.py"]);
        let cfg = FunctionConfig {
            handler: Some("pkg:run".into()),
            ..Default::default()
        };
        Function::new("p", t.path(), &cfg, &Defaults::default(), 1, false).unwrap();
    }

    #[test]
    fn bad_input_is_named() {
        let t = dir_with(&["f.py"]);
        let d = Defaults::default();
        let err = |name: &str, dir: &Path, cfg: FunctionConfig| {
            Function::new(name, dir, &cfg, &d, 1, false)
                .unwrap_err()
                .to_string()
        };
        assert!(err("../x", t.path(), FunctionConfig::default()).contains("invalid function name"));
        assert!(err(
            "ok",
            Path::new("/nonexistent/sprout"),
            FunctionConfig::default()
        )
        .contains("/nonexistent/sprout"));
        let cfg = FunctionConfig {
            memory_mb: Some(1),
            ..Default::default()
        };
        assert!(err("ok", t.path(), cfg).contains("memory_mb must be between"));
        let cfg = FunctionConfig {
            cpus: Some(0.0),
            ..Default::default()
        };
        assert!(err("ok", t.path(), cfg).contains("cpus"));
        let cfg = FunctionConfig {
            handler: Some("nocolon".into()),
            ..Default::default()
        };
        assert!(err("ok", t.path(), cfg).contains("module:function"));
    }

    #[test]
    fn names_from_directories_are_valid() {
        let t = tempfile::tempdir().unwrap();
        let d = t.path().join("my fn!");
        fs::create_dir(&d).unwrap();
        assert_eq!(name_from_dir(&d), "my_fn_");
        assert!(validate_name(&name_from_dir(Path::new("/"))).is_ok());
    }
}
