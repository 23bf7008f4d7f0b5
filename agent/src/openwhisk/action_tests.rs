use std::io::Write as _;

use base64::Engine as _;
use serde_json::json;

use super::*;

fn action(kind: &str, code: &str) -> Action {
    Action {
        exec: Some(Exec {
            kind: kind.into(),
            code: Some(code.into()),
            ..Exec::default()
        }),
        ..Action::default()
    }
}

fn zip_of(files: &[(&str, &str, u32)]) -> String {
    let mut out = Cursor::new(Vec::new());
    {
        let mut w = zip::ZipWriter::new(&mut out);
        for (path, text, mode) in files {
            let opts = zip::write::SimpleFileOptions::default().unix_permissions(*mode);
            w.start_file(*path, opts).unwrap();
            w.write_all(text.as_bytes()).unwrap();
        }
        w.finish().unwrap();
    }
    base64::engine::general_purpose::STANDARD.encode(out.into_inner())
}

fn limits() -> crate::upload::Limits {
    crate::upload::Limits::default()
}

/// The archive's files, by path.
fn files(tar: &[u8]) -> BTreeMap<String, (Vec<u8>, u32)> {
    let mut archive = tar::Archive::new(tar);
    let mut out = BTreeMap::new();
    for entry in archive.entries().unwrap() {
        let mut entry = entry.unwrap();
        if entry.header().entry_type() != tar::EntryType::Regular {
            continue;
        }
        let path = entry.path().unwrap().to_string_lossy().into_owned();
        let mode = entry.header().mode().unwrap();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).unwrap();
        out.insert(path, (data, mode));
    }
    out
}

#[test]
fn inline_python_is_main_py_with_its_entry() {
    let mut a = action("python:3", "def niam(args):\n    return args\n");
    a.exec.as_mut().unwrap().main = Some("niam".into());
    let p = prepare(&a, &limits()).unwrap();
    assert_eq!(p.config.runtime.as_deref(), Some("python"));
    assert_eq!(p.config.handler.as_deref(), Some("main__:niam"));
    let f = files(&p.tar);
    assert_eq!(f["main__.py"].0, b"def niam(args):\n    return args\n");
    let meta: ActionMeta = serde_json::from_slice(&f[META_FILE].0).unwrap();
    assert_eq!(meta, p.meta);
    assert_eq!(
        meta.code.as_deref(),
        Some("def niam(args):\n    return args\n")
    );
    assert!(!meta.binary);
}

#[test]
fn inline_nodejs_exports_a_global_main() {
    let p = prepare(
        &action("nodejs:default", "function main(p) { return p }"),
        &limits(),
    )
    .unwrap();
    assert_eq!(p.config.handler.as_deref(), Some("index:main"));
    let text = String::from_utf8(files(&p.tar)["index.js"].0.clone()).unwrap();
    assert!(text.starts_with("function main(p) { return p }\n"));
    assert!(text.contains("module.exports.main = main"), "{text}");
}

