//! OpenWhisk's CouchDB, as its invoker uses it (`--whisks-db URL`): action documents
//! fetched from the `whisks` database (`GET whisks/{ns/name}?rev=`, with inline,
//! `mem:` and `couch:` code), and non-blocking activations' records written to the
//! `activations` database in batches (`_bulk_docs`) by a thread of their own
//! (`sprout-whisks-writer`), off the activation's path.
//!
//! The database is the controller's and trusted as it is: a document is still
//! bounded ([`MAX_DOCUMENT`]) and checked for its shape, and a failure names the
//! document.

use std::io::Read as _;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use base64::Engine as _;
use crossbeam_channel::{Receiver, RecvTimeoutError, Sender, TrySendError};
use ipc::openwhisk::action::{Action, Exec, Limits};
use ipc::openwhisk::activation::WhiskActivation;
use ipc::openwhisk::KeyValue;
use parking_lot::Mutex;
use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};
use serde::Deserialize;
use tracing::{debug, warn};

/// The largest action document or attachment read (OpenWhisk's code limit is 48 MB).
pub const MAX_DOCUMENT: u64 = 64 << 20;
/// Records the writer holds before new ones are dropped (with a warning).
const QUEUE: usize = 16_384;
/// The bytes of serialised records the writer holds at most: a slow or absent
/// database costs the node no more memory than this, whatever the records hold.
const QUEUE_BYTES: usize = 64 << 20;
/// Records in one `_bulk_docs` request at most.
const BATCH: usize = 128;
/// The bytes of records in one `_bulk_docs` request at most (a larger record
/// goes alone).
const BATCH_BYTES: usize = 8 << 20;
/// How long the writer waits for company after a record arrives.
const LINGER: Duration = Duration::from_millis(10);
/// How long one request to the database may take.
const TIMEOUT: Duration = Duration::from_secs(30);

/// Everything in a path segment but unreserved characters is encoded (`/` too:
/// a document id `ns/name` is one segment, as OpenWhisk's invoker sends it).
const SEGMENT: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'.')
    .remove(b'_')
    .remove(b'~');

/// What went wrong with the database.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("--whisks-db {url:?}: {reason}")]
    Url { url: String, reason: &'static str },
    #[error("GET {what}")]
    Get {
        what: String,
        #[source]
        source: Box<ureq::Error>,
    },
    #[error("GET {what}: larger than {MAX_DOCUMENT} bytes")]
    TooLarge { what: String },
    #[error("the document {id}: {reason}")]
    Document { id: String, reason: String },
    #[error("start the whisks database writer thread")]
    Thread(#[source] std::io::Error),
}

/// A CouchDB server: its base URL (scheme, host, port, path prefix) and credentials.
#[derive(Clone)]
pub struct CouchDb {
    base: String,
    /// `Basic ...` from the URL's user information.
    authorization: Option<String>,
    agent: ureq::Agent,
}

impl std::fmt::Debug for CouchDb {
    /// Never prints the credentials.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CouchDb")
            .field("base", &self.base)
            .field("credentials", &self.authorization.is_some())
            .finish()
    }
}

impl CouchDb {
    /// `http[s]://[user:password@]host[:port][/prefix]`.
    pub fn new(url: &str) -> Result<CouchDb, Error> {
        let bad = |reason| Error::Url {
            url: redact(url),
            reason,
        };
        let (scheme, rest) = url
            .split_once("://")
            .ok_or_else(|| bad("not a URL: give http://HOST:PORT or https://HOST:PORT"))?;
        if scheme != "http" && scheme != "https" {
            return Err(bad("the scheme must be http or https"));
        }
        let (authority, path) = match rest.find('/') {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        if path.contains(['?', '#']) {
            return Err(bad("a query or fragment is not allowed"));
        }
        let (userinfo, host) = match authority.rsplit_once('@') {
            Some((user, host)) => (Some(user), host),
            None => (None, authority),
        };
        if host.is_empty() {
            return Err(bad("no host"));
        }
        let authorization = userinfo.map(|user| {
            let decoded = percent_encoding::percent_decode_str(user).decode_utf8_lossy();
            format!(
                "Basic {}",
                base64::engine::general_purpose::STANDARD.encode(decoded.as_bytes())
            )
        });
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(TIMEOUT))
            .http_status_as_error(false)
            .build()
            .new_agent();
        Ok(CouchDb {
            base: format!("{scheme}://{host}{}", path.trim_end_matches('/')),
            authorization,
            agent,
        })
    }

