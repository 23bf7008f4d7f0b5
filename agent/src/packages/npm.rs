//! `package.json` and `package-lock.json` as sprout accepts them. Every npm package
//! comes from the node's one registry (`--npm-registry`, [`DEFAULT_REGISTRY`] unless
//! the operator names another): a dependency that is not a version range
//! (or tag) of it (a URL, git, a local path, an alias) is refused, naming it, and so is
//! a lock entry that was resolved anywhere else (a `resolved` URL away from the
//! registry, a `file:` or git version, a link to a directory, a workspace), before
//! anything is installed. The modules sprout provides itself ([`PROVIDED`]) are taken
//! out of both: they are never fetched.

use serde_json::{Map, Value};

use super::error::Error;

/// The registry npm packages come from unless `--npm-registry` names another (the
/// installer points npm at the node's).
pub const DEFAULT_REGISTRY: &str = "https://registry.npmjs.org/";

/// Modules the runtime provides itself: never fetched, whatever `package.json` says.
pub const PROVIDED: &[&str] = &["sprout", "@m6s/box"];

/// At most this many dependencies in `package.json`.
const MAX_DEPENDENCIES: usize = 1024;
/// At most this many entries in a lock file (all its packages, at any depth).
const MAX_LOCK_ENTRIES: usize = 20_000;
/// The deepest nesting of a version 1 lock's `dependencies`.
const MAX_LOCK_DEPTH: usize = 64;
/// The longest dependency name, version spec or URL accepted.
const MAX_TEXT: usize = 2048;

/// What `package.json` says to install: a manifest of only what installing reads (its
/// `name`, `version` and `dependencies` without [`PROVIDED`]), `None` when it depends
/// on nothing else. `registry` is only named in errors.
pub fn manifest(package_json: &Value, registry: &str) -> Result<Option<Value>, Error> {
    let bad = |why: String| Error::Manifest(why);
    let deps = match package_json.get("dependencies") {
        None | Some(Value::Null) => return Ok(None),
        Some(Value::Object(deps)) => deps,
        Some(_) => return Err(bad("\"dependencies\" is not an object".into())),
    };
    if deps.len() > MAX_DEPENDENCIES {
        return Err(bad(format!("more than {MAX_DEPENDENCIES} dependencies")));
    }
    let mut kept = Map::new();
    for (name, spec) in deps {
        if PROVIDED.contains(&name.as_str()) {
            continue;
        }
        check_name(name).map_err(|why| bad(format!("dependency {}: {why}", shown(name))))?;
        let spec = spec.as_str().ok_or_else(|| {
            bad(format!(
                "dependency {} is {spec}, not a version string",
                shown(name)
            ))
        })?;
        if from_elsewhere(spec) {
            return Err(bad(format!(
                "dependency {} is {}: only version ranges of the registry {registry} are accepted (no URLs, git, paths or aliases)",
                shown(name),
                shown(spec)
            )));
        }
        kept.insert(name.clone(), Value::String(spec.to_owned()));
    }
    if kept.is_empty() {
        return Ok(None);
    }
    let text = |field: &str, default: &str| {
        package_json
            .get(field)
            .and_then(Value::as_str)
            // npm's own rules for a name, more or less: printable, no spaces (it is
            // logged and listed).
            .filter(|s| {
                !s.is_empty()
                    && s.len() <= 214
                    && s.chars().all(|c| {
                        c.is_ascii_alphanumeric()
                            || matches!(c, '-' | '_' | '.' | '@' | '/' | '+' | '~')
                    })
            })
            .unwrap_or(default)
            .to_owned()
    };
    Ok(Some(serde_json::json!({
        "name": text("name", "function"),
        "version": text("version", "0.0.0"),
        "private": true,
        "dependencies": kept,
    })))
}

