//! The native backend: the function's own executable, run as it is.
//!
//! The handler's module names the executable in the code directory (`exec` unless
//! told otherwise). `bootstrap` speaks AWS Lambda's runtime API ([`lambda_api`]):
//! the host serves that API on the sandbox's loopback. Any other name speaks
//! OpenWhisk's actionloop protocol ([`actionloop`]): one JSON line per invocation on
//! its stdin, one JSON line back on its descriptor 3. Either way the executable is
//! started once, at `load`, and stays up between invocations (warm); its stdout and
//! stderr are the host's, so what it prints is its invocation's logs, and it dies with
//! the host. Native functions cannot call other functions (there is no SDK for them):
//! every outcome says `called: false`.

mod actionloop;
mod lambda_api;
mod process;

use std::path::{Component, Path, PathBuf};

use ipc::proto::{FunctionError, LoadSpec};
use ipc::Channel;

use super::backend::{function_error, Backend, Error, Invocation, Outcome};
use process::KIND;

/// The executable name that selects AWS Lambda's runtime API.
pub const BOOTSTRAP: &str = "bootstrap";

/// The host's side of a native function: nothing until `load` starts the executable.
pub struct Native {
    /// Kept open so the shim's router sees the instance's calls channel alive; native
    /// functions make no calls.
    _calls: Channel,
    protocol: Option<Protocol>,
}

enum Protocol {
    Actionloop(actionloop::Actionloop),
    Lambda(lambda_api::LambdaApi),
}

impl Native {
    pub fn new(calls: Channel) -> Native {
        Native {
            _calls: calls,
            protocol: None,
        }
    }
}

impl Backend for Native {
    fn load(&mut self, spec: &LoadSpec) -> Result<(), FunctionError> {
        let program = executable(spec)?;
        self.protocol = Some(if spec.handler.module == BOOTSTRAP {
            Protocol::Lambda(lambda_api::LambdaApi::start(spec, &program)?)
        } else {
            Protocol::Actionloop(actionloop::Actionloop::start(spec, &program)?)
        });
        Ok(())
    }

    fn invoke(&mut self, invocation: Invocation) -> Result<(Outcome, bool), Error> {
        let outcome = match self.protocol.as_mut() {
            Some(Protocol::Actionloop(a)) => a.invoke(invocation)?,
            Some(Protocol::Lambda(l)) => l.invoke(invocation)?,
            None => return Err(Error::Runtime("invoked before load".into())),
        };
        Ok((outcome, false))
    }
}

/// The executable `spec`'s handler names, inside the code directory.
fn executable(spec: &LoadSpec) -> Result<PathBuf, FunctionError> {
    let name = spec.handler.module.as_str();
    let relative = Path::new(name);
    let plain = !name.is_empty()
        && relative
            .components()
            .all(|c| matches!(c, Component::Normal(_)));
    if !plain {
        return Err(function_error(
            KIND,
            format!("the executable {name:?} is not a path inside the function's directory"),
        ));
    }
    Ok(Path::new(&spec.code_dir).join(relative))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn executables_stay_inside_the_code_directory() {
        let mut spec = LoadSpec {
            env: Default::default(),
            function: "f".into(),
            code_dir: "/code".into(),
            handler: ipc::proto::Handler {
                module: "exec".into(),
                function: String::new(),
            },
            deps: Vec::new(),
            about: Default::default(),
        };
        assert_eq!(executable(&spec).unwrap(), Path::new("/code/exec"));
        for bad in ["", "/bin/sh", "../x", "a/../../b", "."] {
            spec.handler.module = bad.into();
            assert!(executable(&spec).is_err(), "{bad:?}");
        }
    }
}

/// The backends on the host itself: the executables are shell scripts in a temporary
/// directory (the Lambda API's needs `curl` and the host's loopback).
#[cfg(test)]
mod backend_tests {
    use std::time::{Duration, Instant};

    use ipc::Payload;

    use super::process::epoch_ms;
    use super::*;