    /// GETs `path` (below the base): `Ok(None)` on 404.
    fn get(&self, path: &str) -> Result<Option<Vec<u8>>, Error> {
        let what = path.to_owned();
        let mut req = self.agent.get(format!("{}/{path}", self.base));
        if let Some(auth) = &self.authorization {
            req = req.header("Authorization", auth);
        }
        let mut resp = req.call().map_err(|e| Error::Get {
            what: what.clone(),
            source: Box::new(e),
        })?;
        let status = resp.status().as_u16();
        if status == 404 {
            return Ok(None);
        }
        let mut body = Vec::new();
        resp.body_mut()
            .as_reader()
            .take(MAX_DOCUMENT + 1)
            .read_to_end(&mut body)
            .map_err(|e| Error::Get {
                what: what.clone(),
                source: Box::new(ureq::Error::Io(e)),
            })?;
        if body.len() as u64 > MAX_DOCUMENT {
            return Err(Error::TooLarge { what });
        }
        if status != 200 {
            return Err(Error::Get {
                what,
                source: Box::new(ureq::Error::StatusCode(status)),
            });
        }
        Ok(Some(body))
    }

    /// POSTs `docs` to `{db}/_bulk_docs`.
    /// `POST {db}/_bulk_docs` of `docs`, each a serialised JSON document.
    fn bulk_docs(&self, db: &str, docs: &[Vec<u8>]) -> Result<(), String> {
        let mut req = self
            .agent
            .post(format!("{}/{db}/_bulk_docs", self.base))
            .header("Content-Type", "application/json");
        if let Some(auth) = &self.authorization {
            req = req.header("Authorization", auth);
        }
        let body = [&b"{\"docs\":["[..], &docs.join(&b","[..]), b"]}"].concat();
        let resp = req.send(&body[..]).map_err(|e| e.to_string())?;
        match resp.status().as_u16() {
            200..=202 => Ok(()),
            status => Err(format!("status {status}")),
        }
    }

    /// The action document `id` (`ns/name` or `ns/pkg/name`) at `rev`, or the latest
    /// when that revision is gone (or none is given), with its code read (inline,
    /// `mem:` or `couch:`): the action and its revision. `Ok(None)`: no such action.
    pub fn action(&self, id: &str, rev: Option<&str>) -> Result<Option<(Action, String)>, Error> {
        let doc_path = format!("whisks/{}", utf8_percent_encode(id, SEGMENT));
        let mut body = None;
        if let Some(rev) = rev {
            body = self.get(&format!(
                "{doc_path}?rev={}",
                utf8_percent_encode(rev, SEGMENT)
            ))?;
        }
        if body.is_none() {
            body = self.get(&doc_path)?;
        }
        let Some(body) = body else {
            return Ok(None);
        };
        let bad = |reason: String| Error::Document {
            id: id.to_owned(),
            reason,
        };
        let doc: Document =
            serde_json::from_slice(&body).map_err(|e| bad(format!("not an action: {e}")))?;
        if doc.entity_type.as_deref().is_some_and(|t| t != "action") {
            return Err(bad(format!(
                "its entityType is {:?}, not \"action\"",
                doc.entity_type.unwrap_or_default()
            )));
        }
        let binary = doc.exec.binary;
        let code = match doc.exec.code {
            None => None,
            Some(Code::Inline(text)) => Some(text),
            Some(Code::Attachment(att)) => {
                let name = att.attachment_name;
                let bytes = if let Some(inline) = name.strip_prefix("mem:") {
                    base64::engine::general_purpose::URL_SAFE
                        .decode(inline.trim_end_matches('='))
                        .or_else(|_| {
                            base64::engine::general_purpose::URL_SAFE_NO_PAD
                                .decode(inline.trim_end_matches('='))
                        })
                        .map_err(|e| bad(format!("its mem: attachment is not base64url: {e}")))?
                } else if let Some(attachment) = name.strip_prefix("couch:") {
                    let path = format!(
                        "{doc_path}/{}?rev={}",
                        utf8_percent_encode(attachment, SEGMENT),
                        utf8_percent_encode(&doc.rev, SEGMENT)
                    );
                    self.get(&path)?
                        .ok_or_else(|| bad(format!("its attachment {attachment:?} is missing")))?
                } else {
                    return Err(bad(format!(
                        "its code attachment {name:?} is neither mem: nor couch:"
                    )));
                };
                let octets = att.attachment_type.as_deref() == Some("application/octet-stream");
                if binary || octets {
                    // The action's code is base64 of its archive.
                    Some(base64::engine::general_purpose::STANDARD.encode(&bytes))
                } else {
                    Some(
                        String::from_utf8(bytes)
                            .map_err(|_| bad("its code attachment is not UTF-8 text".into()))?,
                    )
                }
            }
        };
        let action = Action {
            namespace: Some(doc.namespace),
            name: Some(doc.name),
            exec: Some(Exec {
                kind: doc.exec.kind,
                code,
                binary,
                main: doc.exec.main,
                image: doc.exec.image,
            }),
            limits: doc.limits,
            parameters: doc.parameters,
            annotations: doc.annotations,
            version: doc.version,
            publish: doc.publish,
        };
        Ok(Some((action, doc.rev)))
    }
}

