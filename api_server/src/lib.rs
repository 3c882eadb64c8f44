//! skiff's REST API: an HTTP/1.1 server on a Unix socket (hyper on a current-thread tokio
//! runtime, one dedicated thread), the request/response models, the VM configuration model shared
//! with the CLI, the OpenAPI spec and its test helpers, a blocking client, and the
//! `skiff-remote` CLI.
//!
//! The VMM's side: create an `std::sync::mpsc` channel of [`ApiRequest`]s and an `EventFd`, call
//! [`ApiServer::start`], and on each eventfd wake-up drain the channel, perform each
//! [`ApiAction`] and answer through [`ApiRequest::respond`].

pub mod action;
pub mod client;
pub mod config;
pub mod host_paths;
pub mod migration;
pub mod models;
pub mod openapi;
pub mod pci_address;
pub mod server;

pub use action::{ApiAction, ApiError, ApiReply, ApiRequest, ApiResponse, Responder};
pub use client::{ApiClient, ClientError};
pub use migration::{
    DeviceOverride, MigrationPhase, MigrationProgress, MigrationTls, MigrationUrl,
    ReceiveMigrationRequest, SendMigrationRequest,
};
pub use models::{
    ApiErrorBody, Counters, DeviceInfo, PingResponse, RestoreRequest, SnapshotRequest, VmInfo,
    VmState,
};
pub use server::{
    ApiServer, ApiServerError, BodyKind, Route, ServerOptions, API_PREFIX, DEFAULT_BODY_LIMIT,
    DEFAULT_REPLY_TIMEOUT, ROUTES,
};
