//! A hostile tenant's function archives (`PUT /functions/{name}` with
//! `application/x-tar`): an archive has limits (depth, path length, entries, total
//! size, time), holds only regular files and directories under relative paths, and a
//! refused one gets a 400 naming what it broke and leaves nothing behind.

use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use sprout_tests::{
    body_json, json, require_root, tar_dir, text, Client, ClientResponse, Daemon, Env,
};
use tar::{EntryType, Header};

/// How long a refusal may take on a loaded machine: a bound that catches the
/// finding (one path 2,000 directories deep cost about 70 s of CPU), not a speed
/// check. Alone each takes well under a second here; 10,001 entries took over 5 s
/// once in CI with the whole suite running beside it.
const ANSWER_WITHIN: Duration = Duration::from_secs(20);

/// Where the daemon unpacks archives: `<data dir>/code`.
fn functions_dir(_env: &Env, d: &Daemon) -> PathBuf {
    d.data_dir().join("code")
}

/// The unpacked directories of function `name` (`<name>-<version>`).
fn unpacked(env: &Env, d: &Daemon, name: &str) -> Vec<String> {
    let prefix = format!("{name}-");
    match fs::read_dir(functions_dir(env, d)) {
        Ok(dir) => dir
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .filter(|n| n.starts_with(&prefix))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => panic!("read {}: {e}", functions_dir(env, d).display()),
    }
}

/// `PUT /functions/{name}` with `archive`; fails the test when there is no answer
/// within `within` (the request is left to the daemon, which is stopped at the end).
fn put_archive(d: &Daemon, name: &str, archive: Vec<u8>, within: Duration) -> ClientResponse {
    let (tx, rx) = mpsc::channel();
    let socket = d.socket().to_path_buf();
    let path = format!("/functions/{name}");
    let len = archive.len();
    thread::spawn(move || {
        let r = Client::connect(&socket)
            .and_then(|mut c| c.request("PUT", &path, Some("application/x-tar"), &archive));
        let _ = tx.send(r.map_err(|e| ipc::chain(&e)));
    });
    match rx.recv_timeout(within) {
        Ok(Ok(r)) => r,
        Ok(Err(e)) => panic!("PUT /functions/{name}: {e}; daemon log:\n{}", d.log()),
        Err(_) => {
            panic!("PUT /functions/{name} with a {len}-byte archive: no answer within {within:?}")
        }
    }
}

/// Uploads `archive` as `name`, expects a 400 `invalid_function` whose message holds
/// each of `texts`, and checks that nothing of it is registered or left on disk.
#[track_caller]
fn assert_refused(env: &Env, d: &Daemon, name: &str, archive: Vec<u8>, texts: &[&str]) {
    let r = put_archive(d, name, archive, ANSWER_WITHIN);
    assert_eq!(r.status, 400, "{name}: {}", text(&r));
    let err = &body_json(&r)["error"];
    assert_eq!(err["kind"], "invalid_function", "{name}: {err}");
    let message = err["message"].as_str().unwrap_or_default();
    for t in texts {
        assert!(message.contains(t), "{name}: {t:?} not in {message:?}");
    }
    let listed = body_json(&d.request("GET", "/functions", None, b""));
    assert!(
        listed.as_array().unwrap().iter().all(|f| f["name"] != name),
        "{name} is registered after a refusal: {listed}"
    );
    assert_eq!(
        unpacked(env, d, name),
        Vec::<String>::new(),
        "{name}: a refused archive left its directory in {}",
        functions_dir(env, d).display()
    );
}

/// One entry of a hand-made archive.
struct Entry<'a> {
    path: &'a str,
    kind: EntryType,
    data: &'a [u8],
    link: Option<&'a str>,
}

fn file<'a>(path: &'a str, data: &'a [u8]) -> Entry<'a> {
    Entry {
        path,
        kind: EntryType::Regular,
        data,
        link: None,
    }
}

