//! Who may do what on the TCP listener: API keys (`--auth FILE`), HTTP basic auth, and
//! the access rule of each route.
//!
//! A key file has one key a line, `NAMESPACE UUID:KEY` (OpenWhisk's key format),
//! blank lines and `#` comments allowed. A client sends `Authorization: Basic
//! base64(UUID:KEY)`. The credentials are compared in constant time: each key is
//! kept as the SHA-256 digest of its `UUID:KEY`, and the digest of what the client
//! sent is compared with every key's (`subtle`), so neither how much of a key
//! matched nor which key did shows in the time taken.
//!
//! A key acts in its namespace; a key under the namespace `*` acts in every one (a
//! controller's). What a route needs is its [`Rule`]:
//! - [`Rule::Namespace`]: the route acts in the namespace of its path (`default`
//!   without `/namespaces/{ns}/`): that namespace's key or a `*` key;
//! - [`Rule::AnyKey`]: any valid key (`GET /stats`: node-wide counters that name
//!   nothing);
//! - [`Rule::Scoped`]: any valid key, and a namespace key's answer is narrowed to
//!   its namespace ([`Grant::scope`]): `GET /status` lists only its namespace, and
//!   the activation reads (planned) only its records;
//! - [`Rule::Node`]: the whole node (`/packages`, `POST /packages/gc`, `/metrics`,
//!   the invoker's routes): a `*` key only.
//!
//! The Unix socket is trusted as it always was ([`Caller::Local`]): whoever can open
//! it may do anything. A TCP listener started with `--no-auth` (loopback only) acts
//! for any namespace. On TCP, whatever the key, a function is never registered by a
//! host path (that would hand the host's files to the network): only uploads.

use std::fmt;
use std::fs;
use std::io::Read as _;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::Engine as _;
use sha2::{Digest, Sha256};
use subtle::{ConditionallySelectable, ConstantTimeEq};

use super::reply::Reject;

/// The namespace of a key that acts for every namespace.
pub const ANY_NAMESPACE: &str = "*";
/// Largest key file read.
const MAX_FILE: u64 = 1 << 20;
/// Largest `Authorization` value looked at; longer ones are wrong keys.
const MAX_CREDENTIALS: usize = 1024;
/// The shortest secret part of a key accepted (OpenWhisk's are 64 characters).
pub const MIN_SECRET: usize = 32;

/// Why a key file was refused.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("read the key file {path}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("the key file {path} is not a regular file")]
    NotAFile { path: PathBuf },
    #[error("the key file {path} is larger than {MAX_FILE} bytes")]
    TooLarge { path: PathBuf },
    #[error("the key file {path} is readable or writable by others (mode {mode:04o}): run `chmod 600 {path}`")]
    Exposed { path: PathBuf, mode: u32 },
    #[error("the key file {path}, line {line}: {reason}")]
    Line {
        path: PathBuf,
        line: usize,
        reason: String,
    },
    #[error("the key file {path} has no key")]
    Empty { path: PathBuf },
}

/// What a key acts for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum KeyScope {
    /// `*`: every namespace, and the node.
    Any,
    /// One namespace.
    Namespace(String),
}

impl fmt::Display for KeyScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            KeyScope::Any => f.write_str(ANY_NAMESPACE),
            KeyScope::Namespace(ns) => f.write_str(ns),
        }
    }
}

struct Key {
    scope: KeyScope,
    /// SHA-256 of `UUID:KEY`.
    digest: [u8; 32],
}

/// The keys a TCP listener accepts.
pub struct Keys {
    keys: Vec<Key>,
}

impl fmt::Debug for Keys {
    /// Never prints a key, nor its digest.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Keys")
            .field("count", &self.keys.len())
            .finish()
    }
}

impl Keys {
    /// Reads a key file: a regular file of at most 1 MiB that others (neither owner
    /// nor group) can neither read nor write, of lines `NAMESPACE UUID:KEY`.
    pub fn load(path: &Path) -> Result<Keys, KeyError> {
        let read = |source| KeyError::Read {
            path: path.to_owned(),
            source,
        };
        let file = fs::File::open(path).map_err(read)?;
        let meta = file.metadata().map_err(read)?;
        if !meta.is_file() {
            return Err(KeyError::NotAFile {
                path: path.to_owned(),
            });
        }
        let mode = meta.permissions().mode() & 0o7777;
        if meta.mode() & 0o007 != 0 {
            return Err(KeyError::Exposed {
                path: path.to_owned(),
                mode,
            });
        }
        if meta.len() > MAX_FILE {
            return Err(KeyError::TooLarge {
                path: path.to_owned(),
            });
        }
        let mut text = String::new();
        file.take(MAX_FILE + 1)
            .read_to_string(&mut text)
            .map_err(read)?;
        Keys::parse(&text, path)
    }

