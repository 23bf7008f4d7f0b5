//! OpenLambda's `ol.yaml` in a function directory: the `environment` exported to
//! the function's processes and the HTTP methods `triggers.http` accepts on
//! `/run/{name}`. Other keys (`triggers.cron`, `triggers.kafka`, `reuse-sandbox`,
//! anything unknown) are ignored, as OpenLambda ignores what it does not know.
//!
//! The file is read bounded ([`MAX_OL_YAML`]) and checked whole at registration: a
//! file that is not YAML, or a key of the wrong type, is refused naming the file,
//! the line and the key; so is an environment over its bounds ([`check_env`]).
//!
//! YAML aliases (`*name`) repeat the node they name (`&name`), so a small file can
//! stand for a large one (one 32 KiB anchored value referenced 3,600 times in 64 KiB
//! is 115 MiB): the text the parse keeps (names, values, methods) is counted as it is
//! made, and a file whose text comes to more than [`MAX_OL_YAML_TEXT`] is refused
//! before more is made. Ignored keys cost nothing: their aliases are not followed.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::fmt;
use std::path::Path;

use serde::de::{self, Deserializer, Visitor};
use serde::Deserialize;

use crate::error::Error;

/// The file's name.
pub const OL_YAML: &str = "ol.yaml";

/// The largest `ol.yaml` read.
pub const MAX_OL_YAML: u64 = 64 << 10;

/// Most bytes of text (variable names and values, methods) an `ol.yaml`'s parse may
/// make: four times the file, which only aliases repeating a value go past.
pub const MAX_OL_YAML_TEXT: usize = 4 * MAX_OL_YAML as usize;

thread_local! {
    /// Bytes of text the `ol.yaml` being parsed on this thread may still make
    /// ([`parse`] sets it; [`take_text`] counts it down).
    static TEXT_LEFT: Cell<usize> = const { Cell::new(0) };
}

/// Counts `len` bytes of text against the parse's [`MAX_OL_YAML_TEXT`].
fn take_text<E: de::Error>(len: usize) -> Result<(), E> {
    TEXT_LEFT.with(|left| match left.get().checked_sub(len) {
        Some(rest) => {
            left.set(rest);
            Ok(())
        }
        None => Err(E::custom(format!(
            "the file's names and values come to more than {MAX_OL_YAML_TEXT} bytes \
             (YAML aliases, *name, repeat what they name)"
        ))),
    })
}

/// Most variables an `environment` may hold.
pub const MAX_ENV_VARS: usize = 256;
/// Longest variable name, in bytes.
pub const MAX_ENV_NAME: usize = 256;
/// Longest value, in bytes.
pub const MAX_ENV_VALUE: usize = 32 << 10;

use super::env_names::reserved_env;

/// Variables of the environment that choose a Python function's entry (compat C.2).
pub const OL_ENTRY_FILE: &str = "OL_ENTRY_FILE";

/// What a function's `ol.yaml` says.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OlConfig {
    /// Exported to the function's processes before its handler is loaded.
    pub environment: BTreeMap<String, String>,
    /// The methods `/run/{name}` accepts; `None`: every method (no `triggers.http`,
    /// or a `*` in it).
    pub http_methods: Option<Vec<String>>,
}

#[derive(Deserialize, Default)]
struct File {
    #[serde(default)]
    environment: Option<BTreeMap<Text, Scalar>>,
    #[serde(default)]
    triggers: Option<Triggers>,
}

#[derive(Deserialize, Default)]
struct Triggers {
    #[serde(default)]
    http: Option<Vec<HttpTrigger>>,
}

#[derive(Deserialize)]
struct HttpTrigger {
    method: Text,
}

/// A YAML string, counted against [`MAX_OL_YAML_TEXT`].
#[derive(PartialEq, Eq, PartialOrd, Ord)]
struct Text(String);

impl<'de> Deserialize<'de> for Text {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Text, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Text;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Text, E> {
                take_text(v.len())?;
                Ok(Text(v.to_owned()))
            }
        }
        d.deserialize_str(V)
    }
}

/// A YAML scalar as its text: `DEBUG: true` and `PORT: 8080` are the strings
/// `"true"` and `"8080"`, as OpenLambda's Go decoder makes them. Counted against
/// [`MAX_OL_YAML_TEXT`].
struct Scalar(String);