/// A lock file, checked: every package in it from `registry` (a URL ending in `/`,
/// see `packages::source_url`); returned without the modules sprout provides.
pub fn lock(lock: &Value, registry: &str) -> Result<Value, Error> {
    let bad = |entry: &str, problem: String| Error::Lock {
        entry: entry.to_owned(),
        problem,
    };
    let Value::Object(top) = lock else {
        return Err(bad("(the file)", "not a JSON object".into()));
    };
    match top.get("lockfileVersion").and_then(Value::as_u64) {
        Some(1..=3) => {}
        _ => {
            return Err(bad(
                "lockfileVersion",
                format!(
                    "{}, not 1, 2 or 3",
                    top.get("lockfileVersion").unwrap_or(&Value::Null)
                ),
            ))
        }
    }
    let mut lock = lock.clone();
    let mut seen = 0usize;
    // Versions 2 and 3: `packages`, keyed by their path in the tree.
    if let Some(packages) = lock.get_mut("packages") {
        let Value::Object(packages) = packages else {
            return Err(bad("packages", "not an object".into()));
        };
        packages.retain(|path, _| !provided_path(path));
        for (path, entry) in packages.iter_mut() {
            seen += 1;
            if seen > MAX_LOCK_ENTRIES {
                return Err(bad(
                    "packages",
                    format!("more than {MAX_LOCK_ENTRIES} entries"),
                ));
            }
            let shown_path = if path.is_empty() {
                "packages[\"\"] (the function)".to_owned()
            } else {
                format!("packages[{}]", shown(path))
            };
            let Value::Object(entry) = entry else {
                return Err(bad(&shown_path, "not an object".into()));
            };
            if path.is_empty() {
                // The function itself: its dependencies as package.json has them.
                for field in ["dependencies", "optionalDependencies"] {
                    if let Some(Value::Object(deps)) = entry.get_mut(field) {
                        deps.retain(|name, _| !PROVIDED.contains(&name.as_str()));
                    }
                }
                continue;
            }
            tree_path(path).map_err(|problem| bad(&shown_path, problem))?;
            check_entry(entry, registry).map_err(|problem| bad(&shown_path, problem))?;
        }
    }
    // Version 1 (and 2, for old npm): `dependencies`, nested.
    if let Some(deps) = lock.get_mut("dependencies") {
        check_v1(deps, "dependencies", 0, &mut seen, registry)?;
    }
    Ok(lock)
}

/// A version 1 lock's `dependencies` at `at`: name → {version, resolved, dependencies}.
fn check_v1(
    deps: &mut Value,
    at: &str,
    depth: usize,
    seen: &mut usize,
    registry: &str,
) -> Result<(), Error> {
    let bad = |entry: &str, problem: String| Error::Lock {
        entry: entry.to_owned(),
        problem,
    };
    if depth > MAX_LOCK_DEPTH {
        return Err(bad(at, format!("nested deeper than {MAX_LOCK_DEPTH}")));
    }
    let Value::Object(deps) = deps else {
        return Err(bad(at, "not an object".into()));
    };
    if depth == 0 {
        deps.retain(|name, _| !PROVIDED.contains(&name.as_str()));
    }
    for (name, entry) in deps.iter_mut() {
        *seen += 1;
        if *seen > MAX_LOCK_ENTRIES {
            return Err(bad(at, format!("more than {MAX_LOCK_ENTRIES} entries")));
        }
        let here = format!("{at}[{}]", shown(name));
        check_name(name).map_err(|problem| bad(&here, problem))?;
        let Value::Object(fields) = entry else {
            return Err(bad(&here, "not an object".into()));
        };
        check_entry(fields, registry).map_err(|problem| bad(&here, problem))?;
        if let Some(nested) = fields.get_mut("dependencies") {
            check_v1(
                nested,
                &format!("{here}.dependencies"),
                depth + 1,
                seen,
                registry,
            )?;
        }
    }
    Ok(())
}

/// One locked package: from `registry`, not linked.
fn check_entry(entry: &Map<String, Value>, registry: &str) -> Result<(), String> {
    if entry.get("link").and_then(Value::as_bool) == Some(true) {
        return Err(format!(
            "a link to the directory {}: only packages of the registry {registry} are accepted",
            entry.get("resolved").unwrap_or(&Value::Null)
        ));
    }
    if let Some(version) = entry.get("version") {
        let version = version
            .as_str()
            .ok_or_else(|| format!("version {version} is not a string"))?;
        if from_elsewhere(version) {
            return Err(format!(
                "version {} is {}: only packages of the registry {registry} are accepted",
                shown(version),
                origin(version)
            ));
        }
    }
    if let Some(resolved) = entry.get("resolved") {
        let resolved = resolved
            .as_str()
            .ok_or_else(|| format!("resolved {resolved} is not a string"))?;
        if !from_registry(resolved, registry) {
            return Err(format!(
                "resolved to {} ({}): only packages of the registry {registry} are accepted",
                shown(resolved),
                origin(resolved)
            ));
        }
    }
    Ok(())
}

/// Whether `url` is a file of `registry` (`https://registry.npmjs.org/...`), nothing
/// that could make a client go elsewhere.
fn from_registry(url: &str, registry: &str) -> bool {
    url.len() <= MAX_TEXT
        && url.starts_with(registry)
        && !url.contains(['\\', '#', '?'])
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// What a spec or URL from elsewhere is, as errors name it.
fn origin(spec: &str) -> &'static str {
    let lower = spec.to_ascii_lowercase();
    if lower.starts_with("git") || lower.contains("git+") || lower.ends_with(".git") {
        "a git dependency"
    } else if lower.starts_with("file:")
        || lower.starts_with("link:")
        || lower.starts_with('.')
        || lower.starts_with('/')
    {
        "a local path"
    } else if lower.starts_with("npm:") {
        "an alias"
    } else if lower.contains("://") {
        "another server"
    } else {
        "not the registry"
    }
}