    /// Parses a key file's text (`path` names it in errors).
    pub fn parse(text: &str, path: &Path) -> Result<Keys, KeyError> {
        let mut keys = Vec::new();
        // UUID → the line it was first given on.
        let mut uuids: Vec<(String, usize)> = Vec::new();
        for (i, raw) in text.lines().enumerate() {
            let line = i + 1;
            let bad = |reason: String| KeyError::Line {
                path: path.to_owned(),
                line,
                reason,
            };
            let content = raw.trim();
            if content.is_empty() || content.starts_with('#') {
                continue;
            }
            let mut fields = content.split_whitespace();
            let (Some(namespace), Some(credentials), None) =
                (fields.next(), fields.next(), fields.next())
            else {
                return Err(bad(
                    "expected `NAMESPACE UUID:KEY` (two fields separated by a space)".to_owned(),
                ));
            };
            let scope = if namespace == ANY_NAMESPACE {
                KeyScope::Any
            } else {
                crate::names::validate_namespace(namespace).map_err(|e| bad(e.to_string()))?;
                KeyScope::Namespace(namespace.to_owned())
            };
            let Some((uuid, secret)) = credentials.split_once(':') else {
                return Err(bad(
                    "the key is not `UUID:KEY` (no `:` between the two)".to_owned()
                ));
            };
            let token = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
            if uuid.is_empty() || uuid.len() > 128 || !uuid.chars().all(token) {
                return Err(bad(
                    "the key's UUID must be 1 to 128 characters of A-Z a-z 0-9 - _ .".to_owned(),
                ));
            }
            if secret.len() < MIN_SECRET
                || secret.len() > 512
                || !secret.chars().all(|c| c.is_ascii_graphic())
            {
                return Err(bad(format!(
                    "the key's secret (after `:`) must be {MIN_SECRET} to 512 printable ASCII characters"
                )));
            }
            if let Some((_, first)) = uuids.iter().find(|(u, _)| u == uuid) {
                return Err(bad(format!(
                    "the UUID {uuid} is given on line {first} already"
                )));
            }
            uuids.push((uuid.to_owned(), line));
            keys.push(Key {
                scope,
                digest: Sha256::digest(credentials.as_bytes()).into(),
            });
        }
        if keys.is_empty() {
            return Err(KeyError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Keys { keys })
    }

    /// How many keys there are.
    pub fn len(&self) -> usize {
        self.keys.len()
    }

    /// Whether there are none (never, for loaded keys).
    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// The scope of the key an `Authorization` header value carries, if it is one of
    /// these keys. Takes the same time whichever key matches, or none.
    pub(super) fn authenticate(&self, authorization: Option<&str>) -> Option<&KeyScope> {
        let credentials = basic_credentials(authorization?)?;
        let digest: [u8; 32] = Sha256::digest(&credentials).into();
        let mut found = subtle::Choice::from(0);
        let mut index = 0u64;
        for (i, key) in self.keys.iter().enumerate() {
            let same = key.digest.ct_eq(&digest);
            index.conditional_assign(&(i as u64), same);
            found |= same;
        }
        bool::from(found).then(|| &self.keys[index as usize].scope)
    }
}

/// The `UUID:KEY` a request's headers carry as basic auth, if any.
pub(super) fn credentials(headers: &[(String, String)]) -> Option<String> {
    let (_, value) = headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case("authorization"))?;
    String::from_utf8(basic_credentials(value)?).ok()
}

/// The decoded `UUID:KEY` of a `Basic` authorization value.
fn basic_credentials(value: &str) -> Option<Vec<u8>> {
    if value.len() > MAX_CREDENTIALS {
        return None;
    }
    let (scheme, encoded) = value.trim().split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("basic") {
        return None;
    }
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    decoded.contains(&b':').then_some(decoded)
}

/// What a listener asks of the requests it takes.
#[derive(Debug, Clone)]
pub(super) enum Gate {
    /// The Unix socket: nothing.
    Local,
    /// TCP with `--no-auth`.
    Open,
    /// TCP: one of these keys.
    Keys(Arc<Keys>),
}

impl Gate {
    /// Who sent a request with these headers; `None` for a missing or wrong key (or
    /// more than one `Authorization`).
    pub fn caller<'a>(&'a self, headers: &[(String, String)]) -> Option<Caller<'a>> {
        match self {
            Gate::Local => Some(Caller::Local),
            Gate::Open => Some(Caller::Open),
            Gate::Keys(keys) => {
                let mut given = headers
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case("authorization"));
                let value = given.next().map(|(_, v)| v.as_str());
                if given.next().is_some() {
                    return None;
                }
                keys.authenticate(value).map(Caller::Key)
            }
        }
    }
}

