use std::sync::atomic::AtomicUsize;

use super::*;

/// An installer that "installs" by writing a module named after the package, and
/// counts the sandboxes it made.
#[derive(Debug, Default)]
struct Fake {
    sandboxes: Arc<AtomicUsize>,
    /// What `resolve` answers.
    resolved: Value,
    /// Packages whose install fails.
    failing: Vec<String>,
    /// How long an install takes.
    delay: Duration,
    /// Sessions alive now, and the most alive at once.
    live: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

struct FakeSession {
    live: Arc<AtomicUsize>,
    out: PathBuf,
    resolved: Value,
    failing: Vec<String>,
    delay: Duration,
}

impl Installer for Fake {
    fn start(&self, out: &Path, _: &InstallLimits) -> Result<Box<dyn Session>, Error> {
        self.sandboxes.fetch_add(1, Ordering::SeqCst);
        let now = self.live.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Ok(Box::new(FakeSession {
            live: self.live.clone(),
            out: out.to_path_buf(),
            resolved: self.resolved.clone(),
            failing: self.failing.clone(),
            delay: self.delay,
        }))
    }
}

impl Drop for FakeSession {
    fn drop(&mut self) {
        self.live.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Session for FakeSession {
    fn exchange(&mut self, request: &Value) -> Result<Value, Error> {
        match request["op"].as_str().unwrap() {
            "resolve" => {
                std::thread::sleep(self.delay);
                Ok(self.resolved.clone())
            }
            "install" => {
                std::thread::sleep(self.delay);
                let name = request["name"].as_str().unwrap();
                if self.failing.iter().any(|f| f == name) {
                    // A failed install may leave files behind in its work dir.
                    std::fs::create_dir_all(self.out.join("files/half")).unwrap();
                    return Ok(
                        json!({"op": "failed", "message": format!("ERROR: No matching distribution found for {name}")}),
                    );
                }
                let files = self.out.join(request["dir"].as_str().unwrap());
                std::fs::create_dir_all(files.join(name)).unwrap();
                std::fs::write(files.join(name).join("__init__.py"), "v = 1\n").unwrap();
                Ok(json!({"op": "installed"}))
            }
            "npm" => {
                let files = self.out.join(request["dir"].as_str().unwrap());
                let deps = request["manifest"]["dependencies"].as_object().unwrap();
                if let Some(name) = deps.keys().find(|n| self.failing.contains(n)) {
                    std::fs::create_dir_all(files.join("node_modules/half")).unwrap();
                    return Ok(
                        json!({"op": "failed", "message": format!("npm error 404 Not Found - GET https://registry.npmjs.org/{name}")}),
                    );
                }
                std::fs::create_dir_all(files.join("node_modules/left-pad")).unwrap();
                std::fs::write(files.join("node_modules/left-pad/index.js"), "").unwrap();
                Ok(json!({"op": "installed"}))
            }
            op => panic!("unexpected {op}"),
        }
    }
}

fn pin(name: &str, version: &str, hash: char) -> Value {
    json!({"name": name, "version": version, "sha256": hash.to_string().repeat(64)})
}

fn resolved(pins: &[Value]) -> Value {
    json!({"op": "resolved", "abi": "cpython-311-x86_64", "packages": pins})
}

fn packages(dir: &Path, fake: Fake) -> Packages {
    Packages::open(
        &dir.join("packages"),
        Box::new(fake),
        InstallLimits::default(),
        Sources::default(),
        "1",
    )
}

#[test]
fn installs_each_package_once_in_a_sandbox_of_its_own_then_hits_the_cache() {
    let tmp = tempfile::tempdir().unwrap();
    let sandboxes = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        sandboxes: sandboxes.clone(),
        resolved: resolved(&[pin("Jinja2", "3.1.6", 'a'), pin("MarkupSafe", "3.0.2", 'b')]),
        ..Fake::default()
    };
    let p = packages(tmp.path(), fake);
    let deps = p.python("f", &["jinja2>=2.10.3".into()]).unwrap();
    assert_eq!(deps.pins(), ["Jinja2==3.1.6", "MarkupSafe==3.0.2"]);
    assert_eq!(
        deps.packages[0].entry.key,
        format!("jinja2-3.1.6-cpython-311-x86_64-{}", "a".repeat(32))
    );
    assert_eq!(deps.packages[0].entry.modules, ["Jinja2"]);
    assert_eq!(
        deps.import_paths()[1],
        format!(
            "/deps/markupsafe-3.0.2-cpython-311-x86_64-{}",
            "b".repeat(32)
        )
    );
    assert!(deps.packages[0].dir.join("Jinja2/__init__.py").is_file());
    // One sandbox resolved, one per package installed.
    assert_eq!(sandboxes.load(Ordering::SeqCst), 3);
    assert_eq!((p.installed(), p.cache_hits()), (2, 0));
    let again = p.python("g", &["jinja2".into()]).unwrap();
    assert_eq!(again, deps);
    assert_eq!(sandboxes.load(Ordering::SeqCst), 4, "only resolved");
    assert_eq!((p.installed(), p.cache_hits()), (2, 2));
    // Nothing is left in the work area.
    assert_eq!(std::fs::read_dir(p.cache.work_root()).unwrap().count(), 0);
}

#[test]
fn two_versions_coexist_and_a_different_archive_is_a_different_entry() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("packages");
    for (version, hash) in [("2.1.3", 'a'), ("2.2.0", 'b'), ("2.2.0", 'c')] {
        let fake = Fake {
            resolved: resolved(&[pin("numpy", version, hash)]),
            ..Fake::default()
        };
        let p = Packages::open(
            &root,
            Box::new(fake),
            InstallLimits::default(),
            Sources::default(),
            "1",
        );
        p.python("f", &["numpy".into()]).unwrap();
        assert_eq!(p.installed(), 1);
    }
    let p = packages(tmp.path(), Fake::default());
    assert_eq!(p.list(&[]).unwrap().len(), 3);
}

#[test]
fn concurrent_registrations_install_a_shared_package_once() {
    let tmp = tempfile::tempdir().unwrap();
    let sandboxes = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        sandboxes: sandboxes.clone(),
        resolved: resolved(&[pin("requests", "2.32.3", 'a')]),
        delay: Duration::from_millis(300),
        ..Fake::default()
    };
    let p = packages(tmp.path(), fake);
    let results: Vec<_> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..3)
            .map(|i| {
                let p = &p;
                s.spawn(move || p.python(&format!("f{i}"), &["requests".into()]))
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    for r in &results {
        assert_eq!(r.as_ref().unwrap().pins(), ["requests==2.32.3"]);
    }
    assert_eq!(p.installed(), 1);
    assert_eq!(p.cache_hits(), 2);
    assert_eq!(
        sandboxes.load(Ordering::SeqCst),
        4,
        "three resolutions, one install"
    );
}

#[test]
fn a_failed_install_names_the_package_quotes_the_installer_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake {
        resolved: resolved(&[pin("good", "1.0", 'a'), pin("nonexistent-pkg", "1.0", 'b')]),
        failing: vec!["nonexistent-pkg".into()],
        ..Fake::default()
    };
    let p = packages(tmp.path(), fake);
    let e = p
        .python("f", &["good".into(), "nonexistent-pkg".into()])
        .unwrap_err();
    assert!(e.is_bad_request());
    let e = e.to_string();
    assert!(e.contains("nonexistent-pkg==1.0"), "{e}");
    assert!(e.contains("No matching distribution"), "{e}");
    let keys: Vec<_> = p.list(&[]).unwrap().into_iter().map(|l| l.name).collect();
    assert_eq!(keys, ["good"], "only the complete install is cached");
    assert_eq!(std::fs::read_dir(p.cache.work_root()).unwrap().count(), 0);
}

