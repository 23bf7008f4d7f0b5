//! The route map and `docs/openapi.yaml` agree: every route the router knows is in
//! the file, with the same methods and the same planned marks, and every path and
//! method in the file is routed (a planned one to its 501). The file is read with a
//! line scan of its `paths:` section (paths at two spaces, methods at four,
//! `x-sprout-planned` at six), which the file keeps to.

use std::collections::BTreeSet;

use super::routes::{match_path, route, ROUTES};

const OPENAPI: &str = include_str!("../../../docs/openapi.yaml");

const METHODS: &[&str] = &[
    "get", "put", "post", "delete", "patch", "head", "options", "trace",
];

/// An operation: method (upper case), path pattern, and what it is planned for.
type Operation = (String, String, Option<String>);

/// The operations the file describes.
fn described() -> BTreeSet<Operation> {
    let mut ops = BTreeSet::new();
    let mut in_paths = false;
    let mut path: Option<&str> = None;
    let mut current: Option<(String, String, Option<String>)> = None;
    let flush = |op: &mut Option<Operation>, ops: &mut BTreeSet<Operation>| {
        if let Some(op) = op.take() {
            assert!(ops.insert(op.clone()), "{op:?} is described twice");
        }
    };
    for line in OPENAPI.lines() {
        if !line.starts_with(' ') && !line.is_empty() && !line.starts_with('#') {
            flush(&mut current, &mut ops);
            in_paths = line == "paths:";
            continue;
        }
        if !in_paths {
            continue;
        }
        if let Some(p) = line.strip_prefix("  /").and_then(|l| l.strip_suffix(':')) {
            flush(&mut current, &mut ops);
            path = Some(&line[2..2 + 1 + p.len()]);
        } else if let Some(m) = line.strip_prefix("    ").and_then(|l| l.strip_suffix(':')) {
            if METHODS.contains(&m) {
                flush(&mut current, &mut ops);
                let path = path.expect("a method outside a path");
                current = Some((m.to_ascii_uppercase(), path.to_owned(), None));
            }
        } else if let Some(what) = line.strip_prefix("      x-sprout-planned: ") {
            let op = current
                .as_mut()
                .expect("x-sprout-planned outside an operation");
            op.2 = Some(what.trim_matches('"').to_owned());
        }
    }
    flush(&mut current, &mut ops);
    ops
}

/// The operations the router knows.
fn routed() -> BTreeSet<Operation> {
    let mut ops = BTreeSet::new();
    for r in ROUTES {
        for (method, _) in r.ops {
            // Every route is served: none is planned (x-sprout-planned) today.
            let op = ((*method).to_owned(), r.path.to_owned(), None);
            assert!(ops.insert(op.clone()), "{op:?} is routed twice");
        }
    }
    ops
}

/// A path that a pattern matches.
fn sample(pattern: &str) -> String {
    pattern
        .replace("{ns}", "t")
        .replace("{pkg}", "p")
        .replace("{name}", "f")
        .replace("{id}", "0123456789abcdef0123456789abcdef")
        .replace("{path}", "a/b")
}

#[test]
fn every_route_is_described_and_everything_described_is_routed() {
    let described = described();
    let routed = routed();
    assert!(described.len() > 30, "the line scan found {described:?}");
    let missing: Vec<_> = routed.difference(&described).collect();
    assert!(
        missing.is_empty(),
        "routed, not in docs/openapi.yaml: {missing:?}"
    );
    let unrouted: Vec<_> = described.difference(&routed).collect();
    assert!(
        unrouted.is_empty(),
        "in docs/openapi.yaml, not routed: {unrouted:?}"
    );
}

#[test]
fn every_described_operation_reaches_its_route() {
    for (method, pattern, planned) in described() {
        let path = sample(&pattern);
        match (route(&method, &path, None), planned) {
            (Ok(_), None) => {}
            (Err(r), Some(what)) => {
                assert_eq!(
                    (r.status, r.kind),
                    (501, "not_implemented"),
                    "{method} {path}"
                );
                assert!(r.message.contains(&what), "{method} {path}: {}", r.message);
            }
            (other, planned) => panic!("{method} {path} (planned: {planned:?}): {other:?}"),
        }
    }
}

#[test]
fn the_table_is_consistent() {
    for r in ROUTES {
        let methods: Vec<&str> = r.ops.iter().map(|(m, _)| *m).collect();
        assert_eq!(r.allow, methods.join(", "), "{}", r.path);
        // No other pattern matches this one's paths: the table's order does not matter.
        let path = sample(r.path);
        for other in ROUTES.iter().filter(|o| o.path != r.path) {
            assert!(
                match_path(other.path, &path).is_none(),
                "{path} matches {} too",
                other.path
            );
        }
    }
    for unknown in [
        "/nope",
        "/api/v1/nope",
        "/run",
        "/namespaces/t/usage/x",
        "/ping/x",
    ] {
        assert_eq!(
            route("GET", unknown, None).unwrap_err().status,
            404,
            "{unknown}"
        );
    }
}