/// An archive with GNU headers: paths over 100 bytes travel as GNU long names, as
/// GNU tar writes them. Paths are written as given, `..` and leading `/` included.
fn archive(entries: &[Entry]) -> Vec<u8> {
    let mut out = Vec::new();
    for e in entries {
        let name = e.path.as_bytes();
        if name.len() > 100 {
            let mut h = Header::new_gnu();
            h.as_mut_bytes()[..13].copy_from_slice(b"././@LongLink");
            h.set_entry_type(EntryType::GNULongName);
            h.set_size(name.len() as u64 + 1);
            h.set_mode(0o644);
            h.set_cksum();
            out.extend_from_slice(h.as_bytes());
            let mut long = name.to_vec();
            long.push(0);
            pad(&mut long);
            out.extend_from_slice(&long);
        }
        let mut h = Header::new_gnu();
        let short = &name[..name.len().min(100)];
        h.as_mut_bytes()[..short.len()].copy_from_slice(short);
        h.set_entry_type(e.kind);
        h.set_size(e.data.len() as u64);
        h.set_mode(if e.kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        if let Some(link) = e.link {
            h.set_link_name(link).unwrap();
        }
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
        let mut data = e.data.to_vec();
        pad(&mut data);
        out.extend_from_slice(&data);
    }
    out.extend_from_slice(&[0; 1024]);
    out
}

fn pad(v: &mut Vec<u8>) {
    v.resize(v.len().div_ceil(512) * 512, 0);
}

const F_PY: &[u8] = b"def f(event):\n    return 'should never run'\n";

#[test]
fn a_tar_with_one_path_2000_directories_deep_is_refused_at_once() {
    let env = require_root!();
    let d = env.daemon();

    let deep = format!("{}f.py", "a/".repeat(1999));
    let bytes = archive(&[file("f.py", F_PY), file(&deep, b"x")]);
    assert!(bytes.len() <= 10 << 10, "{} bytes", bytes.len());

    let started = Instant::now();
    let (tx, rx) = mpsc::channel();
    thread::scope(|s| {
        s.spawn(|| {
            let r = put_archive(&d, "deep", bytes, ANSWER_WITHIN);
            let _ = tx.send(started.elapsed());
            assert_eq!(r.status, 400, "{}", text(&r));
            let err = &body_json(&r)["error"];
            assert_eq!(err["kind"], "invalid_function", "{err}");
            let message = err["message"].as_str().unwrap();
            eprintln!("refused: {message}");
            assert!(
                message.contains(&format!(
                    "archive entry \"{}…\" is 2000 levels deep (at most 32)",
                    &"a/".repeat(32)
                )),
                "{message}"
            );
        });
        // The daemon answers others meanwhile.
        let status = d.status();
        assert_eq!(status["functions"], json!(0), "{status}");
    });
    let took = rx.recv().unwrap();
    eprintln!("2000-deep archive refused in {took:?}");

    assert_eq!(unpacked(&env, &d, "deep"), Vec::<String>::new());
    assert_eq!(d.status()["functions"], json!(0));
}

#[test]
fn too_many_entries_a_too_long_path_links_and_escapes_are_refused() {
    let env = require_root!();
    let d = env.daemon();

    // 10,001 empty files: one over the limit.
    let names: Vec<String> = (0..10_001).map(|i| format!("many/{i}")).collect();
    let mut entries = vec![file("f.py", F_PY)];
    entries.extend(names.iter().map(|n| file(n, b"")));
    assert_refused(
        &env,
        &d,
        "many",
        archive(&entries),
        &["archive has too many entries (at most 10000): entry 10001 is \"many/9999\""],
    );

    // A shallow path of 1,025 bytes: four directories of 200 bytes and a long name.
    let long = format!("{}/{}", vec!["d".repeat(200); 4].join("/"), "n".repeat(221));
    assert_eq!(long.len(), 1025);
    assert_refused(
        &env,
        &d,
        "long",
        archive(&[file("f.py", F_PY), file(&long, b"x")]),
        &[
            &format!("archive entry \"{}…\"", "d".repeat(64)),
            "has a path of 1025 bytes (at most 1024)",
        ],
    );

    // What was refused before the limits still is, now with a 400 naming it.
    let escape = env.work_dir().join("sprout-escaped.py");
    let escape_rel = format!("../../../../../../../..{}", escape.display());
    let link = |kind, link| Entry {
        path: "evil",
        kind,
        data: b"",
        link,
    };
    for (name, evil, texts) in [
        (
            "dotdot",
            file(&escape_rel, b"x"),
            "leaves the function's directory (\"..\")",
        ),
        (
            "absolute",
            file(escape.to_str().unwrap(), b"x"),
            "has an absolute path",
        ),
        (
            "symlink",
            link(EntryType::Symlink, Some("/etc/shadow")),
            "is a symbolic link: an archive may hold only regular files and directories",
        ),
        (
            "hardlink",
            link(EntryType::Link, Some("f.py")),
            "is a hard link: an archive may hold only regular files and directories",
        ),
        (
            "device",
            link(EntryType::Char, None),
            "is a character device: an archive may hold only regular files and directories",
        ),
    ] {
        assert_refused(
            &env,
            &d,
            name,
            archive(&[file("f.py", F_PY), evil]),
            &[texts],
        );
    }
    assert!(!escape.exists(), "{} was written", escape.display());

    // The daemon serves on.
    assert_eq!(d.status()["functions"], json!(0));
}

#[test]
fn a_normal_upload_still_registers_and_runs() {
    let env = require_root!();
    let d = env.daemon();

    // A package, an executable and a file exactly as deep as allowed (32 levels).
    let leaf = format!("{}/leaf.txt", vec!["d"; 31].join("/"));
    let src = env.function(
        "uploaded",
        &[
            (
                "f.py",
                "import os\nfrom pkg import helper\n\n\
                 def f(event):\n    \
                 here = os.path.dirname(os.path.abspath(__file__))\n    \
                 with open(os.path.join(here, *event['leaf'].split('/'))) as fh:\n        \
                 deep = fh.read()\n    \
                 return {'shout': helper.shout(event['word']), 'deep': deep,\n            \
                 'exec': os.access(os.path.join(here, 'run.sh'), os.X_OK)}\n",
            ),
            ("pkg/__init__.py", ""),
            (
                "pkg/helper.py",
                "def shout(w):\n    return w.upper() + '!'\n",
            ),
            ("run.sh", "#!/bin/sh\necho hi\n"),
            (&leaf, "deep enough"),
        ],
    );
    fs::set_permissions(src.join("run.sh"), fs::Permissions::from_mode(0o755)).unwrap();

    let r = put_archive(&d, "good", tar_dir(&src), ANSWER_WITHIN);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(body_json(&r)["name"], "good");
    // The daemon's own copy is where the refusals above look for leftovers.
    assert_eq!(
        unpacked(&env, &d, "good").len(),
        1,
        "{}",
        functions_dir(&env, &d).display()
    );

    let event = json!({"word": "sprout", "leaf": leaf}).to_string();
    let r = d.invoke("good", &event);
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(
        body_json(&r),
        json!({"shout": "SPROUT!", "deep": "deep enough", "exec": true})
    );

    let r = d.request("DELETE", "/functions/good", None, b"");
    assert_eq!(r.status, 200, "{}", text(&r));
    assert_eq!(unpacked(&env, &d, "good"), Vec::<String>::new());
}