#[test]
fn a_resolution_failure_is_the_installers_message() {
    let tmp = tempfile::tempdir().unwrap();
    let fake = Fake {
        resolved: json!({"op": "failed", "message": "ERROR: Could not find a version that satisfies the requirement nope"}),
        ..Fake::default()
    };
    let e = packages(tmp.path(), fake)
        .python("f", &["nope".into()])
        .unwrap_err()
        .to_string();
    assert!(
        e.starts_with("could not resolve the requirements: ERROR: Could not find"),
        "{e}"
    );
}

#[test]
fn hostile_resolutions_are_refused() {
    let tmp = tempfile::tempdir().unwrap();
    for answer in [
        resolved(&[pin("../../etc", "1", 'a')]),
        resolved(&[pin("ok", "1/../x", 'a')]),
        resolved(&[json!({"name": "ok", "version": "1", "sha256": "zz"})]),
        json!({"op": "resolved", "abi": "../x", "packages": []}),
        json!({"op": "resolved", "abi": "cp311"}),
        json!({"op": "whatever"}),
        resolved(&vec![pin("a", "1", 'a'); MAX_PINS + 1]),
    ] {
        let fake = Fake {
            resolved: answer.clone(),
            ..Fake::default()
        };
        let e = packages(tmp.path(), fake)
            .python("f", &["x".into()])
            .unwrap_err();
        assert!(matches!(e, Error::Installer { .. }), "{answer}: {e}");
    }
}

