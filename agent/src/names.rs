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
