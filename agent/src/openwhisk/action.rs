//! OpenWhisk actions as sprout functions ([`crate::Request::PutAction`]): an
//! action's body becomes a function directory (an archive registered like any
//! upload) and a configuration; what sprout's functions have no place for (kind,
//! entry point, default parameters, annotations, the logs limit) is kept in the
//! directory as [`META_FILE`] and read back with it, so it survives a restart
//! exactly as the function does.
//!
//! | kind | inline `code` | zip (`binary`) | handler |
//! |---|---|---|---|
//! | `python:3`, `python:default` | `main__.py` | must hold `__main__.py`, copied to `main__.py` | `main__:<main>` |
//! | `nodejs:20`, `nodejs:default` | `index.js`, plus an export of a global `main` | `package.json`'s `main` or `index.js`; dotted `main` `a.b.c` is `a:b.c` | `index:<main>` / `:<main>` / `a:b.c` |
//! | `blackbox` | refused | must hold an executable `exec` | `exec` (native) |
//!
//! A Node.js action's inline source is a CommonJS module; OpenWhisk evaluates it and
//! takes `main` as a global. The module sprout writes is the source followed by one
//! line that exports a function so declared (`if (typeof main === 'function')
//! module.exports.main = main`) unless the module exported one itself.
//!
//! Nothing here touches the registry or a sandbox: [`prepare`] is pure, and
//! [`invocation`] builds an [`Activate`] from an action's kept parameters.

use std::collections::BTreeMap;
use std::io::{Cursor, Read};
use std::path::Path;

use base64::Engine as _;
use ipc::api::FunctionConfig;
use ipc::openwhisk::action::{Action, Exec, Limits};
use ipc::openwhisk::KeyValue;
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::Activate;

/// The file in an action's directory that keeps what the function has no place for.
pub const META_FILE: &str = ".openwhisk-action.json";
/// The largest [`META_FILE`] read back.
pub const MAX_META: u64 = 8 << 20;

/// The kinds an action may have.
pub const KINDS: [&str; 5] = [
    "python:3",
    "python:default",
    "nodejs:20",
    "nodejs:default",
    "blackbox",
];

/// The most actions a listing answers (OpenWhisk's), and its default.
pub const MAX_LIST: u64 = 200;
pub const DEFAULT_LIST: u64 = 30;

/// OpenWhisk's logs limit, MB: default and most.
pub const DEFAULT_LOGS_MB: u64 = 10;

/// OpenWhisk's text for a Node.js zip without an entry.
pub const NODE_ZIP_NO_ENTRY: &str =
    "Zipped actions must contain either package.json or index.js at the root.";
/// OpenWhisk's text for a Python zip without `__main__.py`.
pub const PYTHON_ZIP_NO_MAIN: &str = "Zip file does not include __main__.py";
/// The text for a blackbox zip without `exec` (the actionloop's).
pub const BLACKBOX_ZIP_NO_EXEC: &str = "Zip file does not include an executable exec";
/// OpenWhisk's text for an invocation that overrides a `final` parameter.
pub const PARAMETERS_NOT_ALLOWED: &str =
    "Request defines parameters that are not allowed (e.g., reserved properties).";

