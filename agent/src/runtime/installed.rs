//! What the host has installed of each interpreted runtime, and whether a
//! registration's version asks for it.
//!
//! A runtime is named `python`, `nodejs` or `native`, optionally with a version
//! (`python:3.11`, `nodejs:20`); `default` (and `latest`, which Zeep's `activity.json`
//! says) is whatever is installed. A numeric version matches the installed one when
//! its components are the installed version's first components (`3` and `3.11` match
//! Python 3.11.2; `3.1` does not). The installed version is read once per process
//! (`/usr/bin/python3 --version`, `/usr/bin/node --version`) and cached.

use std::path::Path;
use std::sync::OnceLock;

use ipc::proto::Runtime;

use crate::error::Error;

/// Versions that mean "whatever is installed".
const ANY_VERSION: [&str; 2] = ["default", "latest"];

/// The longest version accepted in a runtime name.
const MAX_VERSION_LEN: usize = 32;

/// The longest `--version` answer read from an interpreter.
const MAX_VERSION_OUTPUT: usize = 256;

/// What a registration names: a runtime and the version it asks for (`None`: any).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requested {
    pub runtime: Runtime,
    pub version: Option<String>,
}

/// Parses `name[:version]`; the version is checked by [`check`].
pub fn parse(text: &str) -> Result<Requested, Error> {
    let (name, version) = match text.split_once(':') {
        Some((name, version)) => (name, Some(version)),
        None => (text, None),
    };
    let runtime = Runtime::ALL
        .into_iter()
        .find(|r| r.name() == name)
        .ok_or_else(|| {
            Error::InvalidConfig(format!(
                "unknown runtime {text:?}: use python, nodejs or native, optionally with a version (python:3.11, nodejs:20, nodejs:default)"
            ))
        })?;
    let version = match version {
        None => None,
        Some(v) if ANY_VERSION.contains(&v) => None,
        Some(v) if is_numeric_version(v) => Some(v.to_owned()),
        Some(v) => {
            return Err(Error::InvalidConfig(format!(
                "runtime {text:?}: {v:?} is not a version: use numbers separated by dots (3.11, 20), default or latest"
            )))
        }
    };
    if runtime == Runtime::Native && version.is_some() {
        return Err(Error::InvalidConfig(format!(
            "runtime {text:?}: native functions bring their own executable and have no version"
        )));
    }
    Ok(Requested { runtime, version })
}

fn is_numeric_version(v: &str) -> bool {
    v.len() <= MAX_VERSION_LEN
        && v.split('.')
            .all(|part| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit()))
}

/// Whether `wanted` (components such as `3.11`) is the start of `installed`
/// (`3.11.2`).
pub fn version_matches(wanted: &str, installed: &str) -> bool {
    let mut have = installed.split('.');
    wanted.split('.').all(|w| have.next() == Some(w))
}

/// Checks that what `requested` names is installed (its interpreter, at its
/// version); `text` is how it was written, for the error.
pub fn check(requested: &Requested, text: &str) -> Result<(), Error> {
    let runtime = requested.runtime;
    let Some(interpreter) = shim::runtime::interpreter(runtime) else {
        return Ok(());
    };
    let not_installed =
        |what: String| Error::InvalidConfig(format!("runtime {text:?} is not installed: {what}"));
    if !Path::new(interpreter).is_file() {
        return Err(not_installed(format!("{interpreter} does not exist")));
    }
    let Some(wanted) = &requested.version else {
        return Ok(());
    };
    let installed = version_of(runtime, interpreter).map_err(not_installed)?;
    if version_matches(wanted, installed) {
        Ok(())
    } else {
        Err(not_installed(format!(
            "{interpreter} is {} {installed}",
            display_name(runtime)
        )))
    }
}

/// How people write the runtime's name.
pub fn display_name(runtime: Runtime) -> &'static str {
    match runtime {
        Runtime::Python => "Python",
        Runtime::Nodejs => "Node.js",
        Runtime::Native => "native",
    }
}

/// The installed version of `runtime`'s interpreter, asked once per process.
fn version_of(runtime: Runtime, interpreter: &str) -> Result<&'static str, String> {
    static PYTHON: OnceLock<Result<String, String>> = OnceLock::new();
    static NODEJS: OnceLock<Result<String, String>> = OnceLock::new();
    let cell = match runtime {
        Runtime::Python => &PYTHON,
        Runtime::Nodejs => &NODEJS,
        Runtime::Native => return Err("native has no interpreter".to_owned()),
    };
    cell.get_or_init(|| probe(interpreter))
        .as_deref()
        .map_err(Clone::clone)
}

