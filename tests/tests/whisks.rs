//! `agent::openwhisk::whisks` against a CouchDB-compatible server (express-pouchdb
//! over PouchDB's in-memory adapter, `tests/openwhisk/couchdb.js`, installed by
//! `.ci/setup`) started here on loopback and loaded with action documents in
//! OpenWhisk's format: inline code, `mem:` attachments (text and a zip),
//! `couch:` attachments, a revision that is gone, a missing action; and the
//! activations writer's `_bulk_docs`. No root needed.

use agent::openwhisk::whisks::{CouchDb, Writer};
use base64::Engine as _;
use sprout_tests::invoker::Couch;
use sprout_tests::{json, Value};

/// An action document as OpenWhisk's controller stores it in `whisks`.
fn action_doc(ns: &str, name: &str, exec: Value) -> Value {
    json!({
        "namespace": ns, "name": name, "entityType": "action", "version": "0.0.1",
        "publish": false, "exec": exec,
        "limits": {"timeout": 60000, "memory": 256, "logs": 10, "concurrency": 1},
        "parameters": [{"key": "greeting", "value": "hi"}],
        "annotations": [{"key": "provide-api-key", "value": false}],
        "updated": 1700000000000_u64
    })
}

fn b64url(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE.encode(bytes)
}

#[test]
fn actions_are_fetched_with_their_code_inline_mem_or_couch() {
    let Some(couch) = Couch::start() else { return };
    couch.put("/whisks", None);
    let db = CouchDb::new(&format!("http://admin:secret@{}", &couch.url[7..])).unwrap();
    let doc = |id: &str| format!("/whisks/{}", id.replace('/', "%2F"));

    // Inline source text.
    let code = "def main(args):\n    return args\n";
    let rev1 = couch.put(
        &doc("guest/inline"),
        Some(&action_doc(
            "guest",
            "inline",
            json!({"kind": "python:3", "code": code, "binary": false}),
        )),
    )["rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let (action, rev) = db.action("guest/inline", Some(&rev1)).unwrap().unwrap();
    assert_eq!(rev, rev1);
    let exec = action.exec.as_ref().unwrap();
    assert_eq!(
        (exec.kind.as_str(), exec.code.as_deref(), exec.binary),
        ("python:3", Some(code), false)
    );
    assert_eq!(action.parameters[0].key, "greeting");
    assert_eq!(action.limits.unwrap().memory, Some(256));
    assert_eq!(action.namespace.as_deref(), Some("guest"));

    // A revision that is gone: the latest is taken.
    let mut newer = action_doc(
        "guest",
        "inline",
        json!({"kind": "python:3", "code": "# v2\n"}),
    );
    newer["_rev"] = json!(rev1);
    let rev2 = couch.put(&doc("guest/inline"), Some(&newer))["rev"]
        .as_str()
        .unwrap()
        .to_owned();
    let (action, rev) = db
        .action("guest/inline", Some("1-00000000000000000000000000000000"))
        .unwrap()
        .unwrap();
    assert_eq!(rev, rev2);
    assert_eq!(action.exec.unwrap().code.as_deref(), Some("# v2\n"));

    // mem: text, base64url, as a package's action (the id has two slashes).
    let text = "function main(p) { return {ok: p.greeting + '~?'}; }\n";
    couch.put(
        &doc("guest/pkg/mem"),
        Some(&action_doc(
            "guest/pkg",
            "mem",
            json!({"kind": "nodejs:20", "binary": false,
            "code": {"attachmentName": format!("mem:{}", b64url(text.as_bytes())),
                     "attachmentType": "text/plain", "length": text.len()}}),
        )),
    );
    let (action, _) = db.action("guest/pkg/mem", None).unwrap().unwrap();
    assert_eq!(action.exec.unwrap().code.as_deref(), Some(text));

    // mem: a zip (octet-stream): the action gets standard base64 of its bytes.
    let zip: Vec<u8> = (0u8..=255).cycle().take(3000).collect();
    couch.put(
        &doc("guest/zipped"),
        Some(&action_doc(
            "guest",
            "zipped",
            json!({"kind": "python:3", "binary": true, "main": "niam",
            "code": {"attachmentName": format!("mem:{}", b64url(&zip)),
                     "attachmentType": "application/octet-stream", "length": zip.len()}}),
        )),
    );
    let (action, _) = db.action("guest/zipped", None).unwrap().unwrap();
    let exec = action.exec.unwrap();
    assert!(exec.binary);
    assert_eq!(exec.main.as_deref(), Some("niam"));
    let code = exec.code.unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&code)
            .unwrap(),
        zip
    );

    // couch: an attachment of the document.
    let mut with_attachment = action_doc(
        "guest",
        "attached",
        json!({"kind": "python:3", "binary": true,
        "code": {"attachmentName": "couch:3f1b6a2c-attached", "attachmentType": "application/octet-stream"}}),
    );
    with_attachment["_attachments"] = json!({"3f1b6a2c-attached": {
        "content_type": "application/octet-stream",
        "data": base64::engine::general_purpose::STANDARD.encode(&zip)}});
    couch.put(&doc("guest/attached"), Some(&with_attachment));
    let (action, _) = db.action("guest/attached", None).unwrap().unwrap();
    let code = action.exec.unwrap().code.unwrap();
    assert_eq!(
        base64::engine::general_purpose::STANDARD
            .decode(&code)
            .unwrap(),
        zip
    );

    // Missing: none; a document that is not an action: an error naming it.
    assert!(db.action("guest/nothing", Some("1-abc")).unwrap().is_none());
    couch.put(
        &doc("guest/trigger"),
        Some(
            &json!({"namespace": "guest", "name": "trigger", "entityType": "trigger", "exec": {"kind": "x"}}),
        ),
    );
    let e = db.action("guest/trigger", None).unwrap_err().to_string();
    assert!(e.contains("guest/trigger") && e.contains("trigger"), "{e}");
    // A server that is not there: an error, not a missing action.
    let gone = CouchDb::new("http://127.0.0.1:9").unwrap();
    assert!(gone.action("guest/inline", None).is_err());
}

#[test]
fn records_are_written_in_batches_with_openwhisks_ids() {
    let Some(couch) = Couch::start() else { return };
    couch.put("/activations", None);
    let writer = Writer::start(CouchDb::new(&couch.url).unwrap()).unwrap();
    let ids: Vec<String> = (0..300u32).map(|i| format!("{i:032x}")).collect();
    for id in &ids {
        let activation = serde_json::from_value(json!({
            "namespace": "guest", "name": "echo", "subject": "guest", "activationId": id,
            "start": 1, "end": 2, "duration": 1,
            "response": {"status": "success", "statusCode": 0, "success": true, "result": {"n": 1}},
            "logs": [], "version": "0.0.1", "publish": false, "annotations": []
        }))
        .unwrap();
        writer.push(&activation);
    }
    // Stopping writes what is queued.
    writer.stop();
    let all = couch.request("GET", "/activations/_all_docs?include_docs=true", None);
    assert_eq!(all["total_rows"], 300, "{all}");
    let row = all["rows"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["id"] == format!("guest/{}", ids[7]))
        .expect("the record of the 8th");
    assert_eq!(row["doc"]["entityType"], "activation");
    assert_eq!(row["doc"]["activationId"], ids[7]);
    assert_eq!(row["doc"]["response"]["result"], json!({"n": 1}));
}
