//! Node.js functions' npm packages (issue 13, item 2), on a real daemon with small real
//! packages from the registry (`is-number@7.0.0`, `left-pad@1.3.0`): installed in an
//! install sandbox from `package.json` (with `package-lock.json`, `npm ci`), once per
//! manifest and lock, mounted read-only and found by `require` after the function's
//! own `node_modules`; `sprout` and `@m6s/box` never fetched and always sprout's;
//! failures and packages from anywhere but the registry refused with a 400 that names
//! them, leaving nothing behind.

use std::path::Path;

use sprout_tests::{body_json, json, require_root, text, Daemon, Value};

/// The integrity npm records for the two packages (the registry's own).
const LEFT_PAD_INTEGRITY: &str =
    "sha512-XI5MPzVNApjAyhQzphX8BkmKsKUxD4LdyK24iZeQGinBN9yTQT3bFlCBy/aVx2HrNcqQGsdot8ghrjyrvMCoEA==";
const IS_NUMBER_INTEGRITY: &str =
    "sha512-41Cifkg6e8TylSpdtTpeLVMqvSBEVzTttHvERD741+pnZ8ANv0004MRL43QKPDlK9cGvNp6NZWZUBlbGXYxxng==";

/// A handler that reports where its modules come from and whether it can change them.
const WHERE_JS: &str = r#"const fs = require('fs');
const path = require('path');
exports.main = () => {
  const out = {};
  for (const m of ['is-number', 'left-pad', 'sprout', '@m6s/box']) {
    try { out[m] = require.resolve(m); } catch (e) { out[m] = null; }
  }
  out.isNumber = require('is-number')('5');
  try { out.leftPad = require('left-pad')('7', 3, '0'); } catch (e) { out.leftPad = null; }
  out.sproutCall = typeof require('sprout').call;
  out.boxInvoke = typeof require('@m6s/box').invoke;
  try {
    fs.writeFileSync(path.join(path.dirname(require.resolve('is-number')), 'planted.js'), '');
    out.writable = true;
  } catch (e) { out.writable = e.code; }
  return out;
};
"#;

fn register_node(d: &Daemon, name: &str, dir: &Path) -> (u16, Value) {
    let body = json!({"path": dir.to_str().unwrap(), "runtime": "nodejs"});
    let r = d.request(
        "PUT",
        &format!("/functions/{name}"),
        Some("application/json"),
        body.to_string().as_bytes(),
    );
    (r.status, body_json(&r))
}

fn invoke(d: &Daemon, name: &str) -> Value {
    let r = d.invoke(name, "{}");
    assert_eq!(r.status, 200, "invoke {name}: {}", text(&r));
    body_json(&r)
}

/// The names in the cache's `npm/` and `work/` directories.
fn cache_listing(d: &Daemon, sub: &str) -> Vec<String> {
    match std::fs::read_dir(d.data_dir().join("packages").join(sub)) {
        Ok(entries) => entries
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect(),
        Err(_) => Vec::new(),
    }
}

fn v3_lock(with_provided: bool) -> String {
    let mut packages = json!({
        "": {"name": "locked", "version": "1.0.0",
             "dependencies": {"left-pad": "1.3.0", "is-number": "7.0.0", "@m6s/box": "*"}},
        "node_modules/is-number": {"version": "7.0.0",
            "resolved": "https://registry.npmjs.org/is-number/-/is-number-7.0.0.tgz",
            "integrity": IS_NUMBER_INTEGRITY, "license": "MIT", "engines": {"node": ">=0.12.0"}},
        "node_modules/left-pad": {"version": "1.3.0",
            "resolved": "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz",
            "integrity": LEFT_PAD_INTEGRITY, "license": "WTFPL"},
    });
    if with_provided {
        // Never fetched: it is taken out before npm sees the lock.
        packages["node_modules/@m6s/box"] =
            json!({"version": "0.0.1", "resolved": "https://sprout.invalid/box.tgz"});
    }
    json!({"name": "locked", "version": "1.0.0", "lockfileVersion": 3, "requires": true,
           "packages": packages})
    .to_string()
}