impl Scalar {
    fn counted<E: de::Error>(text: String) -> Result<Scalar, E> {
        take_text(text.len())?;
        Ok(Scalar(text))
    }
}

impl<'de> Deserialize<'de> for Scalar {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Scalar, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Scalar;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a string, number or boolean")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Scalar, E> {
                // Counted before it is copied.
                take_text(v.len())?;
                Ok(Scalar(v.to_owned()))
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<Scalar, E> {
                Scalar::counted(v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Scalar, E> {
                Scalar::counted(v.to_string())
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Scalar, E> {
                Scalar::counted(v.to_string())
            }
            fn visit_f64<E: de::Error>(self, v: f64) -> Result<Scalar, E> {
                Scalar::counted(v.to_string())
            }
        }
        d.deserialize_any(V)
    }
}

/// The `ol.yaml` of the canonical function directory `dir` (the default, empty, if
/// it has none), checked.
pub fn read(dir: &Path) -> Result<OlConfig, Error> {
    match super::files::read_small(dir, OL_YAML, MAX_OL_YAML)? {
        None => Ok(OlConfig::default()),
        Some(text) => parse(&text)
            .map_err(|why| Error::InvalidConfig(format!("{OL_YAML} in {}: {why}", dir.display()))),
    }
}

/// Parses and checks the text of an `ol.yaml`; the error says what is wrong and where.
pub fn parse(text: &str) -> Result<OlConfig, String> {
    // An empty file (or one of comments) is an empty configuration.
    TEXT_LEFT.with(|left| left.set(MAX_OL_YAML_TEXT));
    let file = serde_norway::from_str::<Option<File>>(text);
    TEXT_LEFT.with(|left| left.set(0));
    let file: File = match file {
        Ok(file) => file.unwrap_or_default(),
        Err(e) => return Err(yaml_error(&e)),
    };
    let environment: BTreeMap<String, String> = file
        .environment
        .unwrap_or_default()
        .into_iter()
        .map(|(Text(k), Scalar(v))| (k, v))
        .collect();
    check_env(&environment)?;
    let http_methods = match file.triggers.and_then(|t| t.http) {
        None => None,
        Some(triggers) => {
            let mut methods: Vec<String> = Vec::with_capacity(triggers.len());
            let mut all = false;
            for (i, t) in triggers.iter().enumerate() {
                let m = t.method.0.trim();
                if m == "*" {
                    all = true;
                    continue;
                }
                if m.is_empty() || m.len() > 32 || !m.bytes().all(|b| b.is_ascii_alphabetic()) {
                    return Err(format!(
                        "triggers.http[{i}].method {:?} is not an HTTP method (letters, or \"*\" for every method)",
                        t.method.0
                    ));
                }
                let m = m.to_ascii_uppercase();
                if !methods.contains(&m) {
                    methods.push(m);
                }
            }
            (!all).then_some(methods)
        }
    };
    Ok(OlConfig {
        environment,
        http_methods,
    })
}

/// serde_norway's message with its position first: `line 3, column 5: ...`.
fn yaml_error(e: &serde_norway::Error) -> String {
    let message = e.to_string();
    match e.location() {
        // The message ends with " at line L column C" already; say it first, once.
        Some(at) => {
            let suffix = format!(" at line {} column {}", at.line(), at.column());
            let message = message.strip_suffix(&suffix).unwrap_or(&message);
            format!("line {}, column {}: {message}", at.line(), at.column())
        }
        None => format!("not valid YAML: {message}"),
    }
}

/// Checks an environment's bounds: at most [`MAX_ENV_VARS`] variables, names of
/// `[A-Za-z_][A-Za-z0-9_]*` up to [`MAX_ENV_NAME`] bytes and none of
/// [`RESERVED_ENV`](super::env_names::RESERVED_ENV), values without NUL up to [`MAX_ENV_VALUE`] bytes.
pub fn check_env(env: &BTreeMap<String, String>) -> Result<(), String> {
    if env.len() > MAX_ENV_VARS {
        return Err(format!(
            "environment has {} variables, more than the {MAX_ENV_VARS} allowed",
            env.len()
        ));
    }
    for (name, value) in env {
        let valid = name.len() <= MAX_ENV_NAME
            && name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
            && name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(format!(
                "environment variable name {name:?} is not a name: use up to {MAX_ENV_NAME} of A-Z a-z 0-9 _, not starting with a digit"
            ));
        }
        if let Some(reserved) = reserved_env(name) {
            return Err(format!(
                "environment variable {name:?} is reserved ({reserved}...: sprout or the runtime's protocol sets it)"
            ));
        }
        if value.len() > MAX_ENV_VALUE {
            return Err(format!(
                "environment variable {name:?} has a value of {} bytes, more than {MAX_ENV_VALUE}",
                value.len()
            ));
        }
        if value.contains('\0') {
            return Err(format!(
                "environment variable {name:?} has a NUL byte in its value"
            ));
        }
    }
    Ok(())
}