/// Whether a dependency's spec (or a locked version) names something other than a
/// version range or tag of the registry: a URL, git, a path, an alias.
fn from_elsewhere(spec: &str) -> bool {
    spec.len() > MAX_TEXT
        || spec.contains(':')
        || spec.contains('/')
        || spec.contains('\\')
        || spec.starts_with('.')
        || spec.chars().any(char::is_control)
}

/// A package name as npm writes them: `name` or `@scope/name`, no path tricks.
fn check_name(name: &str) -> Result<(), String> {
    let part_ok = |p: &str| {
        !p.is_empty()
            && !p.starts_with('.')
            && p.chars().all(|c| {
                c.is_ascii_alphanumeric()
                    || matches!(c, '-' | '_' | '.' | '~' | '!' | '*' | '\'' | '(' | ')')
            })
    };
    let ok = name.len() <= 214
        && match name.strip_prefix('@') {
            Some(scoped) => {
                matches!(scoped.split_once('/'), Some((s, n)) if part_ok(s) && part_ok(n))
            }
            None => part_ok(name),
        };
    if ok {
        Ok(())
    } else {
        Err(format!("{} is not an npm package name", shown(name)))
    }
}

/// A `packages` key: `node_modules/<name>` repeated, nothing else (a workspace or a
/// linked directory lives elsewhere).
fn tree_path(path: &str) -> Result<(), String> {
    let Some(rest) = path.strip_prefix("node_modules/") else {
        return Err(
            "not under node_modules (a workspace or a linked directory): only packages of the registry are accepted"
                .into(),
        );
    };
    for name in rest.split("/node_modules/") {
        check_name(name)?;
    }
    Ok(())
}

/// Whether a `packages` key is a module sprout provides or inside one.
fn provided_path(path: &str) -> bool {
    PROVIDED.iter().any(|p| {
        let top = format!("node_modules/{p}");
        path == top || path.starts_with(&format!("{top}/"))
    })
}