    fn spec(dir: &Path, module: &str, script: &str) -> LoadSpec {
        let path = dir.join(module);
        // Written by a child process: a descriptor of ours open for writing would be
        // inherited by any process another test thread forks meanwhile, and exec'ing
        // the file while one holds it fails with "Text file busy".
        let source = dir.join(format!("{module}.source"));
        std::fs::write(&source, script).unwrap();
        let copied = std::process::Command::new("install")
            .args(["-m", "0755"])
            .arg(&source)
            .arg(&path)
            .status()
            .unwrap();
        assert!(copied.success());
        LoadSpec {
            env: Default::default(),
            function: "f".into(),
            code_dir: dir.to_str().unwrap().into(),
            handler: ipc::proto::Handler {
                module: module.into(),
                function: String::new(),
            },
            deps: Vec::new(),
            about: ipc::proto::About {
                namespace: "ns".into(),
                version: 3,
                memory_mb: 128,
                timeout_ms: 5000,
            },
        }
    }

    fn invocation(id: u64, event: &str) -> Invocation {
        Invocation {
            id,
            depth: 0,
            raw: false,
            event: Payload::Inline(event.as_bytes().to_vec()),
            deadline: Instant::now() + Duration::from_secs(5),
            env: None,
        }
    }

    fn native() -> Native {
        let (a, _b) = Channel::pair().unwrap();
        Native::new(a)
    }

    fn returned(outcome: (Outcome, bool)) -> String {
        match outcome.0 {
            Outcome::Returned { result, .. } => String::from_utf8(result.into_vec()).unwrap(),
            Outcome::Raised(e) => panic!("raised {e:?}"),
        }
    }

    fn raised(outcome: (Outcome, bool)) -> FunctionError {
        match outcome.0 {
            Outcome::Raised(e) => e,
            Outcome::Returned { result, .. } => panic!("returned {:?}", &*result),
        }
    }

    const ACTIONLOOP: &str = r#"#!/bin/sh
n=0
while read -r line; do
  n=$((n+1))
  case "$line" in
    *garbage*) echo "not json" >&3 ;;
    *exit*) exit 7 ;;
    *) printf '{"n":%d,"name":"%s","line":%s}\n' "$n" "$__OW_ACTION_NAME" "$line" >&3 ;;
  esac
