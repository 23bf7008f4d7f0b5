//! Limits on requests and connections, which bound hostile or careless clients.

use std::time::Duration;

/// Limits on requests and connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest request body (after chunked decoding); larger ones get 413.
    pub max_body: usize,
    /// Largest request head (request line and headers); larger ones get 431.
    pub max_head: usize,
    /// A request head must be complete this long after its first byte arrived, and
    /// its body must not stall this long (counted from the head, then from the last
    /// bytes of it read); otherwise 408 and the connection is closed.
    pub read_timeout: Duration,
    /// A connection with no request begun (keep-alive, or new), or whose client
    /// takes no bytes of its response for this long, is closed.
    pub idle_timeout: Duration,
    /// Connections open at most; more are answered 503 and closed at once.
    pub max_connections: usize,
    /// An OpenWhisk blocking invocation (`/api/v1`) still running after this long is
    /// answered 202 with its activation id (OpenWhisk's 60 s).
    pub openwhisk_wait: Duration,
}

impl Default for Limits {
    fn default() -> Limits {
        Limits {
            max_body: 64 << 20,
            max_head: 64 << 10,
            read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 1024,
            openwhisk_wait: Duration::from_secs(60),
        }
    }
}

impl Limits {
    /// How often the loop looks for connections past a timeout: a timeout fires up
    /// to this much late (up to twice this, counted from the phase's start).
    pub(super) fn sweep_every(&self) -> Duration {
        (self.read_timeout.min(self.idle_timeout) / 8)
            .clamp(Duration::from_millis(10), Duration::from_secs(1))
    }
}
