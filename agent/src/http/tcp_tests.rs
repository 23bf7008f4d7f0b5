//! The TCP listener end to end, with the fake handler: keys (401, 403, what each
//! rule lets a key do), TLS with certificates made here, and clients that are slow,
//! speak plain HTTP to the TLS port or send garbage.

use std::net::{SocketAddr, TcpStream};

use base64::Engine as _;
use ipc::client::{ClientError, TcpOptions};

use super::*;
use crate::http::Keys;

const ALPHA: &str = "11111111-2222-4333-8444-000000000001:alphaalphaalphaalphaalphaalphaalpha12";
const BETA: &str = "11111111-2222-4333-8444-000000000002:betabetabetabetabetabetabetabetabeta12";
const STAR: &str = "11111111-2222-4333-8444-00000000000f:controllercontrollercontrollercontroller";

fn keys() -> Keys {
    Keys::parse(
        &format!("# test keys\nalpha {ALPHA}\nbeta {BETA}\n* {STAR}\n"),
        Path::new("keys"),
    )
    .unwrap()
}

/// A server on a Unix socket and on `127.0.0.1:0`.
struct Tcp {
    server: TestServer,
    addr: SocketAddr,
    /// The CA's PEM file, for TLS.
    ca: Option<PathBuf>,
}

/// PEM files of a CA, and of a certificate it issued for `localhost` and
/// 127.0.0.1 with its key, in `dir`: (ca, cert, key).
fn certificates(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca_params
        .distinguished_name
        .push(rcgen::DnType::CommonName, "sprout test CA");
    let ca = ca_params.self_signed(&ca_key).unwrap();
    let issuer = rcgen::Issuer::new(ca_params, ca_key);
    let key = rcgen::KeyPair::generate().unwrap();
    let cert = rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
        .unwrap()
        .signed_by(&key, &issuer)
        .unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    fs::write(&paths.0, ca.pem()).unwrap();
    fs::write(&paths.1, cert.pem()).unwrap();
    fs::write(&paths.2, key.serialize_pem()).unwrap();
    std::fs::set_permissions(
        &paths.2,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    (paths.0, paths.1, paths.2)
}

impl Tcp {
    fn start(keys: Option<Keys>, tls: bool) -> Tcp {
        Tcp::with(keys, tls, Limits::default())
    }

    fn with(keys: Option<Keys>, tls: bool, limits: Limits) -> Tcp {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("agent.sock");
        let mut server = Server::bind(&path, limits).unwrap();
        let (ca, config) = if tls {
            let (ca, cert, key) = certificates(dir.path());
            (
                Some(ca),
                Some(crate::http::tls_config(&cert, &key).unwrap()),
            )
        } else {
            (None, None)
        };
        let addr = server
            .listen("127.0.0.1:0".parse().unwrap(), config, keys)
            .unwrap();
        assert_ne!(addr.port(), 0, "the bound port is told");
        let shutdown = server.shutdown_handle();
        let fake = Arc::new(Fake::default());
        let handler: Arc<dyn Handle> = fake.clone();
        let thread = thread::spawn(move || server.run(handler, 4));
        Tcp {
            server: TestServer {
                _dir: dir,
                path,
                fake,
                shutdown,
                thread: Some(thread),
            },
            addr,
            ca,
        }
    }

    fn url(&self) -> String {
        let scheme = if self.ca.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    fn client(&self, key: Option<&str>) -> Client {
        Client::connect_url(
            &self.url(),
            &TcpOptions {
                key: key.map(str::to_owned),
                ca_cert: self.ca.clone(),
            },
        )
        .unwrap()
    }

    fn request(&self, key: Option<&str>, method: &str, path: &str, body: &[u8]) -> ClientResponse {
        self.client(key)
            .request(method, path, Some("application/json"), body)
            .unwrap_or_else(|e| panic!("{method} {path}: {}", ipc::chain(&e)))
    }

    /// A plain TCP connection, reads timing out after 10 s.
    fn raw(&self) -> TcpStream {
        let s = TcpStream::connect(self.addr).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        s
    }
}

fn error_of(r: &ClientResponse) -> ipc::api::ErrorDetail {
    serde_json::from_slice::<ErrorBody>(&r.body)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&r.body)))
        .error
}

fn basic(credentials: &str) -> String {
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(credentials)
    )
}

/// Reads what `s` sends until it closes (or 10 s pass).
fn read_to_end(s: &mut TcpStream) -> String {
    let mut got = Vec::new();
    let _ = s.read_to_end(&mut got);
    String::from_utf8_lossy(&got).into_owned()
}