#[test]
fn a_node_function_requires_its_npm_packages_with_and_without_a_lock() {
    let env = require_root!();
    let d = env.daemon();

    // Without a lock: `npm install`; `sprout` is in package.json but never fetched.
    let manifest = json!({"name": "unlocked", "version": "1.0.0",
        "dependencies": {"is-number": "7.0.0", "sprout": "*"}});
    let unlocked = env.function(
        "unlocked",
        &[
            ("index.js", WHERE_JS),
            ("package.json", &manifest.to_string()),
        ],
    );
    let (status, body) = register_node(&d, "unlocked", &unlocked);
    assert_eq!(status, 200, "{body}");
    let v = invoke(&d, "unlocked");
    let at = v["is-number"].as_str().unwrap();
    assert!(
        at.starts_with("/deps/npm-") && at.ends_with("/node_modules/is-number/index.js"),
        "is-number comes from the function's packages: {v}"
    );
    assert_eq!(v["isNumber"], true, "{v}");
    assert_eq!(
        v["left-pad"],
        Value::Null,
        "only what package.json asks for: {v}"
    );
    assert_eq!(v["sprout"], "/.sprout/nodejs/sprout.js", "{v}");
    assert_eq!(v["@m6s/box"], "/.sprout/nodejs/box.js", "{v}");
    assert_eq!(v["sproutCall"], "function", "{v}");
    assert_eq!(
        v["writable"], "EROFS",
        "packages are mounted read-only: {v}"
    );
    let s = d.status();
    assert_eq!(s["packages_installed"], 1, "{s}");
    assert_eq!(s["package_cache_hits"], 0, "{s}");
    let entries = cache_listing(&d, "npm");
    let tree = entries
        .iter()
        .find(|e| !e.ends_with(".json"))
        .expect("an npm tree");
    let modules = d
        .data_dir()
        .join("packages/npm")
        .join(tree)
        .join("node_modules");
    assert!(
        modules.join("is-number/package.json").is_file(),
        "{entries:?}"
    );
    assert!(
        !modules.join("sprout").exists(),
        "sprout is never fetched from the registry"
    );

    // With a lock: `npm ci`; a bundled node_modules still wins, as in Node.
    let manifest = json!({"name": "locked", "version": "1.0.0",
        "dependencies": {"left-pad": "1.3.0", "is-number": "7.0.0", "@m6s/box": "*"}});
    let locked = env.function(
        "locked",
        &[
            ("index.js", WHERE_JS),
            ("package.json", &manifest.to_string()),
            ("package-lock.json", &v3_lock(true)),
            (
                "node_modules/is-number/index.js",
                "module.exports = () => 'bundled';\n",
            ),
            (
                "node_modules/@m6s/box/index.js",
                "module.exports = {invoke: 'a bundled box'};\n",
            ),
        ],
    );
    let (status, body) = register_node(&d, "locked", &locked);
    assert_eq!(status, 200, "{body}");
    let v = invoke(&d, "locked");
    assert_eq!(v["leftPad"], "007", "{v}");
    assert!(
        v["left-pad"].as_str().unwrap().starts_with("/deps/npm-"),
        "{v}"
    );
    assert_eq!(
        v["is-number"], "/code/node_modules/is-number/index.js",
        "{v}"
    );
    assert_eq!(v["isNumber"], "bundled", "{v}");
    assert_eq!(
        v["@m6s/box"], "/.sprout/nodejs/box.js",
        "@m6s/box is sprout's even beside a bundled one: {v}"
    );
    assert_eq!(v["boxInvoke"], "function", "{v}");
    let s = d.status();
    assert_eq!(s["packages_installed"], 2, "{s}");
    assert_eq!(cache_listing(&d, "work"), Vec::<String>::new());
}