#[test]
fn zips_need_their_entry_files_with_openwhisks_texts() {
    let py = zip_of(&[("__main__.py", "def main(a): return a", 0o644)]);
    let p = prepare(&action("python:3", &py), &limits()).unwrap();
    let f = files(&p.tar);
    assert_eq!(f["main__.py"].0, f["__main__.py"].0);
    assert!(p.meta.binary && p.meta.code.is_none());

    let no_main = zip_of(&[("helper.py", "x = 1", 0o644)]);
    let e = prepare(&action("python:3", &no_main), &limits()).unwrap_err();
    assert_eq!(e.to_string(), PYTHON_ZIP_NO_MAIN);

    let node = zip_of(&[("lib/app.js", "exports.go = () => ({})", 0o644)]);
    let e = prepare(&action("nodejs:20", &node), &limits()).unwrap_err();
    assert_eq!(e.to_string(), NODE_ZIP_NO_ENTRY);
    // A dotted main names the module itself.
    let mut dotted = action("nodejs:20", &node);
    dotted.exec.as_mut().unwrap().main = Some("lib/app.go".into());
    assert!(
        prepare(&dotted, &limits()).is_err(),
        "a path is no identifier"
    );
    let other = zip_of(&[("other.js", "exports.niam = {xyz: () => ({})}", 0o644)]);
    let mut dotted = action("nodejs:20", &other);
    dotted.exec.as_mut().unwrap().main = Some("other.niam.xyz".into());
    let p = prepare(&dotted, &limits()).unwrap();
    assert_eq!(p.config.handler.as_deref(), Some("other:niam.xyz"));

    let pkg = zip_of(&[
        ("package.json", r#"{"main":"a.js"}"#, 0o644),
        ("a.js", "", 0o644),
    ]);
    let p = prepare(&action("nodejs:20", &pkg), &limits()).unwrap();
    assert_eq!(p.config.handler.as_deref(), Some(":main"));

    let bb = zip_of(&[("exec", "#!/bin/sh\n", 0o644)]);
    let p = prepare(&action("blackbox", &bb), &limits()).unwrap();
    assert_eq!(p.config.runtime.as_deref(), Some("native"));
    assert_eq!(files(&p.tar)["exec"].1, 0o755);
    let e = prepare(
        &action("blackbox", &zip_of(&[("run", "", 0o755)])),
        &limits(),
    )
    .unwrap_err();
    assert_eq!(e.to_string(), BLACKBOX_ZIP_NO_EXEC);
    assert!(matches!(
        prepare(&action("blackbox", "echo hi"), &limits()).unwrap_err(),
        Error::BlackboxInline
    ));
}

#[test]
fn kinds_images_and_limits_are_checked() {
    let e = prepare(&action("java:8", "x"), &limits()).unwrap_err();
    let text = e.to_string();
    assert!(
        text.contains("'java:8'") && text.contains("'nodejs:20'"),
        "{text}"
    );
    let mut img = action("blackbox", "x");
    img.exec.as_mut().unwrap().image = Some("me/img".into());
    assert!(prepare(&img, &limits())
        .unwrap_err()
        .to_string()
        .contains("exec.image"));
    assert!(matches!(
        prepare(&action("python:3", "  "), &limits()).unwrap_err(),
        Error::NoCode
    ));
    let mut a = action("python:3", "def main(a): return a");
    a.limits = Some(Limits {
        timeout: Some(1000),
        memory: Some(128),
        logs: Some(11),
        concurrency: None,
    });
    assert!(matches!(
        prepare(&a, &limits()).unwrap_err(),
        Error::Logs { value: 11 }
    ));
    a.limits.as_mut().unwrap().logs = Some(2);
    let p = prepare(&a, &limits()).unwrap();
    assert_eq!(
        (p.config.timeout_ms, p.config.memory_mb, p.meta.logs),
        (Some(1000), Some(128), 2)
    );
    let mut bin = action("python:3", "def main(a): return a");
    bin.exec.as_mut().unwrap().binary = true;
    assert!(matches!(
        prepare(&bin, &limits()).unwrap_err(),
        Error::NotZip
    ));
    // An init parameter may not name what sprout or a runtime's protocol sets.
    for key in ["__OW_NAMESPACE", "SPROUT_SOCKET", "_HANDLER"] {
        let mut a = action("python:3", "def main(a): return a");
        a.parameters =
            serde_json::from_value(serde_json::json!([{"key": key, "value": "x", "init": true}]))
                .unwrap();
        assert!(
            matches!(
                prepare(&a, &limits()).unwrap_err(),
                Error::InitParameter { .. }
            ),
            "{key}"
        );
    }
}

#[test]
fn zips_are_bounded_and_stay_inside() {
    let out = zip_of(&[("../escape.py", "", 0o644), ("__main__.py", "", 0o644)]);
    let e = prepare(&action("python:3", &out), &limits()).unwrap_err();
    assert!(matches!(e, Error::Entry { .. }), "{e}");
    let small = crate::upload::Limits {
        total_bytes: 10,
        ..limits()
    };
    let big = zip_of(&[("__main__.py", &"x".repeat(100), 0o644)]);
    assert!(matches!(
        prepare(&action("python:3", &big), &small).unwrap_err(),
        Error::TooLarge { .. }
    ));
    let few = crate::upload::Limits {
        entries: 1,
        ..limits()
    };
    let two = zip_of(&[("__main__.py", "", 0o644), ("b.py", "", 0o644)]);
    assert!(matches!(
        prepare(&action("python:3", &two), &few).unwrap_err(),
        Error::TooManyEntries { max: 1 }
    ));
    // The count an archive declares is read before the zip crate indexes it.
    let mut bytes = base64::engine::general_purpose::STANDARD
        .decode(zip_of(&[("__main__.py", "", 0o644)]))
        .unwrap();
    assert_eq!(declared_entries(&bytes), Some(1));
    let eocd = bytes.len() - 22;
    assert_eq!(&bytes[eocd..eocd + 4], b"PK\x05\x06");
    bytes[eocd + 10..eocd + 12].copy_from_slice(&60_000u16.to_le_bytes());
    let lying = base64::engine::general_purpose::STANDARD.encode(&bytes);
    assert!(matches!(
        prepare(&action("python:3", &lying), &limits()).unwrap_err(),
        Error::TooManyEntries { .. }
    ));
    assert_eq!(declared_entries(b"PK\x03\x04 not a whole zip"), None);
}

/// A zip64 record's count is followed wherever an end record points to it (a
/// saturated count or directory offset); an earlier end record's 16-bit count,
/// which may be file data, is not taken at its word.
#[test]
fn declared_entries_follow_zip64_and_ignore_earlier_16_bit_counts() {
    fn eocd(disk: u16, total: u16, offset: u32) -> Vec<u8> {
        let mut r = b"PK\x05\x06".to_vec();
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&disk.to_le_bytes());
        r.extend_from_slice(&total.to_le_bytes());
        r.extend_from_slice(&[0; 4]);
        r.extend_from_slice(&offset.to_le_bytes());
        r.extend_from_slice(&[0; 2]);
        r
    }
    let mut bytes = b"PK\x03\x04 some data ".to_vec();
    // Data that looks like an end record with many entries, then the real one.
    bytes.extend(eocd(60_000, 60_000, 0));
    bytes.extend(eocd(3, 3, 0));
    assert_eq!(declared_entries(&bytes), Some(3));
    // A zip64 record, its locator, and an end record that points to it.
    let record = bytes.len() as u64;
    bytes.extend_from_slice(b"PK\x06\x06");
    bytes.extend_from_slice(&[0; 20]);
    bytes.extend_from_slice(&5_000_000u64.to_le_bytes());
    bytes.extend_from_slice(&5_000_000u64.to_le_bytes());
    bytes.extend_from_slice(&[0; 16]);
    bytes.extend_from_slice(b"PK\x06\x07");
    bytes.extend_from_slice(&[0; 4]);
    bytes.extend_from_slice(&record.to_le_bytes());
    bytes.extend_from_slice(&1u32.to_le_bytes());
    bytes.extend(eocd(5, 5, u32::MAX));
    assert_eq!(declared_entries(&bytes), Some(5_000_000));
}

