//! How a connection ended: the `outcome` label of `mqlb_connections_total`. A bottom module
//! (it imports nothing of the crate): the connection path sets it, the metrics name it.

/// Names say who ended or failed it: the client, the backend, or mqlb itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides closed normally.
    Closed,
    ClientError,
    BackendError,
    IdleTimeout,
    /// Closed because its backend's probe went down (rule `close_on_backend_down`).
    BackendDown,
    /// Cut when shutdown's grace period ran out.
    Shutdown,
    /// Every backend tried refused or timed out.
    ConnectFailed,
    /// No backend eligible (all down or draining).
    NoBackend,
    /// The CONNECT could not be used (malformed, oversized, too slow, fallback = reject).
    Rejected,
    /// The backend's admission queue was full (`max_queue`).
    QueueFull,
    /// No connect slot of the backend came free within `queue_timeout`.
    QueueTimeout,
    /// Moved off its backend by an evacuation (MQTT 5: DISCONNECT 0x9C first).
    Evacuated,
}

impl Outcome {
    pub const ALL: [Outcome; 12] = [
        Outcome::Closed,
        Outcome::ClientError,
        Outcome::BackendError,
        Outcome::IdleTimeout,
        Outcome::BackendDown,
        Outcome::Shutdown,
        Outcome::ConnectFailed,
        Outcome::NoBackend,
        Outcome::Rejected,
        Outcome::QueueFull,
        Outcome::QueueTimeout,
        Outcome::Evacuated,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Outcome::Closed => "closed",
            Outcome::ClientError => "client_error",
            Outcome::BackendError => "backend_error",
            Outcome::IdleTimeout => "idle_timeout",
            Outcome::BackendDown => "backend_down",
            Outcome::Shutdown => "shutdown",
            Outcome::ConnectFailed => "connect_failed",
            Outcome::NoBackend => "no_backend",
            Outcome::Rejected => "rejected",
            Outcome::QueueFull => "queue_full",
            Outcome::QueueTimeout => "queue_timeout",
            Outcome::Evacuated => "evacuated",
        }
    }
}