/// `user:password@` left out of a URL shown in an error.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}***@{}", &url[..s + 3], &url[at + 1..]),
        _ => url.to_owned(),
    }
}

/// An action document of the `whisks` database, as OpenWhisk writes it.
#[derive(Deserialize)]
struct Document {
    #[serde(rename = "_rev")]
    rev: String,
    namespace: String,
    name: String,
    #[serde(default, rename = "entityType")]
    entity_type: Option<String>,
    exec: DocExec,
    #[serde(default)]
    limits: Option<Limits>,
    #[serde(default)]
    parameters: Vec<KeyValue>,
    #[serde(default)]
    annotations: Vec<KeyValue>,
    #[serde(default)]
    version: Option<String>,
    #[serde(default)]
    publish: bool,
}

#[derive(Deserialize)]
struct DocExec {
    kind: String,
    #[serde(default)]
    code: Option<Code>,
    #[serde(default)]
    binary: bool,
    #[serde(default)]
    main: Option<String>,
    #[serde(default)]
    image: Option<String>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Code {
    Inline(String),
    Attachment(Attachment),
}

#[derive(Deserialize)]
struct Attachment {
    #[serde(rename = "attachmentName")]
    attachment_name: String,
    #[serde(default, rename = "attachmentType")]
    attachment_type: Option<String>,
}

/// The `activations` database's writer: records queued by [`Writer::push`], written
/// in batches by its thread. Records wait serialised, bounded in number
/// ([`QUEUE`]) and in bytes ([`QUEUE_BYTES`]).
pub struct Writer {
    tx: Mutex<Option<Sender<Vec<u8>>>>,
    /// Bytes of the records queued and not yet taken by the thread.
    queued: Arc<AtomicUsize>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Writer")
    }
}

impl Writer {
    pub fn start(db: CouchDb) -> Result<Writer, Error> {
        let (tx, rx) = crossbeam_channel::bounded(QUEUE);
        let queued = Arc::new(AtomicUsize::new(0));
        let taken = Arc::clone(&queued);
        let thread = std::thread::Builder::new()
            .name("sprout-whisks-writer".into())
            .spawn(move || write_batches(&db, &rx, &taken))
            .map_err(Error::Thread)?;
        Ok(Writer {
            tx: Mutex::new(Some(tx)),
            queued,
            thread: Mutex::new(Some(thread)),
        })
    }