#[test]
fn a_missing_or_wrong_key_is_401_and_touches_nothing() {
    let t = Tcp::start(Some(keys()), false);
    let (uuid, secret) = ALPHA.split_once(':').unwrap();
    let wrong_secret = format!("{uuid}:{}x", &secret[..secret.len() - 1]);
    for key in [None, Some(wrong_secret.as_str()), Some("nobody:nothing")] {
        for (method, path) in [
            ("POST", "/namespaces/alpha/functions/f/invoke"),
            ("GET", "/status"),
            ("GET", "/stats"),
            ("GET", "/nope"),
            ("GET", "/metrics"),
        ] {
            let r = t.request(key, method, path, b"{}");
            assert_eq!(r.status, 401, "{key:?} {method} {path}");
            assert_eq!(
                r.header("www-authenticate"),
                Some("Basic realm=\"sprout\""),
                "{path}"
            );
            let e = error_of(&r);
            assert_eq!(e.kind, "unauthorized");
            assert!(e.message.contains("basic auth"), "{}", e.message);
        }
    }
    assert!(t.server.take_seen().is_empty(), "nothing reached the agent");

    // Two Authorization headers are no key, even if one is right.
    let mut s = t.raw();
    let head = format!(
        "GET /stats HTTP/1.1\r\nHost: x\r\nAuthorization: {}\r\nAuthorization: {}\r\n\r\n",
        basic(ALPHA),
        basic("nobody:nothing")
    );
    s.write_all(head.as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    assert!(read_to_end(&mut s).starts_with("HTTP/1.1 401 "));
}

#[test]
fn a_key_is_checked_on_the_head_before_any_body_is_read() {
    let t = Tcp::start(Some(keys()), false);
    for (auth, status) in [
        (String::new(), "401"),
        // A valid key on another namespace's route: refused on the head as well.
        (format!("Authorization: {}\r\n", basic(ALPHA)), "403"),
    ] {
        let mut s = t.raw();
        // A large body announced, none sent, no `Expect`: the answer must come anyway,
        // without a `100 Continue`, and the connection is closed after it.
        let head = format!(
            "POST /namespaces/beta/functions/f/invoke HTTP/1.1\r\nHost: x\r\n{auth}Content-Length: 50000000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).unwrap();
        let got = read_to_end(&mut s);
        assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{got}");
        assert!(!got.contains("100 Continue"), "{got}");
        assert!(got.contains("\r\nConnection: close\r\n"), "{got}");
    }
    // No body: a refused request keeps its connection, and the right key then works.
    let mut c = t.client(None);
    assert_eq!(c.request("GET", "/stats", None, b"").unwrap().status, 401);
    let mut s = t.raw();
    let req = |auth: &str| format!("GET /stats HTTP/1.1\r\nHost: x\r\n{auth}\r\n").into_bytes();
    s.write_all(&req("")).unwrap();
    s.write_all(&req(&format!("Authorization: {}\r\n", basic(BETA))))
        .unwrap();
    s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let got = read_to_end(&mut s);
    let statuses: Vec<&str> = got
        .match_indices("HTTP/1.1 ")
        .map(|(i, _)| &got[i + 9..i + 12])
        .collect();
    assert_eq!(statuses, ["401", "200", "401"], "{got}");
    assert!(
        t.server.take_seen().len() == 1,
        "only the keyed request ran"
    );
}

#[test]
fn a_key_acts_only_in_its_namespace_and_the_star_key_in_all() {
    let t = Tcp::start(Some(keys()), false);
    // Its own namespace: served.
    let r = t.request(
        Some(ALPHA),
        "POST",
        "/namespaces/alpha/functions/f/invoke",
        b"{\"a\":1}",
    );
    assert_eq!((r.status, r.body.as_slice()), (200, &b"{\"a\":1}"[..]));
    let r = t.request(Some(ALPHA), "GET", "/namespaces/alpha/functions", b"");
    assert_eq!(r.status, 200);
    assert!(matches!(
        t.server.take_seen().as_slice(),
        [Request::Invoke { namespace, .. }, Request::ListFunctions { namespace: n2 }]
            if namespace == "alpha" && n2 == "alpha"
    ));
    // Another namespace's routes, and the unprefixed ones (`default`): 403, naming
    // nothing of the other namespace.
    for (method, path) in [
        ("POST", "/namespaces/beta/functions/secret/invoke"),
        ("GET", "/namespaces/beta/functions"),
        ("PUT", "/namespaces/beta/workflows/secret"),
        ("POST", "/namespaces/beta/run/secret/x"),
        ("POST", "/functions/secret/invoke"),
        ("POST", "/run/secret"),
        ("DELETE", "/functions/secret"),
        ("GET", "/workflows"),
        ("GET", "/namespaces/beta/usage"),
    ] {
        let r = t.request(Some(ALPHA), method, path, b"{}");
        assert_eq!(r.status, 403, "{method} {path}");
        let e = error_of(&r);
        assert_eq!(e.kind, "forbidden");
        assert!(
            !e.message.contains("beta")
                && !e.message.contains("secret")
                && !e.message.contains("default"),
            "{path}: {}",
            e.message
        );
    }
    // Node-wide routes: the `*` key only.
    for (method, path) in [
        ("GET", "/packages"),
        ("POST", "/packages/gc"),
        ("GET", "/metrics"),
    ] {
        let r = t.request(Some(ALPHA), method, path, b"");
        assert_eq!(r.status, 403, "{method} {path}");
        assert!(error_of(&r).message.contains("\"*\""), "{path}");
    }
    assert!(
        t.server.take_seen().is_empty(),
        "nothing refused reached the agent"
    );

    // Node-wide reads that name nothing: any key.
    let r = t.request(Some(ALPHA), "GET", "/stats", b"");
    assert_eq!(r.status, 200);
    // The status lists only the key's own namespace.
    let r = t.request(Some(ALPHA), "GET", "/status", b"");
    assert_eq!(r.status, 200);
    let status: Status = serde_json::from_slice(&r.body).unwrap();
    let listed: Vec<&str> = status
        .namespaces
        .iter()
        .map(|n| n.namespace.as_str())
        .collect();
    assert_eq!(listed, ["alpha"]);
    assert_eq!(status.invocations, 7, "the counts are the node's");
    t.server.take_seen();

    // The `*` key: every namespace, and the node.
    for (method, path, status) in [
        ("POST", "/namespaces/beta/functions/f/invoke", 200),
        ("POST", "/functions/f/invoke", 200),
        ("GET", "/packages", 200),
        ("POST", "/packages/gc", 200),
        ("GET", "/metrics", 200),
    ] {
        let r = t.request(Some(STAR), method, path, b"{}");
        assert_eq!(r.status, status, "{method} {path}");
    }
    let r = t.request(Some(STAR), "GET", "/status", b"");
    let status: Status = serde_json::from_slice(&r.body).unwrap();
    assert_eq!(status.namespaces.len(), 2);
}

#[test]
fn over_tcp_a_function_is_registered_only_by_upload() {
    let t = Tcp::start(Some(keys()), false);
    let body = br#"{"path":"/etc"}"#;
    for key in [ALPHA, STAR] {
        let r = t.request(Some(key), "PUT", "/namespaces/alpha/functions/f", body);
        assert_eq!(r.status, 403);
        assert!(error_of(&r).message.contains("application/x-tar"));
    }
    assert!(t.server.take_seen().is_empty());
    let r = t
        .client(Some(ALPHA))
        .request(
            "PUT",
            "/namespaces/alpha/functions/f?memory_mb=64",
            Some("application/x-tar"),
            b"tar bytes",
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert!(matches!(
        t.server.take_seen().as_slice(),
        [Request::RegisterFunction {
            source: FunctionSource::Tar(_),
            ..
        }]
    ));
    // The same listener without keys (loopback): still uploads only.
    let open = Tcp::start(None, false);
    let r = open.request(None, "PUT", "/functions/f", body);
    assert_eq!(r.status, 403);
    // The Unix socket, as before, takes paths.
    let r = open
        .server
        .client()
        .request("PUT", "/functions/f", None, body)
        .unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn the_key_never_reaches_an_app() {
    let t = Tcp::start(Some(keys()), false);
    let r = t.request(Some(ALPHA), "POST", "/namespaces/alpha/run/app/x", b"hi");
    assert_eq!(r.status, 418);
    let seen = t.server.take_seen();
    let [Request::Run { run, .. }] = seen.as_slice() else {
        panic!("{seen:?}");
    };
    assert!(
        run.request
            .headers
            .iter()
            .all(|(n, _)| !n.eq_ignore_ascii_case("authorization")),
        "{:?}",
        run.request.headers
    );
    assert!(run
        .request
        .headers
        .iter()
        .any(|(n, _)| n.eq_ignore_ascii_case("host")));
}

#[test]
fn without_keys_only_a_loopback_address_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let mut server = Server::bind(&dir.path().join("s.sock"), Limits::default()).unwrap();
    for addr in ["0.0.0.0:0", "192.0.2.1:0", "[::]:0"] {
        let addr: SocketAddr = addr.parse().unwrap();
        let e = server.listen(addr, None, None).unwrap_err();
        assert!(matches!(e, HttpError::OpenNotLoopback { .. }), "{e}");
        assert!(e.to_string().contains(&addr.to_string()), "{e}");
    }
    // Loopback: served, and anyone there acts in every namespace.
    let t = Tcp::start(None, false);
    let r = t.request(None, "POST", "/namespaces/beta/functions/f/invoke", b"{}");
    assert_eq!(r.status, 200);
    assert_eq!(t.request(None, "GET", "/packages", b"").status, 200);
}

#[test]
fn stats_are_counters_in_openlambdas_form() {
    let t = Tcp::start(None, false);
    let r = t.request(None, "GET", "/stats", b"");
    assert_eq!(r.status, 200);
    assert_eq!(r.header("content-type"), Some("application/json"));
    let stats: serde_json::Map<String, serde_json::Value> =
        serde_json::from_slice(&r.body).unwrap();
    assert!(stats.values().all(|v| v.is_u64()), "{stats:?}");
    for (name, value) in [
        ("invocations", 7),
        ("functions", 2),
        ("sandboxes", 1),
        ("stem_cells", 2),
        ("stem_cells.python", 2),
        ("reserved_mb", 384),
        ("namespaces", 2),
    ] {
        assert_eq!(
            stats.get(name).and_then(|v| v.as_u64()),
            Some(value),
            "{name}"
        );
    }
    // Nothing named: no namespace or function appears.
    let text = String::from_utf8_lossy(&r.body);
    assert!(!text.contains("alpha") && !text.contains("beta"), "{text}");
    let r = t.request(None, "GET", "/stats?x=1", b"");
    assert_eq!(r.status, 400);
}

#[test]
fn many_requests_share_one_tcp_connection() {
    let t = Tcp::start(Some(keys()), false);
    let mut c = t.client(Some(ALPHA));
    for i in 0..50 {
        let event = format!("{{\"i\":{i}}}");
        let r = c
            .request(
                "POST",
                "/namespaces/alpha/functions/warm/invoke",
                None,
                event.as_bytes(),
            )
            .unwrap();
        assert_eq!((r.status, r.body), (200, event.into_bytes()));
    }
}

#[test]
fn tls_serves_a_client_that_trusts_the_certificate() {
    let t = Tcp::start(Some(keys()), true);
    let mut c = t.client(Some(ALPHA));
    for i in 0..20 {
        let event = format!("{{\"i\":{i}}}");
        let r = c
            .request(
                "POST",
                "/namespaces/alpha/functions/f/invoke",
                None,
                event.as_bytes(),
            )
            .unwrap();
        assert_eq!((r.status, r.body), (200, event.into_bytes()));
    }
    // A large response goes out whole through TLS (many records, a full socket).
    let big = format!("\"{}\"", "x".repeat(3 << 20));
    let r = c
        .request(
            "POST",
            "/namespaces/alpha/functions/f/invoke",
            None,
            big.as_bytes(),
        )
        .unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), big.len());
    // Keys are checked through TLS too.
    let r = t.request(None, "GET", "/stats", b"");
    assert_eq!(r.status, 401);
    let r = t.request(Some(BETA), "GET", "/namespaces/alpha/functions", b"");
    assert_eq!(r.status, 403);

    // A client that trusts another CA refuses the server.
    let other = tempfile::tempdir().unwrap();
    let (other_ca, _, _) = certificates(other.path());
    let e = Client::connect_url(
        &t.url(),
        &TcpOptions {
            key: Some(ALPHA.to_owned()),
            ca_cert: Some(other_ca),
        },
    )
    .and_then(|mut c| c.request("GET", "/stats", None, b""))
    .unwrap_err();
    assert!(
        matches!(
            e,
            ClientError::Send { .. } | ClientError::Receive { .. } | ClientError::Closed { .. }
        ),
        "{e:?}"
    );
    assert!(
        ipc::chain(&e).to_lowercase().contains("certificate"),
        "{}",
        ipc::chain(&e)
    );
}

#[test]
fn plain_http_to_the_tls_port_is_told_so_and_closed() {
    let t = Tcp::start(Some(keys()), true);
    let mut s = t.raw();
    s.write_all(b"GET /stats HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let got = read_to_end(&mut s);
    assert!(got.starts_with("HTTP/1.1 400 Bad Request\r\n"), "{got}");
    assert!(got.contains("speaks TLS"), "{got}");
    assert!(got.contains("\r\nConnection: close\r\n"), "{got}");
    // The http:// client gets the same answer, as a response.
    let r = Client::connect_url(&format!("http://{}", t.addr), &TcpOptions::default())
        .unwrap()
        .request("GET", "/stats", None, b"")
        .unwrap();
    assert_eq!(r.status, 400);
    assert!(t.server.take_seen().is_empty());
}

#[test]
fn slow_or_garbage_tls_clients_do_not_stall_the_loop() {
    let limits = Limits {
        read_timeout: Duration::from_millis(500),
        ..Limits::default()
    };
    let t = Tcp::with(Some(keys()), true, limits);
    // Garbage after a byte that starts a TLS handshake record: an alert, then closed.
    let mut garbage = t.raw();
    garbage
        .write_all(b"\x16\x03\x01\x00\x05\xff\xff\xff\xff\xff and more junk")
        .unwrap();
    let mut got = Vec::new();
    let _ = garbage.read_to_end(&mut got);
    assert!(got.len() < 64, "an alert at most: {got:?}");
    // Clients that connect and say nothing, or part of a ClientHello, and stay.
    let silent = t.raw();
    let mut partial = t.raw();
    partial
        .write_all(b"\x16\x03\x01\x02\x00\x01\x00\x01")
        .unwrap();
    // Meanwhile others are served at once.
    let mut c = t.client(Some(ALPHA));
    let started = Instant::now();
    for _ in 0..10 {
        let r = c
            .request("POST", "/namespaces/alpha/functions/f/invoke", None, b"{}")
            .unwrap();
        assert_eq!(r.status, 200);
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    // A handshake is timed like a request head: both are closed, without a word.
    for mut s in [silent, partial] {
        let began = Instant::now();
        let mut got = Vec::new();
        let _ = s.read_to_end(&mut got);
        assert!(got.is_empty(), "{:?}", String::from_utf8_lossy(&got));
        assert!(
            began.elapsed() < Duration::from_secs(5),
            "{:?}",
            began.elapsed()
        );
    }
    // The keep-alive client is still served.
    let r = c.request("GET", "/stats", None, b"").unwrap();
    assert_eq!(r.status, 200);
}

#[test]
fn bad_tls_files_are_refused_naming_them() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = certificates(dir.path());
    let junk = dir.path().join("junk.pem");
    fs::write(&junk, "not pem").unwrap();
    fs::set_permissions(&junk, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
    let e = crate::http::tls_config(&junk, &key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.pem") && e.contains("certificate"), "{e}");
    let e = crate::http::tls_config(&cert, &junk)
        .unwrap_err()
        .to_string();
    assert!(e.contains("junk.pem") && e.contains("private key"), "{e}");
    let e = crate::http::tls_config(&dir.path().join("missing.pem"), &key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("missing.pem"), "{e}");
    // A key that is not the certificate's.
    let other = tempfile::tempdir().unwrap();
    let (_, _, other_key) = certificates(other.path());
    let e = crate::http::tls_config(&cert, &other_key)
        .unwrap_err()
        .to_string();
    assert!(e.contains("does not go with the certificate"), "{e}");
}

#[test]
fn connections_from_the_network_cannot_use_up_the_unix_sockets() {
    let t = Tcp::with(
        Some(keys()),
        false,
        Limits {
            max_connections: 2,
            ..Limits::default()
        },
    );
    // Two connections with no key, doing nothing: the TCP listener is full.
    let idle: Vec<TcpStream> = (0..2).map(|_| t.raw()).collect();
    let mut third = t.raw();
    let refused = read_to_end(&mut third);
    assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
    assert!(refused.contains("too_many_connections"), "{refused}");
    // The Unix socket still serves as many of its own (and a key-less client kept
    // those out before: both listeners shared one count).
    let mut a = t.server.raw();
    a.send(b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(a.response().status, 200);
    let mut b = t.server.raw();
    b.send(b"GET /status HTTP/1.1\r\n\r\n");
    assert_eq!(b.response().status, 200);
    let mut c = t.server.raw();
    let r = c.response();
    assert_eq!(
        (r.status, error_of(&r).kind.as_str()),
        (503, "too_many_connections")
    );
    drop(idle);
}

#[test]
fn a_namespace_key_reads_only_its_namespaces_activations() {
    let t = Tcp::start(Some(keys()), false);
    let id = "0123456789abcdef0123456789abcdef";
    for path in [
        format!("/activations/{id}"),
        format!("/activations/{id}/result"),
        format!("/activations/{id}/logs"),
        "/activations".to_owned(),
        "/activations?name=f&limit=5".to_owned(),
        "/activations?namespace=alpha".to_owned(),
    ] {
        // The fake keeps no records (503): what matters is what it was asked.
        t.request(Some(ALPHA), "GET", &path, b"");
        let seen = t.server.take_seen();
        match seen.as_slice() {
            [Request::GetActivation { namespace, .. }] => {
                assert_eq!(namespace.as_deref(), Some("alpha"), "{path}")
            }
            [Request::ListActivations { query }] => {
                assert_eq!(query.namespace.as_deref(), Some("alpha"), "{path}")
            }
            other => panic!("{path}: {other:?}"),
        }
    }
    // Another namespace's listing is refused before the agent is asked.
    let r = t.request(Some(ALPHA), "GET", "/activations?namespace=beta", b"");
    assert_eq!(r.status, 403, "{}", String::from_utf8_lossy(&r.body));
    assert!(t.server.take_seen().is_empty());
    // The `*` key reads any: nothing narrowed.
    t.request(Some(STAR), "GET", &format!("/activations/{id}"), b"");
    t.request(Some(STAR), "GET", "/activations?namespace=beta", b"");
    assert!(matches!(
        t.server.take_seen().as_slice(),
        [
            Request::GetActivation { namespace: None, .. },
            Request::ListActivations { query },
        ] if query.namespace.as_deref() == Some("beta")
    ));
}

#[test]
fn a_tls_key_others_can_read_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (_, cert, key) = certificates(dir.path());
    assert!(crate::http::tls::server_config(&cert, &key).is_ok());
    std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
    let e = crate::http::tls::server_config(&cert, &key).unwrap_err();
    assert!(e.to_string().contains("key.pem"), "{e}");
    assert!(
        format!(
            "{e} {}",
            std::error::Error::source(&e)
                .map(|s| s.to_string())
                .unwrap_or_default()
        )
        .contains("by others"),
        "{e}"
    );
}

/// An `ActivationMessage` of `user_ns` for the action `action` (`ns/name` or
/// `ns/pkg/name`) with `content`.
fn message(user_ns: &str, action: &str, blocking: bool, content: serde_json::Value) -> Vec<u8> {
    let (path, name) = action.rsplit_once('/').unwrap();
    serde_json::to_vec(&serde_json::json!({
        "transid": ["tid-7", 1700000000000_u64],
        "action": {"path": path, "name": name, "version": "0.0.1"},
        "revision": null,
        "user": {"subject": "someone", "namespace": {"name": user_ns, "uuid": "u-1"},
                 "authkey": {"api_key": "k:s"}},
        "activationId": "00000000000000000000000000000abc",
        "rootControllerIndex": {"asString": "0"},
        "blocking": blocking,
        "content": content
    }))
    .unwrap()
}

fn post_invoke(key: &str, body: &[u8], http10: bool) -> Vec<u8> {
    let version = if http10 { "1.0" } else { "1.1" };
    let mut req = format!(
        "POST /invoke HTTP/{version}\r\nAuthorization: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        basic(key),
        body.len()
    )
    .into_bytes();
    req.extend_from_slice(body);
    req
}

/// Reads from `s` until `buf` holds `end`; the bytes read, and when `end` came.
fn read_until(s: &mut TcpStream, buf: &mut Vec<u8>, end: &[u8]) -> Instant {
    let mut chunk = [0u8; 4096];
    while !buf.windows(end.len()).any(|w| w == end) {
        let n = s.read(&mut chunk).expect("read");
        assert!(n > 0, "closed early: {}", String::from_utf8_lossy(buf));
        buf.extend_from_slice(&chunk[..n]);
    }
    Instant::now()
}

/// One early-acknowledged response on a kept connection: its head, the time from
/// the request to the head and to the body's end, and the acknowledgement.
fn invoke_early(s: &mut TcpStream, body: &[u8]) -> (String, Duration, Duration, serde_json::Value) {
    let sent = Instant::now();
    s.write_all(&post_invoke(STAR, body, false)).unwrap();
    let mut buf = Vec::new();
    let at_head = read_until(s, &mut buf, b"\r\n\r\n");
    let split = buf.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let head = String::from_utf8_lossy(&buf[..split]).into_owned();
    let mut rest = buf[split..].to_vec();
    let at_body = read_until(s, &mut rest, b"\r\n0\r\n\r\n");
    // One chunk: `SIZE\r\nBODY\r\n0\r\n\r\n`.
    let text = String::from_utf8(rest).unwrap();
    let (size, tail) = text.split_once("\r\n").unwrap();
    let size = usize::from_str_radix(size, 16).unwrap();
    assert_eq!(&tail[size..], "\r\n0\r\n\r\n", "one chunk, then the end");
    let ack = serde_json::from_str(&tail[..size]).unwrap();
    (head, at_head - sent, at_body - sent, ack)
}

#[test]
fn invoke_answers_its_head_at_once_and_the_acknowledgement_when_done() {
    let tcp = Tcp::start(Some(keys()), false);
    let mut s = tcp.raw();
    let body = message(
        "alpha",
        "alpha/pkg/echo",
        true,
        serde_json::json!({"sleep_ms": 400, "x": 1}),
    );
    let (head, to_head, to_body, ack) = invoke_early(&mut s, &body);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains("\r\nContent-Type: application/json\r\n"),
        "{head}"
    );
    assert!(
        head.contains("\r\nTransfer-Encoding: chunked\r\n"),
        "{head}"
    );
    assert!(!head.contains("Content-Length"), "{head}");
    assert!(
        to_head < Duration::from_millis(300),
        "head after {to_head:?}"
    );
    assert!(
        to_body - to_head >= Duration::from_millis(350),
        "body {to_body:?} head {to_head:?}"
    );
    assert_eq!(
        ack["transid"],
        serde_json::json!(["tid-7", 1700000000000_u64])
    );
    assert_eq!(ack["isSystemError"], serde_json::json!(false));
    assert_eq!(
        ack["invoker"],
        serde_json::json!({"instance": 0, "userMemory": "0 MB"})
    );
    let activation = &ack["response"];
    assert_eq!(activation["namespace"], "alpha");
    assert_eq!(activation["name"], "echo");
    assert_eq!(activation["response"]["result"]["x"], 1);
    assert_eq!(activation["annotations"][0]["value"], "alpha/pkg/echo");
    let seen = tcp.server.fake.seen.lock().unwrap().len();
    assert!(seen >= 1);

    // The same connection serves a non-blocking message (its id alone), then a ping.
    let body = message("beta", "beta/echo", false, serde_json::json!({}));
    let (head, _, _, ack) = invoke_early(&mut s, &body);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(ack["response"], "00000000000000000000000000000abc");
    s.write_all(
        format!(
            "GET /ping HTTP/1.1\r\nAuthorization: {}\r\n\r\n",
            basic(ALPHA)
        )
        .as_bytes(),
    )
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"{\"ok\":true}");
    assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"));
}

#[test]
fn an_unknown_action_or_encrypted_parameters_are_acknowledged_as_application_errors() {
    let tcp = Tcp::start(Some(keys()), false);
    let mut s = tcp.raw();
    let body = message("alpha", "alpha/missing", true, serde_json::json!({}));
    let (head, _, _, ack) = invoke_early(&mut s, &body);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert_eq!(ack["isSystemError"], false);
    assert_eq!(ack["response"]["response"]["statusCode"], 1);
    assert_eq!(
        ack["response"]["response"]["result"]["error"],
        "Action could not be found or may have been deleted."
    );
    let mut msg: serde_json::Value = serde_json::from_slice(&message(
        "alpha",
        "alpha/echo",
        true,
        serde_json::json!({"p": "c2VjcmV0"}),
    ))
    .unwrap();
    msg["lockedArgs"] = serde_json::json!({"p": "k1"});
    let (_, _, _, ack) = invoke_early(&mut s, &serde_json::to_vec(&msg).unwrap());
    assert_eq!(ack["response"]["response"]["statusCode"], 1);
    let error = ack["response"]["response"]["result"]["error"]
        .as_str()
        .unwrap();
    assert!(
        error.contains("lockedArgs") && error.contains("does not decrypt"),
        "{error}"
    );
}

#[test]
fn invoke_refuses_before_any_acknowledgement() {
    let tcp = Tcp::start(Some(keys()), false);
    let good = message("alpha", "alpha/echo", true, serde_json::json!({}));
    let cases: [(&str, Vec<u8>, u16, &str); 5] = [
        // A namespace key, for another namespace's message or action.
        (
            ALPHA,
            message("beta", "beta/echo", true, serde_json::json!({})),
            403,
            "forbidden",
        ),
        (
            ALPHA,
            message("alpha", "beta/echo", true, serde_json::json!({})),
            403,
            "forbidden",
        ),
        // A wrong key.
        (
            "11111111-2222-4333-8444-000000000001:wrongwrongwrongwrongwrongwrongwrong12",
            good.clone(),
            401,
            "unauthorized",
        ),
        // Not an ActivationMessage.
        (STAR, b"{\"transid\": 1}".to_vec(), 400, "bad_request"),
        (
            STAR,
            message("alpha", "alpha/echo", true, serde_json::json!("text")),
            400,
            "content must be",
        ),
    ];
    for (key, body, status, says) in cases {
        let mut s = tcp.raw();
        s.write_all(&post_invoke(key, &body, false)).unwrap();
        let got = read_to_end(&mut s);
        assert!(got.starts_with(&format!("HTTP/1.1 {status} ")), "{got}");
        assert!(
            got.contains("Content-Length:") && !got.contains("chunked"),
            "{got}"
        );
        assert!(got.contains(says), "{got}");
    }
    // Its own namespace's key is heard.
    let mut s = tcp.raw();
    s.write_all(&post_invoke(ALPHA, &good, false)).unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"\r\n0\r\n\r\n");
    assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"));
}

#[test]
fn an_http10_client_gets_the_acknowledgement_until_close_and_a_failure_cuts_it_short() {
    let tcp = Tcp::start(Some(keys()), false);
    let mut s = tcp.raw();
    s.write_all(&post_invoke(
        STAR,
        &message("alpha", "alpha/echo", false, serde_json::json!({})),
        true,
    ))
    .unwrap();
    let got = read_to_end(&mut s);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(
        got.contains("\r\nConnection: close\r\n") && !got.contains("chunked"),
        "{got}"
    );
    let body = &got[got.find("\r\n\r\n").unwrap() + 4..];
    let ack: serde_json::Value = serde_json::from_str(body).unwrap();
    assert_eq!(ack["response"], "00000000000000000000000000000abc");

    // The handler fails after the head went out: the body never completes.
    let mut s = tcp.raw();
    s.write_all(&post_invoke(
        STAR,
        &message("alpha", "alpha/panic", true, serde_json::json!({})),
        false,
    ))
    .unwrap();
    let got = read_to_end(&mut s);
    assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
    assert!(
        got.ends_with("\r\n\r\n") && !got.contains("\r\n0\r\n"),
        "{got:?}"
    );
}

/// OpenWhisk hands an action its caller's key (`__OW_API_KEY`): a namespace's own
/// key does, a `*` key (an operator's) never.
#[test]
fn only_a_namespace_key_is_handed_to_an_action() {
    let t = Tcp::start(Some(keys()), false);
    for (key, handed) in [(ALPHA, Some(ALPHA)), (STAR, None)] {
        t.request(
            Some(key),
            "POST",
            "/api/v1/namespaces/alpha/actions/act?blocking=true",
            b"{}",
        );
        let seen = t.server.take_seen();
        let [Request::InvokeAction { call, .. }] = seen.as_slice() else {
            panic!("{seen:?}");
        };
        assert_eq!(call.api_key.as_deref(), handed);
    }
}

/// A body of many small values would cost 32 bytes a value parsed: it is counted
/// first, and refused (413) before a tree or an acknowledgement is made.
#[test]
fn openwhisk_bodies_with_too_many_values_are_refused_before_parsing() {
    let t = Tcp::start(Some(keys()), false);
    let many = serde_json::Value::Array(vec![0.into(); ipc::openwhisk::MAX_JSON_VALUES]);
    // POST /invoke: the whole message counts.
    let mut s = t.raw();
    s.write_all(&post_invoke(
        STAR,
        &message("alpha", "alpha/act", true, many.clone()),
        false,
    ))
    .unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"values");
    let text = String::from_utf8_lossy(&buf);
    assert!(text.starts_with("HTTP/1.1 413 "), "{text}");
    assert!(text.contains("more than 1048576 values"), "{text}");
    // The REST API: the invocation's parameters.
    let body = serde_json::to_vec(&serde_json::json!({ "xs": many })).unwrap();
    let r = t.request(
        Some(ALPHA),
        "POST",
        "/api/v1/namespaces/alpha/actions/act?blocking=true",
        &body,
    );
    assert_eq!(r.status, 413, "{}", String::from_utf8_lossy(&r.body));
    assert!(t.server.take_seen().is_empty(), "nothing was dispatched");
}