#[test]
fn functions_with_the_same_manifest_share_one_install() {
    let env = require_root!();
    let d = env.daemon();
    let manifest = json!({"name": "shared", "version": "1.0.0",
        "dependencies": {"left-pad": "1.3.0"}})
    .to_string();
    let code = "exports.main = (e) => require('left-pad')(String(e.n), 4, '0');\n";
    let dirs: Vec<_> = ["one", "two", "three"]
        .iter()
        .map(|n| {
            env.function(
                n,
                &[("index.js", code), ("package.json", manifest.as_str())],
            )
        })
        .collect();
    // Two at once: one installs, the other waits for it.
    std::thread::scope(|s| {
        for (name, dir) in ["one", "two"].iter().zip(&dirs) {
            let d = &d;
            s.spawn(move || {
                let (status, body) = register_node(d, name, dir);
                assert_eq!(status, 200, "{name}: {body}");
            });
        }
    });
    let (status, body) = register_node(&d, "three", &dirs[2]);
    assert_eq!(status, 200, "{body}");
    let s = d.status();
    assert_eq!(s["packages_installed"], 1, "{s}");
    assert_eq!(s["package_cache_hits"], 2, "{s}");
    for name in ["one", "two", "three"] {
        let r = d.invoke(name, r#"{"n": 7}"#);
        assert_eq!(r.status, 200, "{name}: {}", text(&r));
        assert_eq!(body_json(&r), json!("0007"), "{name}");
    }
    let trees: Vec<_> = cache_listing(&d, "npm")
        .into_iter()
        .filter(|e| !e.ends_with(".json"))
        .collect();
    assert_eq!(trees.len(), 1, "{trees:?}");
}

#[test]
fn a_package_that_does_not_exist_fails_registration_with_npms_message() {
    let env = require_root!();
    let d = env.daemon();
    let missing = "sprout-test-no-such-package-7f3a9c";
    let dir = env.function(
        "missing",
        &[
            ("index.js", "exports.main = () => 1;\n"),
            (
                "package.json",
                &json!({"dependencies": {"left-pad": "1.3.0", missing: "1.0.0"}}).to_string(),
            ),
        ],
    );
    let (status, body) = register_node(&d, "missing", &dir);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"]["kind"], "package_error", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains(&format!("{missing}@1.0.0")) && message.contains("E404"),
        "names the package and quotes npm: {message}"
    );
    assert!(message.contains("404 Not Found"), "{message}");
    let r = d.invoke("missing", "{}");
    assert_eq!(r.status, 404, "nothing registered: {}", text(&r));
    assert_eq!(d.status()["packages_installed"], 0);
    assert_eq!(cache_listing(&d, "npm"), Vec::<String>::new());
    assert_eq!(cache_listing(&d, "work"), Vec::<String>::new());
}

#[test]
fn packages_from_anywhere_but_the_registry_are_refused_by_name() {
    let env = require_root!();
    let d = env.daemon();
    let git = "git+https://github.com/stevemao/left-pad.git#v1.3.0";
    // (files, what the message must name)
    type Case<'a> = (Vec<(&'a str, String)>, Vec<&'a str>);
    let cases: Vec<Case> = vec![
        (
            vec![(
                "package.json",
                json!({"dependencies": {"left-pad": git}}).to_string(),
            )],
            vec!["package.json", "\"left-pad\"", git],
        ),
        (
            vec![(
                "package.json",
                json!({"dependencies": {"left-pad": "github:stevemao/left-pad"}}).to_string(),
            )],
            vec!["\"left-pad\"", "github:stevemao/left-pad"],
        ),
        (
            vec![
                (
                    "package.json",
                    json!({"dependencies": {"left-pad": "1.3.0"}}).to_string(),
                ),
                (
                    "package-lock.json",
                    v3_lock(false).replace(
                        "https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz",
                        "https://mirror.example/left-pad-1.3.0.tgz",
                    ),
                ),
            ],
            vec![
                "package-lock.json",
                "node_modules/left-pad",
                "https://mirror.example/left-pad-1.3.0.tgz",
                "https://registry.npmjs.org/",
            ],
        ),
        (
            vec![
                (
                    "package.json",
                    json!({"dependencies": {"left-pad": "1.3.0"}}).to_string(),
                ),
                (
                    "package-lock.json",
                    v3_lock(false).replace(
                        "\"resolved\":\"https://registry.npmjs.org/left-pad/-/left-pad-1.3.0.tgz\"",
                        &format!("\"resolved\":\"{git}\""),
                    ),
                ),
            ],
            vec![
                "package-lock.json",
                "node_modules/left-pad",
                "git dependency",
            ],
        ),
        (
            vec![
                (
                    "package.json",
                    json!({"dependencies": {"left-pad": "1.3.0"}}).to_string(),
                ),
                (
                    "package-lock.json",
                    v3_lock(false)
                        .replace("\"version\":\"1.3.0\"", "\"version\":\"file:../left-pad\""),
                ),
            ],
            vec![
                "package-lock.json",
                "node_modules/left-pad",
                "file:../left-pad",
            ],
        ),
    ];
    for (i, (files, says)) in cases.iter().enumerate() {
        let name = format!("elsewhere{i}");
        let mut files: Vec<(&str, &str)> = files.iter().map(|(f, t)| (*f, t.as_str())).collect();
        files.push(("index.js", "exports.main = () => 1;\n"));
        let dir = env.function(&name, &files);
        let (status, body) = register_node(&d, &name, &dir);
        assert_eq!(status, 400, "{name}: {body}");
        assert_eq!(body["error"]["kind"], "package_error", "{body}");
        let message = body["error"]["message"].as_str().unwrap();
        for s in says {
            assert!(message.contains(s), "{name}: {s:?} in {message}");
        }
    }
    let s = d.status();
    assert_eq!(s["packages_installed"], 0, "refused before installing: {s}");
    assert_eq!(cache_listing(&d, "work"), Vec::<String>::new());
}
