//! The module graph of every sprout crate has no cycles.
//!
//! Each crate's modules are found by following `mod` declarations from its roots
//! (`src/lib.rs`, `src/main.rs`, `src/bin/*.rs`, `src/bin/*/main.rs`). A module file
//! is a node (`a.rs` or `a/mod.rs` is `a`, `a/b.rs` is `a::b`); the roots themselves
//! are the crates' façades and not nodes. A path in a module that names another
//! module (`use crate::a::b::Thing`, `crate::a::f()`, `super::Thing`, `self::b::g`)
//! is an edge to the deepest module it names. Items under `#[cfg(test)]` (test
//! modules, test-only imports) are not part of the product and are skipped. Any
//! strongly connected set of more than one module fails the test, with one path
//! per edge that makes it.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

use syn::visit::Visit;

/// The crates whose module graphs are checked.
const CRATES: &[&str] = &["ipc", "rootfs", "pool", "shim", "agent", "bench", "tests"];

/// One module file.
struct Module {
    /// `a::b`, relative to its crate root.
    path: Vec<String>,
    file: PathBuf,
    /// The directory its `mod x;` children live in.
    child_dir: PathBuf,
}

/// A crate root's module graph: each edge with one path that makes it.
#[derive(Default)]
struct Graph {
    nodes: BTreeSet<String>,
    edges: BTreeMap<(String, String), String>,
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && a.parse_args::<syn::Meta>()
                .is_ok_and(|m| m.path().is_ident("test"))
    })
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    use syn::Item::*;
    match item {
        Const(i) => &i.attrs,
        Enum(i) => &i.attrs,
        ExternCrate(i) => &i.attrs,
        Fn(i) => &i.attrs,
        ForeignMod(i) => &i.attrs,
        Impl(i) => &i.attrs,
        Macro(i) => &i.attrs,
        Mod(i) => &i.attrs,
        Static(i) => &i.attrs,
        Struct(i) => &i.attrs,
        Trait(i) => &i.attrs,
        TraitAlias(i) => &i.attrs,
        Type(i) => &i.attrs,
        Union(i) => &i.attrs,
        Use(i) => &i.attrs,
        _ => &[],
    }
}

/// Removes `#[cfg(test)]` items, at every depth of inline modules.
fn strip_tests(items: &mut Vec<syn::Item>) {
    items.retain(|i| !is_cfg_test(item_attrs(i)));
    for item in items {
        if let syn::Item::Mod(m) = item {
            if let Some((_, inner)) = &mut m.content {
                strip_tests(inner);
            }
        }
    }
}

fn parse(file: &Path) -> syn::File {
    let text = fs::read_to_string(file).unwrap_or_else(|e| panic!("read {}: {e}", file.display()));
    let mut ast =
        syn::parse_file(&text).unwrap_or_else(|e| panic!("parse {}: {e}", file.display()));
    strip_tests(&mut ast.items);
    ast
}

/// The module files reachable from a root by `mod x;` declarations.
fn modules(root: &Path) -> Vec<Module> {
    let mut out = Vec::new();
    let mut todo = vec![Module {
        path: Vec::new(),
        file: root.to_path_buf(),
        child_dir: root.parent().unwrap().to_path_buf(),
    }];
    while let Some(m) = todo.pop() {
        for item in parse(&m.file).items {
            let syn::Item::Mod(decl) = item else { continue };
            if decl.content.is_some() {
                continue;
            }
            let name = decl.ident.to_string();
            let flat = m.child_dir.join(format!("{name}.rs"));
            let dir = m.child_dir.join(&name);
            let (file, child_dir) = if flat.is_file() {
                (flat, dir)
            } else {
                (dir.join("mod.rs"), dir)
            };
            assert!(
                file.is_file(),
                "module {name} of {} not found",
                m.file.display()
            );
            let mut path = m.path.clone();
            path.push(name);
            todo.push(Module {
                path,
                file,
                child_dir,
            });
        }
        if !m.path.is_empty() {
            out.push(m);
        }
    }
    out
}

/// Collects the paths (as segment lists, `use` trees flattened) a module names;
/// `pub use` re-exports are kept apart (a façade re-exporting its own children does
/// not depend on them).
#[derive(Default)]
struct Paths {
    uses: Vec<Vec<String>>,
    reexports: Vec<Vec<String>>,
}

impl Paths {
    fn tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => {
                let mut full = prefix.clone();
                full.push(n.ident.to_string());
                self.uses.push(full);
            }
            syn::UseTree::Rename(r) => {
                let mut full = prefix.clone();
                full.push(r.ident.to_string());
                self.uses.push(full);
            }
            syn::UseTree::Glob(_) => self.uses.push(prefix.clone()),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.tree(prefix, t);
                }
            }
        }
    }
}