/// Why an action was refused (all of them the request's fault: 400).
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("the action has no exec")]
    NoExec,
    #[error(
        "exec.image {image:?}: sprout runs no container images; give code of one of the kinds {}",
        KINDS.join(", ")
    )]
    Image { image: String },
    #[error(
        "The specified runtime '{kind}' is not supported by this platform. Valid values are: {}.",
        KINDS.iter().map(|k| format!("'{k}'")).collect::<Vec<_>>().join(", ")
    )]
    Kind { kind: String },
    #[error("exec.code is missing or empty")]
    NoCode,
    #[error(
        "a blackbox action's code must be a zip (base64, binary: true) holding an executable exec"
    )]
    BlackboxInline,
    #[error("exec.code is not base64 of a zip archive")]
    NotZip,
    #[error("exec.code: the zip cannot be read")]
    Zip(#[source] zip::result::ZipError),
    #[error("exec.code: zip entry {entry:?}: {why}")]
    Entry { entry: String, why: String },
    #[error("exec.code: the zip holds more than {max} entries")]
    TooManyEntries { max: usize },
    #[error("exec.code: the zip unpacks to more than {max} bytes")]
    TooLarge { max: u64 },
    #[error("{0}")]
    Missing(&'static str),
    #[error("exec.main {main:?} is not a valid entry point for kind {kind}")]
    Main { main: String, kind: String },
    #[error("limits.logs is {value} MB; it must be 0 to {DEFAULT_LOGS_MB}")]
    Logs { value: u64 },
    #[error("limits.concurrency is {value}; sprout runs one activation per instance (1)")]
    Concurrency { value: u64 },
    #[error("parameter {key:?} is given more than once")]
    DuplicateParameter { key: String },
    #[error("init parameter {key:?}: an environment variable's name is [A-Za-z_][A-Za-z0-9_]*, not a reserved one (__OW_*, SPROUT_*, AWS_LAMBDA_*, _HANDLER, LAMBDA_TASK_ROOT), and its value holds no NUL")]
    InitParameter { key: String },
    #[error("{PARAMETERS_NOT_ALLOWED}")]
    FinalParameter,
    #[error("build the function's archive")]
    Archive(#[source] std::io::Error),
}

/// What an action keeps beside its function (its [`META_FILE`]).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Default)]
pub struct ActionMeta {
    /// One of [`KINDS`], as given.
    pub kind: String,
    /// The entry point as given (`None`: `main`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<String>,
    pub binary: bool,
    /// Inline source (a zip's is not kept: it is the directory).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<String>,
    #[serde(default)]
    pub parameters: Vec<KeyValue>,
    #[serde(default)]
    pub annotations: Vec<KeyValue>,
    /// `limits.logs`, MB.
    pub logs: u64,
}

impl ActionMeta {
    /// The value of annotation `key`.
    pub fn annotation(&self, key: &str) -> Option<&Value> {
        self.annotations
            .iter()
            .find(|a| a.key == key)
            .map(|a| &a.value)
    }

    /// The action's `init: true` parameters, as its environment (strings).
    pub fn init_env(&self) -> BTreeMap<String, String> {
        self.parameters
            .iter()
            .filter(|p| p.init)
            .map(|p| (p.key.clone(), env_string(&p.value)))
            .collect()
    }
}

/// A parameter's value as an environment variable: a string as it is, `null` empty,
/// anything else its compact JSON (OpenWhisk's rule for `initArgs`).
pub fn env_string(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// An action ready to register: its directory as a tar archive, its configuration.
#[derive(Debug)]
pub struct Prepared {
    pub tar: Vec<u8>,
    pub config: FunctionConfig,
    pub meta: ActionMeta,
}

/// Checks `action` and makes its function: the archive of its directory (code, the
/// generated entry, [`META_FILE`]) and its configuration. `limits` bound a zip as an
/// upload's are.
pub fn prepare(action: &Action, limits: &crate::upload::Limits) -> Result<Prepared, Error> {
    let exec = action.exec.as_ref().ok_or(Error::NoExec)?;
    if let Some(image) = &exec.image {
        return Err(Error::Image {
            image: image.clone(),
        });
    }
    let family = match exec.kind.as_str() {
        "python:3" | "python:default" => Family::Python,
        "nodejs:20" | "nodejs:default" => Family::Nodejs,
        "blackbox" => Family::Blackbox,
        other => {
            return Err(Error::Kind {
                kind: other.to_owned(),
            })
        }
    };
    let code = exec.code.as_deref().unwrap_or("");
    if code.trim().is_empty() {
        return Err(Error::NoCode);
    }
    let zip = zip_bytes(exec, code)?;
    let main = exec.main.clone().filter(|m| !m.is_empty());
    let entry = main.as_deref().unwrap_or("main");
    let bad_main = || Error::Main {
        main: entry.to_owned(),
        kind: exec.kind.clone(),
    };
    let mut files: Vec<(String, Vec<u8>, u32)> = Vec::new();
    let (runtime, handler) = match (family, &zip) {
        (Family::Python, None) => {
            if !is_ident(entry) {
                return Err(bad_main());
            }
            files.push(("main__.py".into(), code.as_bytes().to_vec(), 0o644));
            ("python", format!("main__:{entry}"))
        }
        (Family::Python, Some(bytes)) => {
            if !is_ident(entry) {
                return Err(bad_main());
            }
            files = unzip(bytes, limits)?;
            let main_py = files
                .iter()
                .find(|(p, _, _)| p == "__main__.py")
                .map(|(_, b, _)| b.clone())
                .ok_or(Error::Missing(PYTHON_ZIP_NO_MAIN))?;
            files.retain(|(p, _, _)| p != "main__.py");
            files.push(("main__.py".into(), main_py, 0o644));
            ("python", format!("main__:{entry}"))
        }
        (Family::Nodejs, None) => {
            if !entry.split('.').all(is_ident) {
                return Err(bad_main());
            }
            let mut source = code.as_bytes().to_vec();
            if is_ident(entry) {
                source.extend_from_slice(
                    format!(
                        "\n;if (typeof {entry} === 'function' && typeof module.exports.{entry} !== 'function') {{ module.exports.{entry} = {entry}; }}\n"
                    )
                    .as_bytes(),
                );
            }
            files.push(("index.js".into(), source, 0o644));
            ("nodejs", format!("index:{entry}"))
        }
        (Family::Nodejs, Some(bytes)) => {
            if !entry.split('.').all(is_ident) {
                return Err(bad_main());
            }
            files = unzip(bytes, limits)?;
            let handler = match entry.split_once('.') {
                Some((module, function)) => format!("{module}:{function}"),
                None => {
                    let has = |name: &str| files.iter().any(|(p, _, _)| p == name);
                    if !has("package.json") && !has("index.js") {
                        return Err(Error::Missing(NODE_ZIP_NO_ENTRY));
                    }
                    format!(":{entry}")
                }
            };
            ("nodejs", handler)
        }
        (Family::Blackbox, None) => return Err(Error::BlackboxInline),
        (Family::Blackbox, Some(bytes)) => {
            files = unzip(bytes, limits)?;
            let exec = files
                .iter_mut()
                .find(|(p, _, _)| p == "exec")
                .ok_or(Error::Missing(BLACKBOX_ZIP_NO_EXEC))?;
            // A zip made elsewhere may not keep the mode: `exec` is run.
            exec.2 = 0o755;
            ("native", "exec".to_owned())
        }
    };
    let limits_in = action.limits.unwrap_or_default();
    let logs = limits_in.logs.unwrap_or(DEFAULT_LOGS_MB);
    if logs > DEFAULT_LOGS_MB {
        return Err(Error::Logs { value: logs });
    }
    if let Some(c) = limits_in.concurrency.filter(|&c| c != 1) {
        return Err(Error::Concurrency { value: c });
    }
    for (i, p) in action.parameters.iter().enumerate() {
        if action.parameters[..i].iter().any(|q| q.key == p.key) {
            return Err(Error::DuplicateParameter { key: p.key.clone() });
        }
        let env_name = is_ident(&p.key) || p.key.starts_with('_') && is_ident(&p.key[1..]);
        if p.init
            && (!env_name
                || crate::runtime::env_names::reserved_env(&p.key).is_some()
                || env_string(&p.value).contains('\0'))
        {
            return Err(Error::InitParameter { key: p.key.clone() });
        }
    }
    let meta = ActionMeta {
        kind: exec.kind.clone(),
        main,
        binary: zip.is_some(),
        code: zip.is_none().then(|| code.to_owned()),
        parameters: action.parameters.clone(),
        annotations: action.annotations.clone(),
        logs,
    };
    files.push((
        META_FILE.into(),
        serde_json::to_vec(&meta).expect("an ActionMeta serialises"),
        0o644,
    ));
    let config = FunctionConfig {
        runtime: Some(runtime.to_owned()),
        handler: Some(handler),
        memory_mb: limits_in.memory,
        timeout_ms: limits_in.timeout,
        ..FunctionConfig::default()
    };
    Ok(Prepared {
        tar: tar_of(&files).map_err(Error::Archive)?,
        config,
        meta,
    })
}

#[derive(Debug, Clone, Copy)]
enum Family {
    Python,
    Nodejs,
    Blackbox,
}

fn is_ident(s: &str) -> bool {
    !s.is_empty()
        && !s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// The zip `code` holds when it is one: `binary: true`, or (as OpenWhisk and its
/// clients, which send a zip's base64 without `binary`) base64 whose bytes are a zip.
fn zip_bytes(exec: &Exec, code: &str) -> Result<Option<Vec<u8>>, Error> {
    let decoded = base64::engine::general_purpose::STANDARD.decode(code.trim());
    match decoded {
        Ok(bytes) if bytes.starts_with(b"PK\x03\x04") => Ok(Some(bytes)),
        _ if exec.binary => Err(Error::NotZip),
        _ => Ok(None),
    }
}

/// The most entries any end-of-central-directory record in a zip declares, as the
/// zip crate reads them: the larger of its two 16-bit counts, and, where it points
/// to a zip64 record (a count of `0xFFFF` or a directory offset of `0xFFFFFFFF`,
/// with a locator before it), that record's 64-bit counts. Every record in the
/// buffer is looked at, as the crate falls back to earlier ones; a 16-bit count
/// costs at most 65535 records indexed, so only the one the crate reads first (the
/// last) is taken at its word, earlier ones (the bytes may be file data) only for
/// a zip64 record they lead to. `None`: no such record.
fn declared_entries(bytes: &[u8]) -> Option<u64> {
    const EOCD: &[u8] = b"PK\x05\x06";
    const EOCD_LEN: usize = 22;
    const LOCATOR: &[u8] = b"PK\x06\x07";
    const ZIP64_EOCD: &[u8] = b"PK\x06\x06";
    let u16_at = |at: usize| {
        bytes
            .get(at..at + 2)
            .map(|v| u64::from(u16::from_le_bytes([v[0], v[1]])))
    };
    let u32_at = |at: usize| {
        bytes
            .get(at..at + 4)
            .map(|v| u32::from_le_bytes(v.try_into().expect("4 bytes")))
    };
    let u64_at = |at: usize| {
        bytes
            .get(at..at + 8)
            .map(|v| u64::from_le_bytes(v.try_into().expect("8 bytes")))
    };
    let zip64_count = |eocd: usize| -> Option<u64> {
        let locator = eocd.checked_sub(20)?;
        if !bytes[locator..].starts_with(LOCATOR) {
            return None;
        }
        let record = usize::try_from(u64_at(locator + 8)?).ok()?;
        if !bytes.get(record..)?.starts_with(ZIP64_EOCD) {
            return None;
        }
        Some(u64_at(record + 24)?.max(u64_at(record + 32)?))
    };
    let last = bytes.len().checked_sub(EOCD_LEN)?;
    let mut most: Option<u64> = None;
    for at in memchr::memmem::rfind_iter(bytes, EOCD).filter(|&i| i <= last) {
        let (disk, total, offset) = (u16_at(at + 8)?, u16_at(at + 10)?, u32_at(at + 16)?);
        let mut count = if most.is_none() { disk.max(total) } else { 0 };
        if disk == 0xffff || total == 0xffff || offset == u32::MAX {
            count = count.max(zip64_count(at).unwrap_or(0));
        }
        most = Some(most.unwrap_or(0).max(count));
    }
    most
}

/// The files of a zip (path, bytes, mode), within `limits`' entries and size; paths
/// that leave the directory, absolute ones and links are refused.
fn unzip(
    bytes: &[u8],
    limits: &crate::upload::Limits,
) -> Result<Vec<(String, Vec<u8>, u32)>, Error> {
    // The zip crate indexes every central-directory record (about 500 bytes of
    // memory each, from 46 bytes of archive) before it says how many there are:
    // the count the archive declares is checked first.
    if declared_entries(bytes).is_some_and(|n| n > limits.entries as u64) {
        return Err(Error::TooManyEntries {
            max: limits.entries,
        });
    }
    let mut archive = zip::ZipArchive::new(Cursor::new(bytes)).map_err(Error::Zip)?;
    if archive.len() > limits.entries {
        return Err(Error::TooManyEntries {
            max: limits.entries,
        });
    }
    let mut files = Vec::new();
    let mut total = 0u64;
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(Error::Zip)?;
        let shown: String = entry.name().chars().take(200).collect();
        let bad = |why: &str| Error::Entry {
            entry: shown.clone(),
            why: why.to_owned(),
        };
        let Some(path) = entry.enclosed_name() else {
            return Err(bad("its path leaves the action's directory"));
        };
        if entry.is_dir() {
            continue;
        }
        if entry.is_symlink() {
            return Err(bad("links are not supported"));
        }
        let path = path
            .to_str()
            .ok_or_else(|| bad("its path is not UTF-8"))?
            .to_owned();
        if path.is_empty() || Path::new(&path).is_absolute() {
            return Err(bad("its path is empty or absolute"));
        }
        let room = limits.total_bytes.saturating_sub(total);
        let mut data = Vec::new();
        (&mut entry)
            .take(room + 1)
            .read_to_end(&mut data)
            .map_err(|e| bad(&format!("cannot be read: {e}")))?;
        total += data.len() as u64;
        if total > limits.total_bytes {
            return Err(Error::TooLarge {
                max: limits.total_bytes,
            });
        }
        let mode = match entry.unix_mode() {
            Some(m) if m & 0o111 != 0 => 0o755,
            _ => 0o644,
        };
        files.push((path, data, mode));
    }
    Ok(files)
}

/// A tar archive of `files`, their directories made first.
fn tar_of(files: &[(String, Vec<u8>, u32)]) -> std::io::Result<Vec<u8>> {
    let mut builder = tar::Builder::new(Vec::new());
    let mut dirs = std::collections::BTreeSet::new();
    for (path, _, _) in files {
        let mut at = Path::new(path).parent();
        while let Some(dir) = at.filter(|d| !d.as_os_str().is_empty()) {
            dirs.insert(dir.to_path_buf());
            at = dir.parent();
        }
    }
    for dir in dirs {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Directory);
        header.set_mode(0o755);
        header.set_size(0);
        builder.append_data(&mut header, &dir, std::io::empty())?;
    }
    for (path, data, mode) in files {
        let mut header = tar::Header::new_gnu();
        header.set_entry_type(tar::EntryType::Regular);
        header.set_mode(*mode);
        header.set_size(data.len() as u64);
        builder.append_data(&mut header, path, data.as_slice())?;
    }
    builder.into_inner()
}

/// Reads the [`ActionMeta`] kept in a function's directory, if there is one.
pub fn read_meta(dir: &Path) -> Result<Option<ActionMeta>, String> {
    let path = dir.join(META_FILE);
    let file = match std::fs::File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("{}: {e}", path.display())),
    };
    let mut text = Vec::new();
    file.take(MAX_META + 1)
        .read_to_end(&mut text)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    if text.len() as u64 > MAX_META {
        return Err(format!("{} is over {MAX_META} bytes", path.display()));
    }
    serde_json::from_slice(&text)
        .map(Some)
        .map_err(|e| format!("{}: {e}", path.display()))
}