/// Who sent a request, as far as its listener can tell.
#[derive(Debug, Clone, Copy)]
pub(super) enum Caller<'a> {
    /// On the Unix socket: trusted with everything.
    Local,
    /// On TCP with `--no-auth`: acts for any namespace, but never by host paths.
    Open,
    /// On TCP, with a valid key of this scope.
    Key(&'a KeyScope),
}

/// What a route needs of its caller (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Rule {
    /// Acts in the namespace of its path.
    Namespace,
    /// Node-wide counters that name nothing: any valid key.
    AnyKey,
    /// A read that a namespace key sees narrowed to its namespace.
    Scoped,
    /// The whole node: a `*` key only.
    Node,
}

/// What an authorized caller may see and do.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Grant {
    /// The request came over the network: a function is registered only by upload.
    pub remote: bool,
    /// A namespace key's view of a [`Rule::Scoped`] read: only this namespace.
    pub scope: Option<String>,
    /// The namespace of the caller's key (OpenWhisk's `_`), whatever the rule.
    pub own: Option<String>,
    /// The caller's key as it sent it (`uuid:secret`), set by the connection for
    /// OpenWhisk's `__OW_API_KEY`.
    pub api_key: Option<String>,
}

impl Caller<'_> {
    /// Whether this caller may use a route of `rule` acting in `namespace` (the
    /// path's, or `default`; decoded only when a namespace key needs it): what it
    /// may see, or the 403 (or the namespace's 400).
    pub fn authorize(
        &self,
        rule: Rule,
        namespace: impl FnOnce() -> Result<String, Reject>,
    ) -> Result<Grant, Reject> {
        let remote = !matches!(self, Caller::Local);
        let scope = match self {
            Caller::Local | Caller::Open | Caller::Key(KeyScope::Any) => None,
            Caller::Key(KeyScope::Namespace(own)) => Some(own),
        };
        let Some(own) = scope else {
            return Ok(Grant {
                remote,
                ..Grant::default()
            });
        };
        let grant = |scope: Option<String>| Grant {
            remote,
            scope,
            own: Some(own.clone()),
            api_key: None,
        };
        match rule {
            Rule::AnyKey => Ok(grant(None)),
            Rule::Scoped => Ok(grant(Some(own.clone()))),
            // `_`: OpenWhisk's name of the caller's own namespace.
            Rule::Namespace => {
                let asked = namespace()?;
                // `_`: OpenWhisk's name of the caller's own namespace.
                if asked == *own || asked == "_" {
                    return Ok(grant(None));
                }
                // Nothing of the other namespace is named, not even whether it exists.
                Err(forbidden(format!(
                "this key acts only in its own namespace, {own:?}"
            )))
            }
            Rule::Node => Err(forbidden(format!(
                "this route acts on the whole node: only a key of namespace \"{ANY_NAMESPACE}\" may use it, and this key acts only in {own:?}"
            ))),
        }
    }
}

/// The 401 for a missing or wrong key: the same whatever was wrong.
pub(super) fn unauthorized() -> Reject {
    Reject::new(
        401,
        "unauthorized",
        "a valid key is required: send it as HTTP basic auth (user UUID, password KEY)",
    )
}