done
"#;

    #[test]
    fn actionloop_answers_keeps_state_and_refuses_garbage() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = native();
        n.load(&spec(dir.path(), "exec", ACTIONLOOP)).unwrap();
        let first = returned(n.invoke(invocation(1, "{\"a\":\n1}")).unwrap());
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["n"], 1);
        assert_eq!(v["name"], "/ns/f");
        assert_eq!(v["line"]["value"], serde_json::json!({"a": 1}));
        assert_eq!(v["line"]["activation_id"], format!("{:032x}", 1));
        assert_eq!(v["line"]["action_version"], "3");
        assert!(v["line"]["deadline"]
            .as_str()
            .unwrap()
            .parse::<u128>()
            .is_ok());
        let second = returned(n.invoke(invocation(2, "{}")).unwrap());
        assert!(second.starts_with("{\"n\":2,"), "{second}");
        let e = raised(n.invoke(invocation(3, "\"garbage\"")).unwrap());
        assert!(e.message.contains("not JSON"), "{e:?}");
        // A caller's event that is not one JSON value never reaches the line (it
        // would forge the line's own fields); the executable is still in step.
        let e = raised(
            n.invoke(invocation(4, "1,\"activation_id\":\"forged\""))
                .unwrap(),
        );
        assert!(e.message.contains("the event is not JSON"), "{e:?}");
        let next = returned(n.invoke(invocation(5, "{}")).unwrap());
        assert!(next.starts_with("{\"n\":4,"), "{next}"); // the refused one never reached it
        let e = n.invoke(invocation(4, "\"exit\"")).unwrap_err();
        assert!(e.to_string().contains("exited with status 7"), "{e}");
    }

    #[test]
    fn an_openwhisk_activation_gets_openwhisks_run_fields_on_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = native();
        n.load(&spec(dir.path(), "exec", ACTIONLOOP)).unwrap();
        let mut inv = invocation(1, "[1,2]");
        inv.env = Some(
            [
                ("__OW_API_KEY", "k:s"),
                ("__OW_ACTIVATION_ID", "0123456789abcdef0123456789abcdef"),
                ("__OW_ACTION_NAME", "/ns/pkg/act"),
                ("__OW_DEADLINE", "1700000000000"),
                ("__OW_API_HOST", "https://h \"q\""),
                ("SOME_VAR", "init parameters stay off the line"),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        );
        let v: serde_json::Value = serde_json::from_str(&returned(n.invoke(inv).unwrap())).unwrap();
        let line = &v["line"];
        assert_eq!(line["value"], serde_json::json!([1, 2]));
        assert_eq!(line["api_key"], "k:s");
        assert_eq!(line["activation_id"], "0123456789abcdef0123456789abcdef");
        assert_eq!(line["action_name"], "/ns/pkg/act");
        assert_eq!(line["deadline"], "1700000000000");
        assert_eq!(line["api_host"], "https://h \"q\"");
        assert!(
            line.get("some_var").is_none() && line.get("SOME_VAR").is_none(),
            "{line}"
        );
        // Not sprout's own fields beside them (no key twice).
        assert!(line.get("action_version").is_none(), "{line}");
    }

    #[test]
    fn actionloop_answers_stay_in_step_with_their_invocations() {
        // Junk before the first invocation; every answer twice, in one write (read
        // ahead into the host's buffer) or in two (still in the pipe).
        let script = r#"#!/bin/sh
echo '{"junk":"before"}' >&3
n=0
while read -r line; do
  n=$((n+1))
  if [ $((n % 2)) = 1 ]; then
    printf '{"n":%d}\n{"n":%d,"again":true}\n' "$n" "$n" >&3
  else
    echo "{\"n\":$n}" >&3
    echo "{\"n\":$n,\"again\":true}" >&3
  fi
done
"#;
        let dir = tempfile::tempdir().unwrap();
        let mut n = native();
        n.load(&spec(dir.path(), "exec", script)).unwrap();
        // Bytes written after the next event goes out cannot be told from its answer:
        // give the executable its moment.
        std::thread::sleep(Duration::from_millis(200));
        for i in 1..=4u64 {
            let answer = returned(n.invoke(invocation(i, "{}")).unwrap());
            assert_eq!(answer, format!("{{\"n\":{i}}}"));
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    #[test]
    fn an_executable_that_closes_descriptor_3_but_runs_on_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = native();
        n.load(&spec(
            dir.path(),
            "exec",
            "#!/bin/sh\nexec 3>&-\nexec sleep 60\n",
        ))
        .unwrap();
        let started = Instant::now();
        let e = n.invoke(invocation(1, "{}")).unwrap_err();
        assert!(e.to_string().contains("was killed"), "{e}");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn an_executable_that_cannot_start_fails_the_load() {
        let dir = tempfile::tempdir().unwrap();
        let e = native()
            .load(&spec(dir.path(), "exec", "#!/nonexistent/sh\n"))
            .unwrap_err();
        assert!(e.message.contains("cannot start"), "{e:?}");
    }

    const BOOTSTRAP: &str = r#"#!/bin/sh
api="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
[ -n "$FAIL_INIT" ] && exit 1
n=0
while true; do
  headers=$(mktemp)
  event=$(curl -sS -D "$headers" "$api/invocation/next")
  id=$(grep -i '^lambda-runtime-aws-request-id:' "$headers" | tr -d '\r' | cut -d' ' -f2)
  deadline=$(grep -i '^lambda-runtime-deadline-ms:' "$headers" | tr -d '\r' | cut -d' ' -f2)
  n=$((n+1))
  case "$event" in
    *fail*) curl -sS -o /dev/null -d '{"errorType":"Boom","errorMessage":"it failed","stackTrace":["a","b"]}' "$api/invocation/$id/error" ;;
    *) curl -sS -o /dev/null -d "{\"n\":$n,\"event\":$event,\"deadline\":$deadline,\"fn\":\"$AWS_LAMBDA_FUNCTION_NAME\"}" "$api/invocation/$id/response" ;;
  esac
  rm -f "$headers"