impl<'ast> Visit<'ast> for Paths {
    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        let start = self.uses.len();
        self.tree(&mut Vec::new(), &u.tree);
        if !matches!(u.vis, syn::Visibility::Inherited) {
            let exported = self.uses.split_off(start);
            self.reexports.extend(exported);
        }
    }

    fn visit_path(&mut self, p: &'ast syn::Path) {
        self.uses
            .push(p.segments.iter().map(|s| s.ident.to_string()).collect());
        syn::visit::visit_path(self, p);
    }

    // `pub(super)`, `pub(in crate::a)` say who may see an item, not what it uses.
    fn visit_visibility(&mut self, _: &'ast syn::Visibility) {}

    fn visit_macro(&mut self, m: &'ast syn::Macro) {
        // Paths inside macro calls (`format!("{}", crate::X)`, `matches!(…)`) are
        // tokens to syn: read them as expressions where they parse.
        if let Ok(args) = m.parse_body_with(
            syn::punctuated::Punctuated::<syn::Expr, syn::Token![,]>::parse_terminated,
        ) {
            for e in &args {
                self.visit_expr(e);
            }
        }
        syn::visit::visit_macro(self, m);
    }
}

/// The deepest module of `known` that `path` (as written in module `from`) names.
fn target(from: &[String], path: &[String], known: &BTreeSet<String>) -> Option<String> {
    let mut abs: Vec<String> = match path.first().map(String::as_str) {
        Some("crate") => Vec::new(),
        Some("super") | Some("self") => from.to_vec(),
        // A path starting at a child module (`use conn::Conn` in `http`).
        Some(first) if known.contains(&[from, &[first.to_owned()]].concat().join("::")) => {
            from.to_vec()
        }
        _ => return None,
    };
    let mut rest = if path[0] == "crate" { &path[1..] } else { path };
    while let Some(first) = rest.first() {
        match first.as_str() {
            "super" => {
                abs.pop()?;
            }
            "self" => {}
            _ => break,
        }
        rest = &rest[1..];
    }
    abs.extend(rest.iter().cloned());
    (1..=abs.len())
        .rev()
        .map(|n| abs[..n].join("::"))
        .find(|m| known.contains(m))
}

fn graph(root: &Path) -> Graph {
    let mods = modules(root);
    let mut g = Graph {
        nodes: mods.iter().map(|m| m.path.join("::")).collect(),
        ..Graph::default()
    };
    for m in &mods {
        let from = m.path.join("::");
        let mut paths = Paths::default();
        paths.visit_file(&parse(&m.file));
        let reexports = paths.reexports.into_iter().map(|p| (p, true));
        for (p, reexport) in paths.uses.into_iter().map(|p| (p, false)).chain(reexports) {
            if let Some(to) = target(&m.path, &p, &g.nodes) {
                let own_child = to.starts_with(&format!("{from}::"));
                if to != from && !(reexport && own_child) {
                    g.edges
                        .entry((from.clone(), to))
                        .or_insert_with(|| p.join("::"));
                }
            }
        }
    }
    g
}

/// Strongly connected sets of more than one module (Tarjan).
fn cycles(g: &Graph) -> Vec<Vec<String>> {
    struct State<'a> {
        g: &'a Graph,
        index: BTreeMap<&'a str, usize>,
        low: BTreeMap<&'a str, usize>,
        stack: Vec<&'a str>,
        on_stack: BTreeSet<&'a str>,
        out: Vec<Vec<String>>,
    }
    fn connect<'a>(s: &mut State<'a>, v: &'a str) {
        let i = s.index.len();
        s.index.insert(v, i);
        s.low.insert(v, i);
        s.stack.push(v);
        s.on_stack.insert(v);
        let next: Vec<&'a str> =
            s.g.edges
                .keys()
                .filter(|(a, _)| a == v)
                .map(|(_, b)| b.as_str())
                .collect();
        for w in next {
            if !s.index.contains_key(w) {
                connect(s, w);
                let lw = s.low[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(lw);
            } else if s.on_stack.contains(w) {
                let iw = s.index[w];
                let lv = s.low.get_mut(v).unwrap();
                *lv = (*lv).min(iw);
            }
        }
        if s.low[v] == s.index[v] {
            let mut scc = Vec::new();
            loop {
                let w = s.stack.pop().unwrap();
                s.on_stack.remove(w);
                scc.push(w.to_owned());
                if w == v {
                    break;
                }
            }
            if scc.len() > 1 {
                scc.sort();
                s.out.push(scc);
            }
        }
    }
    let mut s = State {
        g,
        index: BTreeMap::new(),
        low: BTreeMap::new(),
        stack: Vec::new(),
        on_stack: BTreeSet::new(),
        out: Vec::new(),
    };
    for v in &g.nodes {
        if !s.index.contains_key(v.as_str()) {
            connect(&mut s, v);
        }
    }
    s.out
}