/// The Python handler `OL_ENTRY_FILE` names (`app.py` → `app:f`; `pkg/app.py` →
/// `pkg.app:f`): its module, with OpenLambda's `f`, which the runtime passes over
/// for an HTTP app when the module has none.
pub fn entry_handler(env: &BTreeMap<String, String>) -> Result<Option<String>, String> {
    let Some(file) = env.get(OL_ENTRY_FILE) else {
        return Ok(None);
    };
    let module = file
        .strip_suffix(".py")
        .filter(|m| {
            !m.is_empty()
                && m.split('/').all(|part| {
                    !part.is_empty()
                        && !part.starts_with(|c: char| c.is_ascii_digit())
                        && part.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
                })
        })
        .ok_or_else(|| {
            format!(
                "{OL_ENTRY_FILE} {file:?} is not a Python file in the function directory (name.py or dir/name.py)"
            )
        })?;
    Ok(Some(format!("{}:f", module.replace('/', "."))))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_environment_and_methods_and_ignores_the_rest() {
        let c = parse(
            "triggers:\n  http:\n    - method: GET\n    - method: post\n  cron:\n    - schedule: '* * * * *'\nenvironment:\n  A: hello world\n  DEBUG: true\n  PORT: 8080\nreuse-sandbox: false\nsomething: [1, 2]\n",
        )
        .unwrap();
        assert_eq!(c.http_methods, Some(vec!["GET".into(), "POST".into()]));
        assert_eq!(c.environment["A"], "hello world");
        assert_eq!(c.environment["DEBUG"], "true");
        assert_eq!(c.environment["PORT"], "8080");
        assert_eq!(parse("").unwrap(), OlConfig::default());
        assert_eq!(parse("# nothing\n").unwrap(), OlConfig::default());
        let star = parse("triggers: {http: [{method: GET}, {method: '*'}]}").unwrap();
        assert_eq!(star.http_methods, None);
        let none = parse("triggers: {http: []}").unwrap();
        assert_eq!(none.http_methods, Some(vec![]));
    }

    #[test]
    fn bad_yaml_and_wrong_types_name_the_line() {
        let e = parse("environment:\n  A: [1, 2]\n").unwrap_err();
        assert!(e.starts_with("line 2,"), "{e}");
        assert!(e.contains("string, number or boolean"), "{e}");
        let e = parse("triggers:\n  http:\n    - method: GET\n    - verb: PUT\n").unwrap_err();
        assert!(e.starts_with("line 4,"), "{e}");
        assert!(e.contains("method"), "{e}");
        let e = parse("environment: {A: b\n").unwrap_err();
        assert!(e.starts_with("line "), "{e}");
        let e = parse("environment: 3\n").unwrap_err();
        assert!(e.contains("environment"), "{e}");
        let e = parse("triggers: {http: [{method: 'GE T'}]}").unwrap_err();
        assert!(e.contains("triggers.http[0].method"), "{e}");
    }

    #[test]
    fn environment_bounds() {
        let env = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(check_env(&env("OK_1", "x")).is_ok());
        assert!(check_env(&env("PATH", "/bin")).is_ok());
        for bad in ["1A", "A=B", "A-B", "", "A B", "É"] {
            let e = check_env(&env(bad, "x")).unwrap_err();
            assert!(e.contains("is not a name"), "{bad}: {e}");
        }
        for reserved in [
            "SPROUT_FUNCTION",
            "__OW_API_KEY",
            "AWS_LAMBDA_RUNTIME_API",
            "_HANDLER",
        ] {
            let e = check_env(&env(reserved, "x")).unwrap_err();
            assert!(e.contains("is reserved"), "{reserved}: {e}");
        }
        assert!(check_env(&env("_HANDLERS", "x")).is_ok());
        let e = check_env(&env("A", "a\0b")).unwrap_err();
        assert!(e.contains("NUL"), "{e}");
        let e = check_env(&env("A", &"x".repeat(MAX_ENV_VALUE + 1))).unwrap_err();
        assert!(e.contains("bytes"), "{e}");
        let e = check_env(&env(&"A".repeat(MAX_ENV_NAME + 1), "x")).unwrap_err();
        assert!(e.contains("is not a name"), "{e}");
        let many: BTreeMap<_, _> = (0..=MAX_ENV_VARS)
            .map(|i| (format!("V{i}"), String::new()))
            .collect();
        assert!(check_env(&many).unwrap_err().contains("variables"));
    }

    #[test]
    fn entry_file_names_a_module() {
        let env = |v: &str| BTreeMap::from([(OL_ENTRY_FILE.to_owned(), v.to_owned())]);
        assert_eq!(entry_handler(&BTreeMap::new()).unwrap(), None);
        assert_eq!(
            entry_handler(&env("app.py")).unwrap().as_deref(),
            Some("app:f")
        );
        assert_eq!(
            entry_handler(&env("web/app.py")).unwrap().as_deref(),
            Some("web.app:f")
        );
        for bad in ["app", "../x.py", "/abs.py", "a b.py", ".py", "1a.py"] {
            assert!(entry_handler(&env(bad)).is_err(), "{bad}");
        }
    }

    /// An `ol.yaml` of 64 KiB whose 32 KiB anchored value is named by an alias in
    /// each of its 2,500 or more variables (over 80 MiB of values once expanded).
    fn alias_bomb() -> String {
        let mut text = format!("anchor: &b \"{}\"\nenvironment:\n", "x".repeat(32 << 10));
        let mut i = 0;
        while text.len() + 20 < MAX_OL_YAML as usize {
            text.push_str(&format!("  V{i}: *b\n"));
            i += 1;
        }
        assert!(i > 2_500, "{i} aliases");
        text
    }

    #[test]
    fn aliases_cannot_make_more_text_than_the_bound() {
        let started = std::time::Instant::now();
        let e = parse(&alias_bomb()).unwrap_err();
        assert!(
            e.contains(&format!("more than {MAX_OL_YAML_TEXT} bytes")),
            "{e}"
        );
        assert!(e.contains("aliases"), "{e}");
        assert!(e.starts_with("line "), "{e}");
        // Refused after a few values, not after 115 MiB of them.
        assert!(started.elapsed() < std::time::Duration::from_secs(2));
        // Through a method, too.
        let methods = format!(
            "m: &m \"{}\"\ntriggers:\n  http:\n{}",
            "G".repeat(30 << 10),
            "    - method: *m\n".repeat(100)
        );
        assert!(parse(&methods).unwrap_err().contains("aliases"));
        // A few aliases within the bound are YAML as usual; ignored keys cost nothing.
        let c = parse("x: &v hello\nenvironment:\n  A: *v\n  B: *v\n").unwrap();
        assert_eq!(
            (c.environment["A"].as_str(), c.environment["B"].as_str()),
            ("hello", "hello")
        );
        let ignored = alias_bomb().replace("environment:", "ignored:");
        assert_eq!(parse(&ignored).unwrap(), OlConfig::default());
        // The bound starts afresh with each file.
        let c = parse(&format!(
            "environment:\n  A: {}\n",
            "y".repeat(MAX_ENV_VALUE)
        ))
        .unwrap();
        assert_eq!(c.environment["A"].len(), MAX_ENV_VALUE);
    }

    #[test]
    fn read_is_bounded_and_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let dir = dir.path().canonicalize().unwrap();
        assert_eq!(read(&dir).unwrap(), OlConfig::default());
        std::fs::write(dir.join(OL_YAML), "environment:\n  - a\n").unwrap();
        let e = read(&dir).unwrap_err().to_string();
        assert!(e.contains("ol.yaml in "), "{e}");
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(dir.join(OL_YAML), "#".repeat(MAX_OL_YAML as usize + 1)).unwrap();
        let e = read(&dir).unwrap_err().to_string();
        assert!(e.contains("larger than"), "{e}");
    }
}