done
"#;

    #[test]
    fn lambda_api_serves_a_curl_bootstrap() {
        let dir = tempfile::tempdir().unwrap();
        let mut n = native();
        n.load(&spec(dir.path(), "bootstrap", BOOTSTRAP))
            .unwrap_or_else(|e| panic!("{e:?}"));
        let before = epoch_ms(Instant::now());
        let first = returned(n.invoke(invocation(1, "{\"a\": 1}")).unwrap());
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["n"], 1);
        assert_eq!(v["event"], serde_json::json!({"a": 1}));
        assert_eq!(v["fn"], "f");
        let deadline = v["deadline"].as_u64().unwrap() as u128;
        assert!(
            deadline >= before + 4000 && deadline <= before + 6000,
            "{deadline} vs {before}"
        );
        let e = raised(n.invoke(invocation(2, "\"fail\"")).unwrap());
        assert_eq!((e.kind.as_str(), e.message.as_str()), ("Boom", "it failed"));
        assert_eq!(e.traceback, "a\nb");
        let third = returned(n.invoke(invocation(3, "[]")).unwrap());
        assert!(third.starts_with("{\"n\":3,"), "{third}");
    }

    #[test]
    fn lambda_api_bootstrap_exiting_or_reporting_fails_the_load() {
        let dir = tempfile::tempdir().unwrap();
        let e = native()
            .load(&spec(dir.path(), "bootstrap", "#!/bin/sh\nexit 3\n"))
            .unwrap_err();
        assert!(e.message.contains("exited with status 3"), "{e:?}");
        let init_error = r#"#!/bin/sh
curl -sS -d '{"errorType":"Init","errorMessage":"no config"}' "http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime/init/error"
exec sleep 5
"#;
        let e = native()
            .load(&spec(dir.path(), "bootstrap", init_error))
            .unwrap_err();
        assert_eq!((e.kind.as_str(), e.message.as_str()), ("Init", "no config"));
    }

    #[test]
    fn lambda_api_refuses_other_request_ids_and_paths() {
        let dir = tempfile::tempdir().unwrap();
        let probe = r#"#!/bin/sh
api="http://$AWS_LAMBDA_RUNTIME_API/2018-06-01/runtime"
a=$(curl -s -o /dev/null -w '%{http_code}' -d '{}' "$api/invocation/123/response")
b=$(curl -s -o /dev/null -w '%{http_code}' "$api/nothing")
c=$(curl -s -o /dev/null -w '%{http_code}' -H "X-Big: $(head -c 20000 /dev/zero | tr '\0' a)" "$api/invocation/next")
# two requests on one kept-alive connection: the second is the long poll
id=$(curl -s -D - -o /dev/null "$api/nothing" "$api/invocation/next" | grep -i request-id | tr -d '\r' | cut -d' ' -f2)
curl -s -o /dev/null -d "{\"codes\":[$a,$b,$c]}" "$api/invocation/$id/response"
exec sleep 5
"#;
        let mut n = native();
        n.load(&spec(dir.path(), "bootstrap", probe)).unwrap();
        let v: serde_json::Value =
            serde_json::from_str(&returned(n.invoke(invocation(9, "{}")).unwrap())).unwrap();
        assert_eq!(v["codes"], serde_json::json!([400, 404, 431]));
    }
}

/// The Lambda runtime API's connections as a hostile or sloppy bootstrap uses them:
/// long polls abandoned, more connections than the limit.
#[cfg(test)]
mod lambda_connection_tests {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    use std::os::unix::fs::PermissionsExt;
    use std::sync::mpsc;
    use std::time::{Duration, Instant};

    use super::lambda_api::MAX_CONNECTIONS;
    use super::*;

    const NEXT: &[u8] = b"GET /2018-06-01/runtime/invocation/next HTTP/1.1\r\nHost: api\r\n\r\n";