#[test]
fn npm_trees_are_keyed_by_lock_or_manifest_and_unused_ones_collected() {
    let tmp = tempfile::tempdir().unwrap();
    let p = packages(tmp.path(), Fake::default());
    let manifest = json!({"name": "f", "version": "1.0.0", "dependencies": {"left-pad": "1.3.0"}});
    let a = p.npm("f", &manifest, None).unwrap();
    assert_eq!(
        a.import_paths(),
        [format!("/deps/{}/node_modules", a.packages[0].entry.key)]
    );
    let b = p.npm("g", &manifest, None).unwrap();
    assert_eq!(a, b);
    assert_eq!((p.installed(), p.cache_hits()), (1, 1));
    let locked = p
        .npm("h", &manifest, Some(&json!({"lockfileVersion": 3})))
        .unwrap();
    assert_ne!(locked.packages[0].entry.key, a.packages[0].entry.key);
    let users = vec![(
        "default/f".to_owned(),
        vec![a.packages[0].entry.key.clone()],
    )];
    let listed = p.list(&users).unwrap();
    assert_eq!(listed.len(), 2);
    assert!(listed.iter().any(|l| l.users == ["default/f"]));
    let in_use = a.keys().map(str::to_owned).collect();
    let removed = p.remove_unused(|| in_use).unwrap();
    assert_eq!(removed.len(), 1);
    assert_eq!(removed[0].key, locked.packages[0].entry.key);
    assert_eq!(p.list(&[]).unwrap().len(), 1);
}

#[test]
fn a_failed_npm_install_names_the_dependencies_and_leaves_nothing() {
    let tmp = tempfile::tempdir().unwrap();
    let p = packages(
        tmp.path(),
        Fake {
            failing: vec!["nope".into()],
            ..Fake::default()
        },
    );
    let manifest = json!({"name": "f", "version": "1.0.0",
        "dependencies": {"left-pad": "1.3.0", "nope": "^2"}});
    let e = p.npm("f", &manifest, None).unwrap_err().to_string();
    assert!(
        e.contains("left-pad@1.3.0, nope@^2") && e.contains("404 Not Found - GET"),
        "{e}"
    );
    assert_eq!(p.installed(), 0);
    assert!(p.list(&[]).unwrap().is_empty());
    let work: Vec<_> = std::fs::read_dir(tmp.path().join("packages/work"))
        .unwrap()
        .collect();
    assert!(work.is_empty(), "{work:?}");
}