    /// Queues `activation`'s record (its `_id` is `namespace/activationId`, as
    /// OpenWhisk's). Never blocks: a full queue (in records or in bytes) drops it,
    /// with a warning.
    pub fn push(&self, activation: &WhiskActivation) {
        let doc = WhiskDocument {
            id: format!("{}/{}", activation.namespace, activation.activation_id),
            entity_type: "activation",
            activation,
        };
        let Ok(bytes) = serde_json::to_vec(&doc) else {
            return;
        };
        let len = bytes.len();
        if self.queued.fetch_add(len, Ordering::AcqRel) + len > QUEUE_BYTES {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            warn!(activation_id = %activation.activation_id, bytes = len, "the activations database's queue is full (in bytes): record dropped");
            return;
        }
        let refused = match &*self.tx.lock() {
            Some(tx) => match tx.try_send(bytes) {
                Ok(()) => None,
                Err(TrySendError::Full(_)) => Some("the activations database's queue is full"),
                Err(TrySendError::Disconnected(_)) => Some("the activations writer has stopped"),
            },
            None => Some("the activations writer has stopped"),
        };
        if let Some(why) = refused {
            self.queued.fetch_sub(len, Ordering::AcqRel);
            warn!(activation_id = %activation.activation_id, "{why}: record dropped");
        }
    }

    /// Writes what is queued and stops the thread.
    pub fn stop(&self) {
        drop(self.tx.lock().take());
        if let Some(thread) = self.thread.lock().take() {
            let _ = thread.join();
        }
    }
}

/// An activation as a document of OpenWhisk's `activations` database.
#[derive(serde::Serialize)]
struct WhiskDocument<'a> {
    #[serde(rename = "_id")]
    id: String,
    #[serde(rename = "entityType")]
    entity_type: &'static str,
    #[serde(flatten)]
    activation: &'a WhiskActivation,
}

fn write_batches(db: &CouchDb, rx: &Receiver<Vec<u8>>, queued: &AtomicUsize) {
    // A record that would take a batch past BATCH_BYTES starts the next one.
    let mut carried: Option<Vec<u8>> = None;
    loop {
        let Some(first) = carried.take().or_else(|| rx.recv().ok()) else {
            return;
        };
        let mut bytes = first.len();
        let mut batch = vec![first];
        let until = Instant::now() + LINGER;
        while batch.len() < BATCH {
            match rx.recv_deadline(until) {
                Ok(doc) if bytes + doc.len() > BATCH_BYTES => {
                    carried = Some(doc);
                    break;
                }
                Ok(doc) => {
                    bytes += doc.len();
                    batch.push(doc);
                }
                Err(RecvTimeoutError::Timeout | RecvTimeoutError::Disconnected) => break,
            }
        }
        // One retry: the database may be restarting.
        let written = db.bulk_docs("activations", &batch).or_else(|_| {
            std::thread::sleep(Duration::from_millis(200));
            db.bulk_docs("activations", &batch)
        });
        match written {
            Ok(()) => debug!(
                records = batch.len(),
                "records written to the activations database"
            ),
            Err(e) => {
                warn!(records = batch.len(), error = %e, "records not written to the activations database")
            }
        }
        // Counted until written, so that what waits and what is being written
        // together stay within QUEUE_BYTES.
        queued.fetch_sub(bytes, Ordering::AcqRel);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_take_credentials_and_a_prefix_and_refuse_the_rest() {
        let db = CouchDb::new("http://admin:p%40ss@127.0.0.1:5984/couch/").unwrap();
        assert_eq!(db.base, "http://127.0.0.1:5984/couch");
        let expected = base64::engine::general_purpose::STANDARD.encode("admin:p@ss");
        assert_eq!(db.authorization, Some(format!("Basic {expected}")));
        assert!(!format!("{db:?}").contains("p@ss"));
        let db = CouchDb::new("https://couch.example").unwrap();
        assert_eq!(db.base, "https://couch.example");
        assert_eq!(db.authorization, None);
        for (bad, says) in [
            ("couch.example:5984", "not a URL"),
            ("ftp://h", "http or https"),
            ("http://", "no host"),
            ("http://u:secret@h/?x=1", "query"),
        ] {
            let e = CouchDb::new(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
            assert!(!e.contains("secret"), "{e}");
        }
    }

    #[test]
    fn document_ids_are_one_path_segment() {
        let id = utf8_percent_encode("guest/my pkg/act@1", SEGMENT).to_string();
        assert_eq!(id, "guest%2Fmy%20pkg%2Fact%401");
    }
}