    /// Sends `request` on a new connection to `addr`.
    fn send(addr: &str, request: &[u8]) -> TcpStream {
        let mut s = TcpStream::connect(addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s.write_all(request).unwrap();
        s
    }

    /// Reads one answer (head and `Content-Length` body); empty if the connection
    /// closed first.
    fn answer(s: &mut TcpStream) -> String {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            if let Some(end) = text.find("\r\n\r\n") {
                let length = text
                    .lines()
                    .find_map(|l| l.strip_prefix("Content-Length: "))
                    .map_or(0, |n| n.trim().parse::<usize>().unwrap());
                if buf.len() >= end + 4 + length {
                    return text;
                }
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return String::from_utf8_lossy(&buf).into_owned(),
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    }

    fn request_id(answer: &str) -> String {
        answer
            .lines()
            .find_map(|l| l.strip_prefix("Lambda-Runtime-Aws-Request-Id: "))
            .unwrap_or_else(|| panic!("no request id in {answer:?}"))
            .to_owned()
    }

    /// Takes the next event on `s` and answers it with `result`.
    fn serve_one(s: &mut TcpStream, result: &str) {
        let event = answer(s);
        assert!(event.starts_with("HTTP/1.1 200"), "{event:?}");
        let id = request_id(&event);
        let post = format!(
            "POST /2018-06-01/runtime/invocation/{id}/response HTTP/1.1\r\nHost: api\r\n\
             Content-Length: {}\r\n\r\n{result}",
            result.len()
        );
        s.write_all(post.as_bytes()).unwrap();
        let accepted = answer(s);
        assert!(accepted.starts_with("HTTP/1.1 202"), "{accepted:?}");
    }

    fn returned(outcome: (Outcome, bool)) -> String {
        match outcome.0 {
            Outcome::Returned { result, .. } => String::from_utf8(result.into_vec()).unwrap(),
            Outcome::Raised(e) => panic!("raised {e:?}"),
        }
    }

    #[test]
    fn abandoned_long_polls_get_no_event_and_give_their_slots_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bootstrap");
        // The test is the bootstrap's client; the bootstrap only says where the API
        // is, and its exit (after 20 s) ends an invocation that would otherwise hang.
        let script = "#!/bin/sh\necho \"$AWS_LAMBDA_RUNTIME_API\" > addr.tmp\n\
                      mv addr.tmp addr\nexec sleep 20\n";
        std::fs::write(&path, script).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        let spec = LoadSpec {
            env: Default::default(),
            function: "f".into(),
            code_dir: dir.path().to_str().unwrap().into(),
            handler: ipc::proto::Handler {
                module: "bootstrap".into(),
                function: String::new(),
            },
            deps: Vec::new(),
            about: ipc::proto::About {
                namespace: "ns".into(),
                version: 1,
                memory_mb: 128,
                timeout_ms: 5000,
            },
        };
        let addr_file = dir.path().join("addr");
        let (step, stepped) = mpsc::channel();
        let client = std::thread::spawn(move || {
            let started = Instant::now();
            while !addr_file.exists() {
                assert!(started.elapsed() < Duration::from_secs(10), "no address");
                std::thread::sleep(Duration::from_millis(5));
            }
            let addr = std::fs::read_to_string(&addr_file).unwrap();
            let addr = addr.trim();
            // All slots held by live long polls: one more is answered 503.
            let parked: Vec<_> = (0..MAX_CONNECTIONS).map(|_| send(addr, NEXT)).collect();
            std::thread::sleep(Duration::from_millis(200));
            let mut refused = send(addr, NEXT);
            let busy = answer(&mut refused);
            assert!(busy.starts_with("HTTP/1.1 503"), "{busy:?}");
            assert!(
                busy.contains("\"errorType\":\"TooManyConnections\""),
                "{busy:?}"
            );
            // Their clients leave: a new connection gets a slot and the event.
            drop(parked);
            let mut live = send(addr, NEXT);
            step.send(()).unwrap();
            serve_one(&mut live, "{\"round\":1}");
            // Polls abandoned while the next event comes do not take it.
            let abandoned: Vec<_> = (0..3).map(|_| send(addr, NEXT)).collect();
            std::thread::sleep(Duration::from_millis(100));
            drop(abandoned);
            std::thread::sleep(Duration::from_millis(50));
            step.send(()).unwrap();
            std::thread::sleep(Duration::from_millis(100));
            live.write_all(NEXT).unwrap();
            serve_one(&mut live, "{\"round\":2}");
        });
        let mut n = Native::new(Channel::pair().unwrap().0);
        n.load(&spec).unwrap_or_else(|e| panic!("{e:?}"));
        let invocation = |id| Invocation {
            id,
            depth: 0,
            raw: false,
            event: ipc::Payload::Inline(b"{}".to_vec()),
            deadline: Instant::now() + Duration::from_secs(5),
            env: None,
        };
        for (id, want) in [(1, "{\"round\":1}"), (2, "{\"round\":2}")] {
            stepped.recv_timeout(Duration::from_secs(10)).unwrap();
            let started = Instant::now();
            assert_eq!(returned(n.invoke(invocation(id)).unwrap()), want);
            assert!(started.elapsed() < Duration::from_secs(5));
        }
        client.join().unwrap();
    }
}