#[test]
fn a_cache_others_can_write_is_refused_on_every_use_not_only_the_first() {
    let tmp = tempfile::tempdir().unwrap();
    let root = tmp.path().join("packages");
    std::fs::create_dir(&root).unwrap();
    std::fs::set_permissions(&root, std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let sandboxes = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        sandboxes: sandboxes.clone(),
        resolved: resolved(&[pin("six", "1.16.0", 'a')]),
        ..Fake::default()
    };
    let p = Packages::open(
        &root,
        Box::new(fake),
        InstallLimits::default(),
        Sources::default(),
        "1",
    );
    for _ in 0..2 {
        let e = p.python("f", &["six".into()]).unwrap_err();
        assert!(matches!(e, Error::Cache { .. }), "{e}");
    }
    assert_eq!(sandboxes.load(Ordering::SeqCst), 0, "no install ran");
}

#[test]
fn at_most_two_install_sandboxes_run_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let peak = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        resolved: resolved(&[pin("a", "1", 'a')]),
        delay: Duration::from_millis(200),
        peak: peak.clone(),
        ..Fake::default()
    };
    let p = packages(tmp.path(), fake);
    std::thread::scope(|s| {
        let hs: Vec<_> = (0..5)
            .map(|i| {
                let p = &p;
                s.spawn(move || p.python(&format!("f{i}"), &["a".into()]))
            })
            .collect();
        for h in hs {
            h.join().unwrap().unwrap();
        }
    });
    assert_eq!(p.installed(), 1);
    assert_eq!(peak.load(Ordering::SeqCst), MAX_INSTALL_SANDBOXES);
}

/// At a restart a function's packages are attached from its stored entries: no
/// resolve, cached ones hit, a missing one installed from its pin under its key.
#[test]
fn reattaching_resolves_nothing_and_installs_only_what_the_cache_lost() {
    let tmp = tempfile::tempdir().unwrap();
    let sandboxes = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        sandboxes: sandboxes.clone(),
        resolved: resolved(&[pin("Jinja2", "3.1.6", 'a'), pin("MarkupSafe", "3.0.2", 'b')]),
        ..Fake::default()
    };
    let p = packages(tmp.path(), fake);
    let deps = p.python("f", &["jinja2".into()]).unwrap();
    // Resolve, and one install each.
    assert_eq!(sandboxes.load(Ordering::SeqCst), 3);
    let entries: Vec<Entry> = deps.packages.iter().map(|p| p.entry.clone()).collect();

    // A new agent on the same cache: both cached, no sandbox at all.
    let sandboxes = Arc::new(AtomicUsize::new(0));
    let fake = Fake {
        sandboxes: sandboxes.clone(),
        resolved: json!({"op": "failed", "message": "resolving again"}),
        ..Fake::default()
    };
    let p = packages(tmp.path(), fake);
    let again = p.reattach("f", &entries).unwrap();
    assert_eq!(again, deps);
    assert_eq!(sandboxes.load(Ordering::SeqCst), 0);
    assert_eq!(p.cache_hits(), 2);

    // The cache lost MarkupSafe: installed again from its pin, under the same key.
    p.cache.remove(Kind::Python, &entries[1].key).unwrap();
    let again = p.reattach("f", &entries).unwrap();
    assert_eq!(again.pins(), ["Jinja2==3.1.6", "MarkupSafe==3.0.2"]);
    assert_eq!(
        again.keys().collect::<Vec<_>>(),
        deps.keys().collect::<Vec<_>>()
    );
    assert_eq!(sandboxes.load(Ordering::SeqCst), 1);
    assert_eq!(p.installed(), 1);

    // A stored key that is not one plain name is refused.
    let mut bad = entries.clone();
    bad[0].key = "../../etc".into();
    let e = ipc::chain(&p.reattach("f", &bad).unwrap_err());
    assert!(e.contains("is not a cache key"), "{e}");
}