/// The kind OpenWhisk shows for a function of `runtime` registered without an
/// action's kind (through sprout's own API).
pub fn kind_of_runtime(runtime: &str) -> &'static str {
    match runtime {
        "python" => "python:3",
        "nodejs" => "nodejs:20",
        _ => "blackbox",
    }
}

/// What `GET` answers for a function: its action, in OpenWhisk's shape (`name`:
/// OpenWhisk's name of the function).
pub fn to_action(
    namespace: &str,
    name: &str,
    info: &ipc::api::FunctionInfo,
    version: u64,
    meta: Option<&ActionMeta>,
) -> Action {
    let (exec, parameters, annotations, logs) = match meta {
        Some(m) => (
            Exec {
                kind: m.kind.clone(),
                code: m.code.clone(),
                binary: m.binary,
                main: m.main.clone(),
                image: None,
            },
            m.parameters.clone(),
            m.annotations.clone(),
            m.logs,
        ),
        None => (
            Exec {
                kind: kind_of_runtime(&info.runtime).to_owned(),
                code: None,
                binary: true,
                main: info
                    .handler
                    .split_once(':')
                    .map(|(_, f)| f.to_owned())
                    .filter(|f| !f.is_empty()),
                image: None,
            },
            Vec::new(),
            Vec::new(),
            DEFAULT_LOGS_MB,
        ),
    };
    let mut annotations = annotations;
    if !annotations.iter().any(|a| a.key == "exec") {
        annotations.push(KeyValue {
            key: "exec".into(),
            value: Value::String(exec.kind.clone()),
            init: false,
        });
    }
    Action {
        namespace: Some(namespace.to_owned()),
        name: Some(name.to_owned()),
        exec: Some(exec),
        limits: Some(Limits {
            timeout: Some(info.timeout_ms),
            memory: Some(info.memory_mb),
            logs: Some(logs),
            concurrency: Some(1),
        }),
        parameters,
        annotations,
        version: Some(super::semver(version)),
        publish: false,
    }
}