/// Runs `interpreter --version` and reads the version from its answer.
fn probe(interpreter: &str) -> Result<String, String> {
    let out = std::process::Command::new(interpreter)
        .arg("--version")
        .stdin(std::process::Stdio::null())
        .output()
        .map_err(|e| format!("{interpreter} --version could not run: {e}"))?;
    let mut text = out.stdout;
    text.extend_from_slice(&out.stderr);
    text.truncate(MAX_VERSION_OUTPUT);
    let text = String::from_utf8_lossy(&text);
    parse_version_output(&text)
        .ok_or_else(|| format!("{interpreter} --version answered {:?}", text.trim()))
}

/// The version in an interpreter's `--version` answer: `Python 3.11.2` → `3.11.2`,
/// `v20.20.2` → `20.20.2`.
pub fn parse_version_output(text: &str) -> Option<String> {
    text.split_whitespace()
        .map(|word| word.trim_start_matches('v'))
        .find(|word| word.starts_with(|c: char| c.is_ascii_digit()))
        .map(|word| {
            word.chars()
                .take_while(|c| c.is_ascii_digit() || *c == '.')
                .collect::<String>()
                .trim_end_matches('.')
                .to_owned()
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_versions_are_parsed() {
        let req = |runtime, version: Option<&str>| Requested {
            runtime,
            version: version.map(str::to_owned),
        };
        for (text, want) in [
            ("python", req(Runtime::Python, None)),
            ("python:3.11", req(Runtime::Python, Some("3.11"))),
            ("python:3", req(Runtime::Python, Some("3"))),
            ("python:default", req(Runtime::Python, None)),
            ("nodejs:20", req(Runtime::Nodejs, Some("20"))),
            ("nodejs:default", req(Runtime::Nodejs, None)),
            ("nodejs:latest", req(Runtime::Nodejs, None)),
            ("native", req(Runtime::Native, None)),
            ("native:default", req(Runtime::Native, None)),
        ] {
            assert_eq!(parse(text).unwrap(), want, "{text}");
        }
        for (text, says) in [
            ("ruby", "unknown runtime \"ruby\""),
            ("Python", "unknown runtime"),
            ("", "unknown runtime"),
            ("python:", "is not a version"),
            ("python:3.x", "is not a version"),
            ("nodejs:20.", "is not a version"),
            ("nodejs:v20", "is not a version"),
            ("python:3:11", "is not a version"),
            ("native:1", "no version"),
        ] {
            let e = parse(text).unwrap_err().to_string();
            assert!(e.contains(says), "{text}: {e}");
        }
        let long = format!("python:{}", "1.".repeat(40) + "1");
        assert!(parse(&long).is_err());
    }

    #[test]
    fn a_version_matches_by_its_leading_components() {
        assert!(version_matches("3", "3.11.2"));
        assert!(version_matches("3.11", "3.11.2"));
        assert!(version_matches("3.11.2", "3.11.2"));
        assert!(!version_matches("3.1", "3.11.2"));
        assert!(!version_matches("3.11.2.1", "3.11.2"));
        assert!(!version_matches("20", "18.19.0"));
    }

    #[test]
    fn interpreter_answers_are_read() {
        let v = |t| parse_version_output(t);
        assert_eq!(v("Python 3.11.2\n").as_deref(), Some("3.11.2"));
        assert_eq!(v("v20.20.2\n").as_deref(), Some("20.20.2"));
        assert_eq!(v("Python 3.13.0rc1").as_deref(), Some("3.13.0"));
        assert_eq!(v("nothing here"), None);
    }

    #[test]
    fn the_installed_python_is_checked_against_the_version_asked() {
        // The machines sprout runs on have Python 3.
        let installed = version_of(Runtime::Python, "/usr/bin/python3").unwrap();
        let major = installed.split('.').next().unwrap();
        check(&parse("python").unwrap(), "python").unwrap();
        check(&parse(&format!("python:{major}")).unwrap(), "python:x").unwrap();
        check(&parse(&format!("python:{installed}")).unwrap(), "python:x").unwrap();
        let e = check(&parse("python:2.7").unwrap(), "python:2.7")
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            format!(
                "runtime \"python:2.7\" is not installed: /usr/bin/python3 is Python {installed}"
            )
        );
        check(&parse("native").unwrap(), "native").unwrap();
    }
}