pub(super) fn forbidden(message: String) -> Reject {
    Reject::new(403, "forbidden", message)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "0a1b2c3d-0000-4000-8000-00000000000a:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    const STAR: &str =
        "0a1b2c3d-0000-4000-8000-00000000000f:ffffffffffffffffffffffffffffffffffffffff";

    fn basic(credentials: &str) -> String {
        format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode(credentials)
        )
    }

    fn keys() -> Keys {
        let text = format!("# keys\n\nalpha {A}\n  * {STAR}  \n");
        Keys::parse(&text, Path::new("/k")).unwrap()
    }

    #[test]
    fn keys_authenticate_by_their_whole_credentials() {
        let k = keys();
        assert_eq!(k.len(), 2);
        assert_eq!(
            k.authenticate(Some(&basic(A))),
            Some(&KeyScope::Namespace("alpha".into()))
        );
        assert_eq!(k.authenticate(Some(&basic(STAR))), Some(&KeyScope::Any));
        // The scheme's name is case-insensitive.
        let lower = basic(A).replacen("Basic", "basic", 1);
        assert!(k.authenticate(Some(&lower)).is_some());
        let (uuid, secret) = A.split_once(':').unwrap();
        for wrong in [
            None,
            Some(String::new()),
            Some("Basic".to_owned()),
            Some("Basic !!!".to_owned()),
            Some(basic(uuid)),
            Some(basic(&format!("{uuid}:"))),
            Some(basic(&format!("{uuid}:{}", &secret[1..]))),
            Some(basic(&format!("{uuid}:{secret}x"))),
            Some(basic(&format!(
                "{}:{secret}",
                STAR.split_once(':').unwrap().0
            ))),
            Some(format!("Bearer {A}")),
            Some(format!("Basic {}", "A".repeat(2000))),
        ] {
            assert_eq!(k.authenticate(wrong.as_deref()), None, "{wrong:?}");
        }
    }

    #[test]
    fn bad_lines_are_refused_naming_the_line() {
        let good = format!("alpha {A}\n");
        for (text, line, words) in [
            (format!("{good}alpha\n"), 2, "two fields"),
            (format!("{good}alpha {A} extra\n"), 2, "two fields"),
            (format!("\n_ {A}\n"), 2, "invalid namespace"),
            (format!("# c\nbad/ns {A}\n"), 2, "invalid namespace"),
            ("alpha nocolon\n".to_owned(), 1, "no `:`"),
            (
                "alpha :aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n".to_owned(),
                1,
                "UUID",
            ),
            (
                "alpha u/x:aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa\n".to_owned(),
                1,
                "UUID",
            ),
            ("alpha u:short\n".to_owned(), 1, "secret"),
            (format!("{good}beta {A}\n"), 2, "line 1 already"),
        ] {
            let e = Keys::parse(&text, Path::new("/etc/sprout/keys"))
                .err()
                .unwrap_or_else(|| panic!("{text:?} was accepted"));
            let message = e.to_string();
            assert!(
                message.contains(&format!("/etc/sprout/keys, line {line}:")),
                "{text:?}: {message}"
            );
            assert!(message.contains(words), "{text:?}: {message}");
        }
        let e = Keys::parse("# nothing\n\n", Path::new("/k")).unwrap_err();
        assert_eq!(e.to_string(), "the key file /k has no key");
    }

    #[test]
    fn a_key_file_others_can_read_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("keys");
        fs::write(&path, format!("alpha {A}\n")).unwrap();
        for (mode, ok) in [(0o600, true), (0o640, true), (0o644, false), (0o602, false)] {
            fs::set_permissions(&path, fs::Permissions::from_mode(mode)).unwrap();
            match Keys::load(&path) {
                Ok(k) => assert!(ok, "{mode:o} accepted ({k:?})"),
                Err(e) => {
                    assert!(!ok, "{mode:o}: {e}");
                    let message = e.to_string();
                    assert!(message.contains(&format!("{mode:04o}")), "{message}");
                    assert!(message.contains("chmod 600"), "{message}");
                }
            }
        }
        assert!(matches!(
            Keys::load(dir.path()),
            Err(KeyError::NotAFile { .. })
        ));
        // Debug output never shows a key.
        let k = keys();
        assert!(!format!("{k:?}").contains("aaaa"));
    }

    #[test]
    fn rules_decide_what_a_key_may_do() {
        let alpha = KeyScope::Namespace("alpha".into());
        let key = Caller::Key(&alpha);
        let star = Caller::Key(&KeyScope::Any);
        let ns = |n: &'static str| move || Ok(n.to_owned());
        // A namespace key's grant names its namespace; other callers' name none.
        let grant = |remote, scope: Option<&str>| Grant {
            remote,
            scope: scope.map(str::to_owned),
            own: Some("alpha".to_owned()),
            api_key: None,
        };
        let plain = |remote| Grant {
            remote,
            ..Grant::default()
        };
        assert_eq!(
            key.authorize(Rule::Namespace, ns("alpha")),
            Ok(grant(true, None))
        );
        // OpenWhisk's `_`: the key's own namespace.
        assert_eq!(
            key.authorize(Rule::Namespace, ns("_")),
            Ok(grant(true, None))
        );
        let e = key.authorize(Rule::Namespace, ns("beta")).unwrap_err();
        assert_eq!((e.status, e.kind), (403, "forbidden"));
        assert!(!e.message.contains("beta"), "{}", e.message);
        assert_eq!(
            key.authorize(Rule::AnyKey, ns("default")),
            Ok(grant(true, None))
        );
        assert_eq!(
            key.authorize(Rule::Scoped, ns("default")),
            Ok(grant(true, Some("alpha")))
        );
        assert_eq!(
            key.authorize(Rule::Node, ns("default")).unwrap_err().status,
            403
        );
        for caller in [star, Caller::Open] {
            for rule in [Rule::Namespace, Rule::AnyKey, Rule::Scoped, Rule::Node] {
                assert_eq!(caller.authorize(rule, ns("beta")), Ok(plain(true)));
            }
        }
        assert_eq!(
            Caller::Local.authorize(Rule::Node, ns("beta")),
            Ok(plain(false))
        );
    }
}