/// What a caller of OpenWhisk's API gives an invocation, beside the action.
#[derive(Debug, Clone)]
pub struct Invocation {
    /// The body: a JSON object of parameters (empty: `{}`), or an array.
    pub params: Value,
    /// The caller's key (`uuid:secret`), when it sent one.
    pub api_key: Option<String>,
    /// The caller's namespace (the record's `subject`).
    pub subject: String,
    pub blocking: bool,
    pub wait_at_most: Option<std::time::Duration>,
    pub activation_id: Option<ipc::api::ActivationId>,
}

/// The [`Activate`] for invoking the function `namespace/name` (sprout's names) whose
/// action is `meta` (`None`: registered through sprout's API, no defaults): its
/// default parameters merged under the invocation's (an `init` one goes to the
/// environment instead), a `final` action's parameters not overridable, the key
/// passed unless the `provide-api-key` annotation is `false`.
pub fn invocation(
    namespace: &str,
    name: &str,
    meta: Option<&ActionMeta>,
    call: Invocation,
) -> Result<Activate, Error> {
    let mut init_env = BTreeMap::new();
    let params = match call.params {
        Value::Object(given) => {
            let mut merged = Map::new();
            if let Some(meta) = meta {
                let is_final = meta.annotation("final") == Some(&Value::Bool(true));
                for p in &meta.parameters {
                    if is_final && given.contains_key(&p.key) {
                        return Err(Error::FinalParameter);
                    }
                    if p.init {
                        continue;
                    }
                    merged.insert(p.key.clone(), p.value.clone());
                }
                init_env = meta.init_env();
            }
            for (k, v) in given {
                match init_env.get_mut(&k) {
                    // An init parameter given at invocation: its value, in the
                    // environment, as OpenWhisk's `initArgs` does it.
                    Some(value) => *value = env_string(&v),
                    None => {
                        merged.insert(k, v);
                    }
                }
            }
            Value::Object(merged)
        }
        other => other,
    };
    let provide_key =
        meta.and_then(|m| m.annotation("provide-api-key")) != Some(&Value::Bool(false));
    Ok(Activate {
        namespace: namespace.to_owned(),
        name: name.to_owned(),
        params,
        init_env,
        activation_id: call.activation_id,
        transaction_id: None,
        api_key: call.api_key.filter(|_| provide_key),
        subject: call.subject,
        cause: None,
        blocking: call.blocking,
        wait_at_most: call.wait_at_most,
    })
}

#[cfg(test)]
#[path = "action_tests.rs"]
mod tests;
