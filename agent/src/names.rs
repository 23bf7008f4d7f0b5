//! What functions and workflows are registered under: a namespace (the tenant
//! boundary) and a name, and the rules both follow.

use crate::error::Error;
pub use crate::error::NAMESPACE_RULE;

/// The namespace of a function or workflow registered without one (and of every
/// `/functions/...` and `/workflows/...` route).
pub const DEFAULT_NAMESPACE: &str = "default";

/// The longest namespace name: OpenWhisk's limit for entity names.
pub const MAX_NAMESPACE_LEN: usize = 256;

/// What a function or a workflow is registered under: its namespace and its name.
///
/// The namespace is the tenant boundary. Names are unique per namespace; a function
/// calls only functions of its own namespace (in its sandbox or in a sibling), code is
/// attached into a sandbox and a workflow's scratch shared only within one namespace,
/// and warm instances are kept per key. Neither part can hold a `/`, so the key shows
/// as `namespace/name` without ambiguity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FunctionKey {
    pub namespace: String,
    pub name: String,
}

impl FunctionKey {
    /// A key whose namespace and name are both valid.
    pub fn new(namespace: &str, name: &str) -> Result<FunctionKey, Error> {
        validate_namespace(namespace)?;
        validate_name(name)?;
        Ok(FunctionKey {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
        })
    }

    /// `name` in the [`DEFAULT_NAMESPACE`] (checked).
    pub fn in_default(name: &str) -> Result<FunctionKey, Error> {
        FunctionKey::new(DEFAULT_NAMESPACE, name)
    }
}

impl std::fmt::Display for FunctionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Namespace names follow OpenWhisk's entity names (`[\w][\w@ .-]*[\w@.-]`, at most
/// 256 characters) without the space, which the API's paths cannot carry unencoded:
/// every sprout namespace is a valid OpenWhisk namespace. `_` alone is refused: in
/// OpenWhisk's API it means the caller's own namespace.
pub fn validate_namespace(namespace: &str) -> Result<(), Error> {
    let word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let ok = namespace.len() <= MAX_NAMESPACE_LEN
        && namespace != "_"
        && namespace.chars().next().is_some_and(word)
        && namespace
            .chars()
            .all(|c| word(c) || matches!(c, '@' | '.' | '-'));
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidNamespace {
            namespace: namespace.chars().take(MAX_NAMESPACE_LEN + 1).collect(),
        })
    }
}

/// Names are path- and cgroup-safe: 1-64 of `[A-Za-z0-9_.-]`, not starting with `.` or
/// `-`, where `~` followed by two lowercase hex digits stands for one byte of an
/// OpenWhisk name outside that set ([`from_openwhisk`]).
pub fn validate_name(name: &str) -> Result<(), Error> {
    let bytes = name.as_bytes();
    let mut ok = !name.is_empty() && name.len() <= MAX_NAME_LEN && !name.starts_with(['.', '-']);
    let mut i = 0;
    while ok && i < bytes.len() {
        match bytes[i] {
            b'~' => {
                ok = bytes
                    .get(i + 1..i + 3)
                    .is_some_and(|hex| hex.iter().all(is_lower_hex))
                    && unescape(&name[i..i + 3]).is_some();
                i += 3;
            }
            b => {
                ok = b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-');
                i += 1;
            }
        }
    }
    if ok {
        Ok(())
    } else {
        Err(Error::InvalidName {
            name: name.chars().take(MAX_NAME_LEN * 4).collect(),
        })
    }
}

/// The longest function name (its sprout form).
pub const MAX_NAME_LEN: usize = 64;

fn is_lower_hex(b: &u8) -> bool {
    matches!(b, b'0'..=b'9' | b'a'..=b'f')
}

/// The byte an escape `~XX` stands for, if it is one an OpenWhisk name may hold and
/// sprout's plain names may not (so every name has one spelling).
fn unescape(escape: &str) -> Option<u8> {
    let byte = u8::from_str_radix(escape.get(1..3)?, 16).ok()?;
    matches!(byte, b'/' | b'@' | b' ').then_some(byte)
}

/// sprout's name of an OpenWhisk action, given its name within the namespace
/// (`action`, or `package/action`): each `/`, `@` and space is written `~2f`, `~40`,
/// `~20`; every other character must be one of sprout's (`[A-Za-z0-9_.-]`), which
/// OpenWhisk's entity names allow too. A name valid in both is the same in both.
/// The rule is reversible ([`to_openwhisk`]); the result must pass [`validate_name`]
/// (at most 64 characters).
pub fn from_openwhisk(name: &str) -> Result<String, Error> {
    let mut out = String::with_capacity(name.len());
    for c in name.chars() {
        match c {
            '/' => out.push_str("~2f"),
            '@' => out.push_str("~40"),
            ' ' => out.push_str("~20"),
            // Not in OpenWhisk's names: taken as it is, `pkg~2fact` would be `pkg/act`.
            '~' => {
                return Err(Error::InvalidName {
                    name: name.chars().take(MAX_NAME_LEN * 4).collect(),
                })
            }
            c => out.push(c),
        }
    }
    validate_name(&out).map_err(|_| Error::InvalidName {
        name: name.chars().take(MAX_NAME_LEN * 4).collect(),
    })?;
    Ok(out)
}

/// The OpenWhisk name (`package/action` or `action`) of a sprout function name: the
/// escapes of [`from_openwhisk`] undone.
pub fn to_openwhisk(name: &str) -> String {
    let mut out = String::with_capacity(name.len());
    let mut rest = name;
    while let Some(at) = rest.find('~') {
        out.push_str(&rest[..at]);
        match rest.get(at..at + 3).and_then(unescape) {
            Some(byte) => {
                out.push(byte as char);
                rest = &rest[at + 3..];
            }
            None => {
                out.push('~');
                rest = &rest[at + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn openwhisk_names_map_both_ways() {
        for (ow, sprout) in [
            ("hello", "hello"),
            ("pkg/hello", "pkg~2fhello"),
            ("me@home", "me~40home"),
            ("two words", "two~20words"),
            ("a.b-c_d", "a.b-c_d"),
        ] {
            assert_eq!(from_openwhisk(ow).unwrap(), sprout);
            assert_eq!(to_openwhisk(sprout), ow);
            validate_name(sprout).unwrap();
        }
    }

    #[test]
    fn names_that_do_not_map_are_refused() {
        for bad in ["", "ü", "a/b/c/".repeat(20).as_str(), ".hidden", "a:b"] {
            assert!(from_openwhisk(bad).is_err(), "{bad:?}");
        }
        // `~` is no character of OpenWhisk's names: one would alias an escape.
        for bad in ["pkg~2fact", "a~40b", "x~"] {
            assert!(from_openwhisk(bad).is_err(), "{bad:?}");
        }
        // Escapes only for the three bytes, lowercase, whole.
        for bad in ["a~", "a~2", "a~2F", "a~41", "a~zz", "~"] {
            assert!(validate_name(bad).is_err(), "{bad:?}");
        }
    }
}