/// `text` quoted and cut for an error message.
fn shown(text: &str) -> String {
    let cut: String = text.chars().take(120).collect();
    if cut.len() < text.len() {
        format!("{:?}...", cut)
    } else {
        format!("{cut:?}")
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn manifest_(package_json: &Value) -> Result<Option<Value>, Error> {
        manifest(package_json, DEFAULT_REGISTRY)
    }

    fn lock_(l: &Value) -> Result<Value, Error> {
        lock(l, DEFAULT_REGISTRY)
    }

    #[test]
    fn a_lock_is_checked_against_the_configured_registry() {
        let entry = |url: &str| {
            v3(json!({"": {}, "node_modules/x": {"version": "1.0.0", "resolved": url}}))
        };
        let mirror = "http://10.233.0.2:8080/npm/";
        lock(&entry("http://10.233.0.2:8080/npm/x/-/x-1.0.0.tgz"), mirror).unwrap();
        for elsewhere in [
            "https://registry.npmjs.org/x/-/x-1.0.0.tgz",
            "http://10.233.0.2:8080/npmx/x-1.0.0.tgz",
            "http://10.233.0.2:8080/other/x-1.0.0.tgz",
        ] {
            let e = lock(&entry(elsewhere), mirror).unwrap_err().to_string();
            assert!(e.contains(elsewhere) && e.contains(mirror), "{e}");
        }
        let e = manifest(
            &json!({"dependencies": {"x": "git+https://a/b.git"}}),
            mirror,
        )
        .unwrap_err()
        .to_string();
        assert!(e.contains(mirror), "{e}");
    }

    #[test]
    fn a_manifest_keeps_registry_ranges_and_drops_what_sprout_provides() {
        let m = manifest_(&json!({
            "name": "f", "version": "1.2.3", "scripts": {"postinstall": "x"},
            "dependencies": {"left-pad": "^1.3.0", "@types/node": "latest", "sprout": "*", "@m6s/box": "1"},
            "devDependencies": {"jest": "29"},
        }))
        .unwrap()
        .unwrap();
        assert_eq!(
            m,
            json!({"name": "f", "version": "1.2.3", "private": true,
                   "dependencies": {"left-pad": "^1.3.0", "@types/node": "latest"}})
        );
        assert_eq!(
            manifest_(&json!({"dependencies": {"sprout": "1"}})).unwrap(),
            None
        );
        assert_eq!(manifest_(&json!({"name": "x"})).unwrap(), None);
    }

    #[test]
    fn a_manifest_from_elsewhere_is_refused_by_name() {
        for (spec, _) in [
            ("git+https://github.com/a/b.git", "git"),
            ("github:a/b", "git"),
            ("a/b", "git"),
            ("file:../x", "path"),
            ("./x", "path"),
            ("https://example.com/x.tgz", "url"),
            ("npm:other@1", "alias"),
        ] {
            let e = manifest_(&json!({"dependencies": {"dep": spec}}))
                .unwrap_err()
                .to_string();
            assert!(e.contains("\"dep\"") && e.contains(spec), "{spec}: {e}");
        }
        let e = manifest_(&json!({"dependencies": {"../x": "1"}})).unwrap_err();
        assert!(e.to_string().contains("not an npm package name"), "{e}");
        let e = manifest_(&json!({"dependencies": {"x": 1}})).unwrap_err();
        assert!(e.to_string().contains("not a version string"), "{e}");
    }

    fn v3(packages: Value) -> Value {
        json!({"name": "f", "lockfileVersion": 3, "requires": true, "packages": packages})
    }

    #[test]
    fn a_registry_lock_passes_without_what_sprout_provides() {
        let l = lock_(&v3(json!({
            "": {"dependencies": {"left-pad": "1.3.0", "sprout": "*"}},
            "node_modules/left-pad": {"version": "1.3.0",
                "resolved": "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz"},
            "node_modules/@scope/x/node_modules/y": {"version": "2.0.0",
                "resolved": "https://registry.npmjs.org/y/-/y-2.0.0.tgz"},
            "node_modules/z": {"version": "1.0.0"},
            "node_modules/sprout": {"version": "9.9.9", "resolved": "https://elsewhere.example/s.tgz"},
            "node_modules/sprout/node_modules/q": {"version": "1.0.0", "resolved": "git+ssh://x"},
        })))
        .unwrap();
        let packages = l["packages"].as_object().unwrap();
        assert!(!packages.keys().any(|k| k.contains("sprout")), "{l}");
        assert_eq!(packages[""]["dependencies"], json!({"left-pad": "1.3.0"}));
        assert_eq!(packages.len(), 4);
    }

    #[test]
    fn a_lock_entry_from_elsewhere_is_refused_by_name() {
        let cases = [
            (
                json!({"version": "1.0.0", "resolved": "https://evil.example/x/-/x-1.0.0.tgz"}),
                "another server",
            ),
            (
                json!({"version": "1.0.0", "resolved": "https://registry.npmjs.org.evil.example/x.tgz"}),
                "another server",
            ),
            (
                json!({"version": "1.0.0", "resolved": "http://registry.npmjs.org/x/-/x-1.0.0.tgz"}),
                "another server",
            ),
            (
                json!({"version": "1.0.0", "resolved": "git+ssh://git@github.com/a/x.git#abc"}),
                "a git dependency",
            ),
            (json!({"version": "file:../x"}), "a local path"),
            (
                json!({"version": "1.0.0", "resolved": "file:../x-1.0.0.tgz"}),
                "a local path",
            ),
            (json!({"resolved": "../x", "link": true}), "a link"),
        ];
        for (entry, says) in cases {
            let e = lock_(&v3(json!({"": {}, "node_modules/x": entry.clone()})))
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("packages[\"node_modules/x\"]") && e.contains(says),
                "{entry}: {e}"
            );
        }
        let e = lock_(&v3(json!({"packages/a": {"version": "1.0.0"}}))).unwrap_err();
        assert!(e.to_string().contains("workspace"), "{e}");
        let e = lock_(&v3(json!({"node_modules/../../etc": {}}))).unwrap_err();
        assert!(e.to_string().contains("not an npm package name"), "{e}");
    }

    #[test]
    fn a_version_1_lock_is_checked_at_every_depth() {
        let ok = json!({"lockfileVersion": 1, "dependencies": {
            "sprout": {"version": "git+https://x.git"},
            "a": {"version": "1.0.0", "resolved": "https://registry.npmjs.org/a/-/a-1.0.0.tgz",
                  "dependencies": {"b": {"version": "2.0.0"}}},
        }});
        let l = lock_(&ok).unwrap();
        assert!(l["dependencies"].get("sprout").is_none(), "{l}");
        let bad = json!({"lockfileVersion": 1, "dependencies": {
            "a": {"version": "1.0.0", "dependencies": {"b": {"version": "github:u/b#main"}}},
        }});
        let e = lock_(&bad).unwrap_err().to_string();
        assert!(
            e.contains("dependencies[\"a\"].dependencies[\"b\"]") && e.contains("a git dependency"),
            "{e}"
        );
        let e = lock_(&json!({"lockfileVersion": 7}))
            .unwrap_err()
            .to_string();
        assert!(e.contains("lockfileVersion"), "{e}");
    }
}