/// Every crate root of the crate in `dir`.
fn roots(dir: &Path) -> Vec<PathBuf> {
    let src = dir.join("src");
    let mut roots: Vec<PathBuf> = ["lib.rs", "main.rs"]
        .iter()
        .map(|f| src.join(f))
        .filter(|p| p.is_file())
        .collect();
    if let Ok(bins) = fs::read_dir(src.join("bin")) {
        for e in bins.flatten() {
            let p = e.path();
            if p.extension().is_some_and(|x| x == "rs") {
                roots.push(p);
            } else if p.join("main.rs").is_file() {
                roots.push(p.join("main.rs"));
            }
        }
    }
    roots
}

/// The cycles of every root of the crate in `dir`, described.
fn report(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    for root in roots(dir) {
        let g = graph(&root);
        for scc in cycles(&g) {
            let members: BTreeSet<&String> = scc.iter().collect();
            let why: Vec<String> = g
                .edges
                .iter()
                .filter(|((a, b), _)| members.contains(a) && members.contains(b))
                .map(|((a, b), p)| format!("{a} -> {b} (names {p})"))
                .collect();
            found.push(format!(
                "{}: cycle among {{{}}}:\n    {}",
                root.display(),
                scc.join(", "),
                why.join("\n    ")
            ));
        }
    }
    found
}

fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

#[test]
fn no_crate_has_an_import_cycle_among_its_modules() {
    let mut found = Vec::new();
    let mut checked = 0;
    for c in CRATES {
        let dir = workspace().join(c);
        checked += roots(&dir)
            .iter()
            .map(|r| graph(r).nodes.len())
            .sum::<usize>();
        found.extend(report(&dir));
    }
    // The check saw the modules it is meant to check.
    assert!(checked > 40, "only {checked} modules found");
    assert!(found.is_empty(), "import cycles:\n{}", found.join("\n"));
}

/// A crate written for the test, in a temporary directory.
fn fake_crate(files: &[(&str, &str)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for (path, text) in files {
        let p = dir.path().join("src").join(path);
        fs::create_dir_all(p.parent().unwrap()).unwrap();
        fs::write(p, text).unwrap();
    }
    dir
}

#[test]
fn the_check_finds_a_cycle_through_use_lines_paths_super_and_macros() {
    let cases: &[&[(&str, &str)]] = &[
        // `use` both ways.
        &[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "use crate::b::B; pub struct A;"),
            ("b.rs", "use crate::{a::A, c}; pub struct B;"),
        ],
        // A path in an expression one way, a macro argument the other.
        &[
            ("lib.rs", "mod a; mod b;"),
            ("a.rs", "pub fn f() { crate::b::g() }"),
            ("b.rs", "pub fn g() { println!(\"{}\", crate::a::X); }"),
        ],
        // A child naming its parent with `super::`, the parent its child.
        &[
            ("lib.rs", "mod http;"),
            (
                "http/mod.rs",
                "mod conn; use conn::Conn; pub struct Limits;",
            ),
            ("http/conn.rs", "use super::Limits; pub struct Conn;"),
        ],
    ];
    for files in cases {
        let dir = fake_crate(files);
        let found = report(dir.path());
        assert_eq!(found.len(), 1, "{files:?}: {found:?}");
    }
}

#[test]
fn a_facade_re_exporting_its_children_is_not_a_cycle() {
    let dir = fake_crate(&[
        ("lib.rs", "mod http;"),
        (
            "http/mod.rs",
            "mod conn; mod limits; pub use conn::Conn; pub(crate) use limits::Limits;",
        ),
        ("http/conn.rs", "use super::Limits; pub(super) struct Conn;"),
        ("http/limits.rs", "pub struct Limits;"),
    ]);
    assert_eq!(report(dir.path()), Vec::<String>::new());
}

#[test]
fn test_only_code_and_one_way_edges_are_not_cycles() {
    let dir = fake_crate(&[
        ("lib.rs", "mod a; mod b;"),
        ("a.rs", "use crate::b::B; pub struct A;"),
        (
            "b.rs",
            "pub struct B;\n#[cfg(test)]\nmod tests { use crate::a::A; }\n#[cfg(test)]\nuse crate::a::A;",
        ),
    ]);
    assert_eq!(report(dir.path()), Vec::<String>::new());
}
