//! The store against a real database in a temporary directory (no root needed).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use ipc::api::{ActivationId, ActivationLimits, ActivationStatus};

use super::record::{cap_result, format_logs, from_epoch_ms, MAX_LOG_LINES, MAX_RESULT};
use super::*;

fn id(n: u128) -> ActivationId {
    ActivationId::from_u128(n)
}

fn finished(n: u128, ns: &str, name: &str, start_ms: u64) -> Finished {
    Finished {
        id: id(n),
        namespace: ns.into(),
        name: name.into(),
        version: 3,
        start_ms,
        end_ms: start_ms + 7,
        wait_ms: 2,
        init_ms: 5,
        start_path: Some("stem_cell"),
        status: ActivationStatus::Success,
        result: br#"{"n":1}"#.to_vec(),
        logs: TimedLogs::default(),
        cause: None,
        called: false,
        blocking: true,
        limits: ActivationLimits {
            memory: 256,
            timeout: 60_000,
        },
        openwhisk: None,
    }
}

fn now_ms() -> u64 {
    record::epoch_ms(SystemTime::now())
}

fn found(a: &Activations, n: u128, ns: Option<&str>) -> ipc::api::ActivationRecord {
    match a.get(id(n), ns).unwrap().unwrap() {
        Lookup::Found(r) => *r,
        other => panic!("{n:x}: {other:?}"),
    }
}