fn meta(parameters: serde_json::Value, annotations: serde_json::Value) -> ActionMeta {
    ActionMeta {
        kind: "python:3".into(),
        parameters: serde_json::from_value(parameters).unwrap(),
        annotations: serde_json::from_value(annotations).unwrap(),
        logs: 10,
        ..ActionMeta::default()
    }
}

fn call(params: serde_json::Value) -> Invocation {
    Invocation {
        params,
        api_key: Some("u:k".into()),
        subject: "alpha".into(),
        blocking: true,
        wait_at_most: None,
        activation_id: None,
    }
}

#[test]
fn defaults_merge_under_the_invocations_and_init_ones_go_to_the_environment() {
    let m = meta(
        json!([{"key": "a", "value": 1}, {"key": "b", "value": "x"},
               {"key": "SECRET", "value": {"k": true}, "init": true}]),
        json!([]),
    );
    let act = invocation("alpha", "f", Some(&m), call(json!({"b": "y", "c": null}))).unwrap();
    assert_eq!(act.params, json!({"a": 1, "b": "y", "c": null}));
    assert_eq!(
        act.init_env.get("SECRET").map(String::as_str),
        Some(r#"{"k":true}"#)
    );
    assert_eq!(act.api_key.as_deref(), Some("u:k"));
    assert_eq!(act.subject, "alpha");
    // An init parameter given at invocation replaces the default, in the environment.
    let act = invocation("alpha", "f", Some(&m), call(json!({"SECRET": "s"}))).unwrap();
    assert_eq!(act.init_env["SECRET"], "s");
    assert!(act.params.get("SECRET").is_none());
    // Arrays pass through.
    let act = invocation("alpha", "f", Some(&m), call(json!([1, 2]))).unwrap();
    assert_eq!(act.params, json!([1, 2]));
}

#[test]
fn final_parameters_and_the_api_key_annotation_are_honoured() {
    let m = meta(
        json!([{"key": "a", "value": 1}]),
        json!([{"key": "final", "value": true}, {"key": "provide-api-key", "value": false}]),
    );
    let e = invocation("n", "f", Some(&m), call(json!({"a": 2}))).unwrap_err();
    assert_eq!(e.to_string(), PARAMETERS_NOT_ALLOWED);
    let act = invocation("n", "f", Some(&m), call(json!({"z": 2}))).unwrap();
    assert_eq!(act.api_key, None);
    assert_eq!(act.params, json!({"a": 1, "z": 2}));
    // No action metadata: the invocation's parameters alone, the key passed.
    let act = invocation("n", "f", None, call(json!({"z": 2}))).unwrap();
    assert_eq!(act.api_key.as_deref(), Some("u:k"));
}

#[test]
fn a_function_of_sprouts_api_reads_as_an_action() {
    let info = ipc::api::FunctionInfo {
        namespace: "n".into(),
        name: "pkg~2fhello".into(),
        runtime: "nodejs".into(),
        network: "none".into(),
        path: "/x".into(),
        handler: "index:handler".into(),
        memory_mb: 256,
        timeout_ms: 3000,
        pids: 64,
        cpus: 1.0,
        max_instances: 4,
        warm_instances: 0,
        packages: vec![],
    };
    let a = to_action("n", "pkg/hello", &info, 7, None);
    assert_eq!(a.name.as_deref(), Some("pkg/hello"));
    assert_eq!(a.version.as_deref(), Some("0.0.7"));
    let exec = a.exec.unwrap();
    assert_eq!(
        (exec.kind.as_str(), exec.main.as_deref()),
        ("nodejs:20", Some("handler"))
    );
    assert_eq!(a.limits.unwrap().timeout, Some(3000));
}