/// An early acknowledgement promises the run: a message acknowledged while every
/// worker is busy still runs after its client went away.
#[test]
fn an_acknowledged_message_runs_though_its_client_is_gone() {
    let t = Tcp::start(Some(keys()), false);
    let busy: Vec<TcpStream> = (0..4)
        .map(|_| {
            let mut s = t.raw();
            let body = message(
                "alpha",
                "alpha/slow",
                true,
                serde_json::json!({"sleep_ms": 1500}),
            );
            s.write_all(&post_invoke(STAR, &body, false)).unwrap();
            let mut buf = Vec::new();
            read_until(&mut s, &mut buf, b"\r\n\r\n");
            s
        })
        .collect();
    let mut s = t.raw();
    let body = message("alpha", "alpha/queued", true, serde_json::json!({"n": 1}));
    s.write_all(&post_invoke(STAR, &body, false)).unwrap();
    let mut buf = Vec::new();
    read_until(&mut s, &mut buf, b"\r\n\r\n");
    assert!(buf.starts_with(b"HTTP/1.1 200 OK\r\n"));
    // A reset, which the server sees at once (a FIN alone it takes for a
    // half-close, still answered).
    nix::sys::socket::setsockopt(
        &s,
        nix::sys::socket::sockopt::Linger,
        &libc::linger {
            l_onoff: 1,
            l_linger: 0,
        },
    )
    .unwrap();
    drop(s);
    let ran = |seen: &[Request]| {
        seen.iter()
            .any(|r| matches!(r, Request::Invoker(m) if m.action.name == "queued"))
    };
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ran(&seen) && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(50));
        seen.extend(t.server.take_seen());
    }
    assert!(ran(&seen), "the acknowledged message never ran: {seen:?}");
    drop(busy);
}