#[test]
fn a_finished_record_reads_back_whole_and_only_in_its_namespace() {
    let dir = tempfile::tempdir().unwrap();
    let a = Activations::open(dir.path(), Retention::default()).unwrap();
    let start = now_ms();
    let mut f = finished(1, "t", "f", start);
    f.cause = Some(id(9));
    f.logs.stdout = StreamLog {
        text: "one\ntwo\n".into(),
        marks: vec![Mark {
            lines: 2,
            at: from_epoch_ms(start + 1),
        }],
    };
    a.finish(f);
    a.flush().unwrap();
    let r = found(&a, 1, None);
    assert_eq!(r.activation_id.to_string(), format!("{:032x}", 1));
    assert_eq!(
        (r.namespace.as_str(), r.name.as_str(), r.version),
        ("t", "f", 3)
    );
    assert_eq!((r.start, r.end, r.duration), (start, start + 7, 7));
    assert_eq!((r.wait_time, r.init_time), (2, 5));
    assert_eq!(r.start_path.as_deref(), Some("stem_cell"));
    assert_eq!((r.status, r.status_code), (ActivationStatus::Success, 0));
    assert_eq!(r.result.unwrap().get(), r#"{"n":1}"#);
    let logs = r.logs.unwrap();
    assert_eq!(logs.len(), 2);
    assert!(logs[0].ends_with("Z stdout: one"), "{logs:?}");
    assert_eq!(r.cause, Some(id(9)));
    assert_eq!(
        r.limits,
        ActivationLimits {
            memory: 256,
            timeout: 60_000
        }
    );
    // Another namespace's scope does not see it; its own does.
    assert!(matches!(
        a.get(id(1), Some("u")).unwrap().unwrap(),
        Lookup::Missing
    ));
    assert_eq!(found(&a, 1, Some("t")).name, "f");
    assert!(matches!(
        a.get(id(2), None).unwrap().unwrap(),
        Lookup::Missing
    ));
}

#[test]
fn an_acceptance_is_pending_until_finished_and_an_id_names_one_activation() {
    let dir = tempfile::tempdir().unwrap();
    let a = Activations::open(dir.path(), Retention::default()).unwrap();
    let accepted = Accepted {
        openwhisk: None,
        id: id(5),
        namespace: "default".into(),
        name: "f".into(),
        version: 1,
        at_ms: now_ms(),
        limits: ActivationLimits::default(),
    };
    a.accept(accepted.clone()).unwrap();
    assert!(matches!(
        a.get(id(5), None).unwrap().unwrap(),
        Lookup::Pending
    ));
    // Listings hold finished records only.
    assert!(a
        .list(&Query {
            limit: 10,
            ..Query::default()
        })
        .unwrap()
        .unwrap()
        .is_empty());
    let e = a.accept(accepted).unwrap_err();
    assert!(e.to_string().contains("is in use"), "{e}");
    let mut f = finished(5, "default", "f", now_ms());
    f.blocking = false;
    a.finish(f);
    a.flush().unwrap();
    let r = found(&a, 5, None);
    assert_eq!((r.status, r.blocking), (ActivationStatus::Success, false));
    // A finished record is never written over.
    let mut again = finished(5, "default", "f", now_ms());
    again.status = ActivationStatus::ApplicationError;
    a.finish(again);
    a.flush().unwrap();
    assert_eq!(found(&a, 5, None).status, ActivationStatus::Success);
}

#[test]
fn pending_rows_are_recorded_lost_when_the_store_opens_again() {
    let dir = tempfile::tempdir().unwrap();
    let accepted_at = now_ms() - 50;
    {
        let a = Activations::open(dir.path(), Retention::default()).unwrap();
        for n in 0..3 {
            a.accept(Accepted {
                openwhisk: None,
                id: id(100 + n),
                namespace: "default".into(),
                name: "sleepy".into(),
                version: 2,
                at_ms: accepted_at,
                limits: ActivationLimits {
                    memory: 128,
                    timeout: 1000,
                },
            })
            .unwrap();
        }
        a.finish(finished(100, "default", "sleepy", now_ms()));
        a.close();
    }
    let a = Activations::open(dir.path(), Retention::default()).unwrap();
    assert_eq!(found(&a, 100, None).status, ActivationStatus::Success);
    for n in [101, 102] {
        let r = found(&a, n, None);
        assert_eq!(
            (r.status, r.status_code),
            (ActivationStatus::WhiskInternalError, 3)
        );
        assert!(r.result.unwrap().get().contains(LOST_AT_START));
        assert!(r.wait_time >= 50, "{}", r.wait_time);
        assert!(!r.blocking);
        // Its limits are the function's at acceptance; it ran for no time.
        assert_eq!(
            (r.limits.memory, r.limits.timeout, r.duration),
            (128, 1000, 0)
        );
    }
    // Finishing a lost one later changes nothing: it was not run again.
    a.finish(finished(101, "default", "sleepy", now_ms()));
    a.flush().unwrap();
    assert_eq!(
        found(&a, 101, None).status,
        ActivationStatus::WhiskInternalError
    );
}

#[test]
fn listings_are_newest_first_filtered_and_paged() {
    let dir = tempfile::tempdir().unwrap();
    let a = Activations::open(dir.path(), Retention::default()).unwrap();
    let t0 = now_ms() - 1000;
    for n in 0..10u128 {
        let name = if n % 2 == 0 { "even" } else { "odd" };
        let ns = if n < 8 { "default" } else { "other" };
        a.finish(finished(n + 1, ns, name, t0 + n as u64 * 10));
    }
    a.flush().unwrap();
    let list = |q: Query| -> Vec<u128> {
        a.list(&q)
            .unwrap()
            .unwrap()
            .iter()
            .map(|r| {
                assert!(r.result.is_none() && r.logs.is_none());
                r.activation_id.as_u128()
            })
            .collect()
    };
    let q = Query {
        limit: 30,
        ..Query::default()
    };
    assert_eq!(list(q.clone()), (1..=10).rev().collect::<Vec<_>>());
    assert_eq!(
        list(Query {
            name: Some("even".into()),
            namespace: Some("default".into()),
            ..q.clone()
        }),
        [7, 5, 3, 1]
    );
    assert_eq!(
        list(Query {
            namespace: Some("other".into()),
            ..q.clone()
        }),
        [10, 9]
    );
    assert_eq!(
        list(Query {
            since: Some(t0 + 50),
            ..q.clone()
        }),
        [10, 9, 8, 7, 6]
    );
    assert_eq!(
        list(Query {
            limit: 2,
            skip: 3,
            ..q
        }),
        [7, 6]
    );
}

#[test]
fn retention_keeps_the_newest_by_count_and_drops_the_old_never_a_pending_one() {
    let dir = tempfile::tempdir().unwrap();
    let retention = Retention {
        max_count: 5,
        max_age: Duration::from_secs(3600),
    };
    let a = Activations::open(dir.path(), retention).unwrap();
    let now = now_ms();
    a.accept(Accepted {
        openwhisk: None,
        id: id(999),
        namespace: "default".into(),
        name: "f".into(),
        version: 1,
        at_ms: now - 7_200_000,
        limits: ActivationLimits::default(),
    })
    .unwrap();
    // Two hours old: gone by age.
    a.finish(finished(1, "default", "f", now - 7_200_000));
    for n in 2..=9 {
        a.finish(finished(n, "default", "f", now - 1000 + n as u64));
    }
    a.flush().unwrap();
    let ids: Vec<u128> = a
        .list(&Query {
            limit: 100,
            ..Query::default()
        })
        .unwrap()
        .unwrap()
        .iter()
        .map(|r| r.activation_id.as_u128())
        .collect();
    assert_eq!(ids, [9, 8, 7, 6, 5]);
    assert!(matches!(
        a.get(id(999), None).unwrap().unwrap(),
        Lookup::Pending
    ));
}

#[test]
fn acceptances_from_many_threads_are_committed_together() {
    let dir = tempfile::tempdir().unwrap();
    let a = Arc::new(Activations::open(dir.path(), Retention::default()).unwrap());
    let threads: Vec<_> = (0..8u128)
        .map(|t| {
            let a = a.clone();
            std::thread::spawn(move || {
                for n in 0..25u128 {
                    a.accept(Accepted {
                        openwhisk: None,
                        id: id(t * 1000 + n + 1),
                        namespace: "default".into(),
                        name: "f".into(),
                        version: 1,
                        at_ms: now_ms(),
                        limits: ActivationLimits::default(),
                    })
                    .unwrap();
                }
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    for t in 0..8u128 {
        for n in 0..25u128 {
            assert!(matches!(
                a.get(id(t * 1000 + n + 1), None).unwrap().unwrap(),
                Lookup::Pending
            ));
        }
    }
}

#[test]
fn a_store_of_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let conn = rusqlite::Connection::open(dir.path().join(store::DB_FILE)).unwrap();
        conn.pragma_update(None, "user_version", 99).unwrap();
    }
    let e = Activations::open(dir.path(), Retention::default()).unwrap_err();
    assert!(e.to_string().contains("schema version 99"), "{e}");
}

/// Version 1's table, as sprout before records held their limits made it.
const SCHEMA_V1: &str = "CREATE TABLE activations (id TEXT NOT NULL PRIMARY KEY, \
    namespace TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, \
    pending INTEGER NOT NULL, blocking INTEGER NOT NULL, start_ms INTEGER NOT NULL, \
    end_ms INTEGER NOT NULL, wait_ms INTEGER NOT NULL, init_ms INTEGER NOT NULL, \
    start_path TEXT, status INTEGER NOT NULL, result TEXT, logs TEXT, \
    logs_truncated INTEGER NOT NULL DEFAULT 0, cause TEXT, called INTEGER NOT NULL DEFAULT 0);";

#[test]
fn a_store_of_an_older_schema_or_none_is_refused_and_left_as_it_was() {
    for (version, tables) in [(1, SCHEMA_V1), (0, "CREATE TABLE other (x);")] {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(store::DB_FILE);
        {
            let conn = rusqlite::Connection::open(&path).unwrap();
            conn.execute_batch(tables).unwrap();
            conn.pragma_update(None, "user_version", version).unwrap();
        }
        let e = Activations::open(dir.path(), Retention::default()).unwrap_err();
        let text = e.to_string();
        assert!(
            text.contains(&format!(
                "schema version {version}, this sprout reads version 3"
            )) && text.contains(&path.display().to_string())
                && text.contains("move the directory activations/ away"),
            "{text}"
        );
        let conn = rusqlite::Connection::open(&path).unwrap();
        let kept: i64 = conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(kept, version);
        let mode: String = conn
            .pragma_query_value(None, "journal_mode", |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "delete");
    }
    // A new (empty) file is made this build's.
    let dir = tempfile::tempdir().unwrap();
    std::fs::File::create(dir.path().join(store::DB_FILE)).unwrap();
    let a = Activations::open(dir.path(), Retention::default()).unwrap();
    a.finish(finished(1, "t", "f", now_ms()));
    a.flush().unwrap();
    assert_eq!(found(&a, 1, None).limits.memory, 256);
}

#[test]
fn log_lines_carry_the_time_their_chunk_was_read_and_are_capped() {
    let t = |ms: u64| from_epoch_ms(1_800_000_000_000 + ms);
    let logs = TimedLogs {
        stdout: StreamLog {
            // "a" and "b" came in the first read, "c" (ended) and "d" (no newline) later.
            text: "a\nb\nc\nd".into(),
            marks: vec![
                Mark { lines: 2, at: t(0) },
                Mark {
                    lines: 3,
                    at: t(20),
                },
            ],
        },
        stderr: StreamLog {
            text: "oops\n".into(),
            marks: vec![Mark {
                lines: 1,
                at: t(10),
            }],
        },
        truncated: false,
    };
    let (lines, cut) = format_logs(&logs, t(99));
    assert!(!cut);
    let start = humantime::format_rfc3339_nanos(t(0)).to_string();
    assert_eq!(start.len(), "2026-11-30T12:00:00.123456789Z".len());
    assert_eq!(
        lines,
        [
            format!("{start} stdout: a"),
            format!("{start} stdout: b"),
            format!("{} stderr: oops", humantime::format_rfc3339_nanos(t(10))),
            format!("{} stdout: c", humantime::format_rfc3339_nanos(t(20))),
            format!("{} stdout: d", humantime::format_rfc3339_nanos(t(20))),
        ]
    );

    let many = TimedLogs {
        stdout: StreamLog {
            text: "x\n".repeat(MAX_LOG_LINES + 5),
            marks: vec![],
        },
        ..TimedLogs::default()
    };
    let (lines, cut) = format_logs(&many, t(0));
    assert_eq!((lines.len(), cut), (MAX_LOG_LINES, true));
    let wide = TimedLogs {
        stdout: StreamLog {
            text: format!("{}\n", "y".repeat(100_000)),
            marks: vec![],
        },
        ..TimedLogs::default()
    };
    let (lines, cut) = format_logs(&wide, t(0));
    assert!(lines.is_empty() && cut);
}

#[test]
fn a_large_result_is_kept_as_its_size_and_head() {
    let small = br#"{"ok":true}"#;
    assert_eq!(cap_result(small), small);
    let big = format!("\"{}\"", "z".repeat(MAX_RESULT));
    let kept: serde_json::Value = serde_json::from_slice(&cap_result(big.as_bytes())).unwrap();
    assert_eq!(kept["truncated"], true);
    assert_eq!(kept["size"], big.len());
    assert!(kept["head"].as_str().unwrap().starts_with("\"zzz"));
}

#[test]
fn ids_are_32_lowercase_hex_digits() {
    let a = Activations::new_id();
    let b = Activations::new_id();
    assert_ne!(a, b);
    let text = a.to_string();
    assert_eq!(text.len(), 32);
    assert_eq!(ActivationId::parse(&text).unwrap(), a);
    for bad in [
        "",
        "xyz",
        &"A".repeat(32),
        &"0".repeat(31),
        &"0".repeat(33),
        "+0000000000000000000000000000000",
    ] {
        let e = ActivationId::parse(bad).unwrap_err();
        assert!(
            e.to_string().contains("32 lowercase hex digits"),
            "{bad}: {e}"
        );
    }
}

/// Version 2's table, as sprout before OpenWhisk activations made it.
const SCHEMA_V2: &str = "CREATE TABLE activations (id TEXT NOT NULL PRIMARY KEY, \
    namespace TEXT NOT NULL, name TEXT NOT NULL, version INTEGER NOT NULL, \
    pending INTEGER NOT NULL, blocking INTEGER NOT NULL, start_ms INTEGER NOT NULL, \
    end_ms INTEGER NOT NULL, wait_ms INTEGER NOT NULL, init_ms INTEGER NOT NULL, \
    start_path TEXT, status INTEGER NOT NULL, result TEXT, logs TEXT, \
    logs_truncated INTEGER NOT NULL DEFAULT 0, cause TEXT, called INTEGER NOT NULL DEFAULT 0, \
    memory_mb INTEGER NOT NULL, timeout_ms INTEGER NOT NULL);";

#[test]
fn a_version_2_store_is_migrated_its_records_kept_and_openwhisk_fields_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(store::DB_FILE);
    let start = now_ms();
    {
        let conn = rusqlite::Connection::open(&path).unwrap();
        conn.execute_batch(SCHEMA_V2).unwrap();
        conn.execute(
            "INSERT INTO activations (id, namespace, name, version, pending, blocking, start_ms, \
             end_ms, wait_ms, init_ms, status, result, logs, memory_mb, timeout_ms) \
             VALUES (?1, 't', 'old', 1, 0, 1, ?2, ?2, 0, 0, 0, '{}', '[]', 128, 1000)",
            rusqlite::params![id(1).to_string(), start as i64],
        )
        .unwrap();
        conn.pragma_update(None, "user_version", 2).unwrap();
    }
    let a = Activations::open(dir.path(), Retention::default()).unwrap();
    let old = found(&a, 1, None);
    assert_eq!((old.name.as_str(), old.limits.memory), ("old", 128));
    assert_eq!((old.kind, old.subject), (None, None));
    let mut f = finished(2, "t", "new", start + 1);
    f.openwhisk = Some(OpenWhiskFields {
        kind: "nodejs:20".into(),
        subject: "alice".into(),
    });
    let written = f.to_record();
    a.finish(f);
    a.flush().unwrap();
    let new = found(&a, 2, None);
    assert_eq!(new.kind.as_deref(), Some("nodejs:20"));
    assert_eq!(new.subject.as_deref(), Some("alice"));
    // What the invocation answers with is what is read back.
    assert_eq!(
        serde_json::to_value(&written).unwrap(),
        serde_json::to_value(&new).unwrap()
    );
    drop(a);
    let conn = rusqlite::Connection::open(&path).unwrap();
    let version: i64 = conn
        .pragma_query_value(None, "user_version", |r| r.get(0))
        .unwrap();
    assert_eq!(version, store::SCHEMA_VERSION);
}
