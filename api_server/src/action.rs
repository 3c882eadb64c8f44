//! What the API thread hands the VMM's control thread: one [`ApiRequest`] per HTTP request, and
//! the [`ApiResponse`] the control thread sends back through [`Responder`].

use serde::Serialize;
use thiserror::Error;

use crate::config::VmConfig;
use crate::migration::{ReceiveMigrationRequest, SendMigrationRequest};
use crate::models::{RestoreRequest, SnapshotRequest, VmState};

/// An action the control thread performs. Bodies are already parsed and checked (JSON shape,
/// `VmConfig::validate`, `file://` URLs); state checks are the control thread's job.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiAction {
    /// `GET /api/v1/vmm.ping`: answer `Json(PingResponse)`.
    Ping,
    /// `PUT /api/v1/vmm.shutdown`: answer `Empty`, then stop the VM (if any) and exit skiff.
    VmmShutdown,
    /// `PUT /api/v1/vm.create`: create (not boot) a VM from this configuration.
    Create(Box<VmConfig>),
    /// `PUT /api/v1/vm.boot`: start the created VM.
    Boot,
    /// `PUT /api/v1/vm.pause`: stop every vCPU.
    Pause,
    /// `PUT /api/v1/vm.resume`: restart the vCPUs of a paused VM.
    Resume,
    /// `PUT /api/v1/vm.shutdown`: stop the VM (state `Shutdown`; it can be booted again).
    Shutdown,
    /// `PUT /api/v1/vm.reboot`: reset the VM.
    Reboot,
    /// `PUT /api/v1/vm.power-button`: press the ACPI power button.
    PowerButton,
    /// `GET /api/v1/vm.info`: answer `Json(VmInfo)`.
    Info,
    /// `GET /api/v1/vm.counters`: answer `Json(Counters)`.
    Counters,
    /// `PUT /api/v1/vm.snapshot`: write a snapshot of the (paused) VM.
    Snapshot(SnapshotRequest),
    /// `PUT /api/v1/vm.restore`: create a VM from a snapshot.
    Restore(RestoreRequest),
    /// `PUT /api/v1/vm.delete`: stop and forget the VM.
    Delete,
    /// `PUT /api/v1/vm.send-migration`: start migrating the VM (checked: URL, ranges, `local`
    /// only with `unix:`). Answer `Empty` once the migration has started (the target is
    /// connected; the progress already reports this migration, not the last one); it goes on
    /// in the background, reported by `MigrationProgress` and one
    /// `migration` event per phase. The VM becomes `Migrating`, and `Migrated` once completed.
    SendMigration(SendMigrationRequest),
    /// `PUT /api/v1/vm.receive-migration`: on a skiff without a VM, listen on the URL and
    /// receive a VM, applying the (checked) overrides with
    /// `ReceiveMigrationRequest::apply_overrides` to the configuration that arrives. Answer
    /// `Empty` once listening.
    ReceiveMigration(ReceiveMigrationRequest),
    /// `GET /api/v1/vm.migration-progress`: answer `Json(MigrationProgress)` (phase `none` when
    /// no migration has run).
    MigrationProgress,
    /// `PUT /api/v1/vm.migration-cancel`: stop the running migration (phase `cancelled`; the
    /// source VM goes on as before). 409 when none is running.
    MigrationCancel,
}

impl ApiAction {
    /// The endpoint name (`vm.pause`, ...), for logs and messages.
    pub fn endpoint(&self) -> &'static str {
        match self {
            ApiAction::Ping => "vmm.ping",
            ApiAction::VmmShutdown => "vmm.shutdown",
            ApiAction::Create(_) => "vm.create",
            ApiAction::Boot => "vm.boot",
            ApiAction::Pause => "vm.pause",
            ApiAction::Resume => "vm.resume",
            ApiAction::Shutdown => "vm.shutdown",
            ApiAction::Reboot => "vm.reboot",
            ApiAction::PowerButton => "vm.power-button",
            ApiAction::Info => "vm.info",
            ApiAction::Counters => "vm.counters",
            ApiAction::Snapshot(_) => "vm.snapshot",
            ApiAction::Restore(_) => "vm.restore",
            ApiAction::Delete => "vm.delete",
            ApiAction::SendMigration(_) => "vm.send-migration",
            ApiAction::ReceiveMigration(_) => "vm.receive-migration",
            ApiAction::MigrationProgress => "vm.migration-progress",
            ApiAction::MigrationCancel => "vm.migration-cancel",
        }
    }
}

/// A successful answer.
#[derive(Debug, Clone, PartialEq)]
pub enum ApiReply {
    /// No body: HTTP 204.
    Empty,
    /// A JSON body: HTTP 200.
    Json(serde_json::Value),
}

impl ApiReply {
    /// A JSON reply from any serializable value (e.g. `VmInfo`, `PingResponse`, `Counters`).
    pub fn json<T: Serialize>(value: &T) -> Result<ApiReply, ApiError> {
        serde_json::to_value(value)
            .map(ApiReply::Json)
            .map_err(|e| ApiError::internal(format!("cannot serialize the reply: {e}")))
    }
}

/// A failed answer: an HTTP status, a message and, for 409, the VM's state.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{status} {message}")]
pub struct ApiError {
    /// HTTP status: 400, 404, 405, 409, 500, 501 or 503.
    pub status: u16,
    /// What went wrong, for people.
    pub message: String,
    /// The VM's state (set on 409; `None` when no VM exists).
    pub state: Option<VmState>,
}

impl ApiError {
    /// 400: the request is wrong (body, values).
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self {
            status: 400,
            message: message.into(),
            state: None,
        }
    }

    /// 404: no such endpoint (or, from the VMM, no such object).
    pub fn not_found(message: impl Into<String>) -> Self {
        Self {
            status: 404,
            message: message.into(),
            state: None,
        }
    }

    /// 409: the action is invalid in the VM's current state (`None`: no VM exists).
    pub fn conflict(message: impl Into<String>, state: Option<VmState>) -> Self {
        Self {
            status: 409,
            message: message.into(),
            state,
        }
    }

    /// 500: the action was valid but failed.
    pub fn internal(message: impl Into<String>) -> Self {
        Self {
            status: 500,
            message: message.into(),
            state: None,
        }
    }

    /// 501: the action is valid but this build cannot carry it out.
    pub fn not_implemented(message: impl Into<String>) -> Self {
        Self {
            status: 501,
            message: message.into(),
            state: None,
        }
    }

    /// 503: the VMM cannot take requests (shutting down, or it did not answer in time).
    pub fn unavailable(message: impl Into<String>) -> Self {
        Self {
            status: 503,
            message: message.into(),
            state: None,
        }
    }
}

/// What the control thread answers.
pub type ApiResponse = Result<ApiReply, ApiError>;

/// The way back to the waiting HTTP request. Answer exactly once; dropping it unanswered makes
/// the client get a 500.
#[derive(Debug)]
pub struct Responder(tokio::sync::oneshot::Sender<ApiResponse>);

impl Responder {
    /// A responder and the receiving end the server awaits.
    pub fn new() -> (Responder, tokio::sync::oneshot::Receiver<ApiResponse>) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (Responder(tx), rx)
    }

    /// Send the answer. Fails (returning it) when the client is gone, which the control thread
    /// may ignore. Never blocks.
    pub fn send(self, response: ApiResponse) -> Result<(), ApiResponse> {
        self.0.send(response)
    }
}

/// One request for the control thread.
#[derive(Debug)]
pub struct ApiRequest {
    /// What to do.
    pub action: ApiAction,
    /// Where the answer goes.
    pub respond: Responder,
}
