//! A blocking client for skiff's API: hyper's HTTP/1.1 client over a Unix socket, driven by a
//! small current-thread tokio runtime. One connection per call.

use std::io;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use thiserror::Error;

use crate::config::VmConfig;
use crate::migration::{MigrationProgress, ReceiveMigrationRequest, SendMigrationRequest};
use crate::models::{
    ApiErrorBody, Counters, PingResponse, RestoreRequest, SnapshotRequest, VmInfo, VmState,
};

/// Errors of API calls.
#[derive(Debug, Error)]
pub enum ClientError {
    /// The runtime could not be created.
    #[error("cannot start the client runtime: {0}")]
    Runtime(io::Error),
    /// Nothing answers on the socket.
    #[error("cannot connect to {}: {source} (is skiff running with --api-socket {}?)", .path.display(), .path.display())]
    Connect {
        /// The socket path.
        path: PathBuf,
        /// The cause.
        source: io::Error,
    },
    /// The HTTP exchange failed.
    #[error("HTTP: {0}")]
    Http(#[from] hyper::Error),
    /// The server answered with an error status.
    #[error("{status} {message}")]
    Api {
        /// HTTP status.
        status: u16,
        /// The server's `error` message.
        message: String,
        /// The VM state the server reported (409).
        state: Option<VmState>,
    },
    /// The server's answer is not what the API documents.
    #[error("unexpected response: {0}")]
    BadResponse(String),
}

impl ClientError {
    /// The HTTP status when the server answered with an error.
    pub fn status(&self) -> Option<u16> {
        match self {
            ClientError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// A raw HTTP answer: status, and body bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    /// HTTP status.
    pub status: u16,
    /// The `Allow` header, when present.
    pub allow: Option<String>,
    /// The `Content-Type` header, when present.
    pub content_type: Option<String>,
    /// The body.
    pub body: Bytes,
}

/// Blocking API client.
#[derive(Debug)]
pub struct ApiClient {
    path: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl ApiClient {
    /// A client for the server on `socket_path` (nothing is connected yet).
    pub fn new(socket_path: impl AsRef<Path>) -> Result<ApiClient, ClientError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(ClientError::Runtime)?;
        Ok(ApiClient {
            path: socket_path.as_ref().to_path_buf(),
            rt,
        })
    }

    /// Send one request and return the raw answer, whatever its status. `path` is the full
    /// request path (e.g. `/api/v1/vm.info`).
    pub fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let method = Method::from_bytes(method.as_bytes())
            .map_err(|e| ClientError::BadResponse(format!("bad method {method:?}: {e}")))?;
        self.rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.path)
                .await
                .map_err(|source| ClientError::Connect {
                    path: self.path.clone(),
                    source,
                })?;
            let (mut sender, conn) =
                hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
            let conn = tokio::task::spawn(conn);
            let mut req = Request::builder()
                .method(method)
                .uri(path)
                .header(HOST, "localhost");
            if body.is_some() {
                req = req.header(CONTENT_TYPE, "application/json");
            }
            let req = req
                .body(Full::new(Bytes::from(body.unwrap_or_default())))
                .map_err(|e| ClientError::BadResponse(format!("bad request: {e}")))?;
            let resp = sender.send_request(req).await?;
            let status = resp.status().as_u16();
            let header = |name| {
                resp.headers()
                    .get(name)
                    .and_then(|v: &hyper::header::HeaderValue| v.to_str().ok())
                    .map(String::from)
            };
            let allow = header(hyper::header::ALLOW);
            let content_type = header(CONTENT_TYPE);
            let body = resp.into_body().collect().await?.to_bytes();
            drop(sender);
            let _ = conn.await;
            Ok(RawResponse {
                status,
                allow,
                content_type,
                body,
            })
        })
    }

    fn call(
        &self,
        method: &str,
        endpoint: &str,
        body: Option<Vec<u8>>,
    ) -> Result<RawResponse, ClientError> {
        let r = self.raw(method, &format!("{}{endpoint}", crate::API_PREFIX), body)?;
        if (200..300).contains(&r.status) {
            return Ok(r);
        }
        match serde_json::from_slice::<ApiErrorBody>(&r.body) {
            Ok(e) => Err(ClientError::Api {
                status: r.status,
                message: e.error,
                state: e.state,
            }),
            Err(_) => Err(ClientError::Api {
                status: r.status,
                message: String::from_utf8_lossy(&r.body).trim().to_string(),
                state: None,
            }),
        }
    }

    fn put(&self, endpoint: &str, body: Option<Vec<u8>>) -> Result<(), ClientError> {
        self.call("PUT", endpoint, body).map(|_| ())
    }

    fn get<T: DeserializeOwned>(&self, endpoint: &str) -> Result<T, ClientError> {
        let r = self.call("GET", endpoint, None)?;
        serde_json::from_slice(&r.body)
            .map_err(|e| ClientError::BadResponse(format!("{endpoint}: {e}")))
    }

    fn get_value(&self, endpoint: &str) -> Result<serde_json::Value, ClientError> {
        self.get(endpoint)
    }

    fn to_body<T: serde::Serialize>(v: &T) -> Result<Option<Vec<u8>>, ClientError> {
        serde_json::to_vec(v)
            .map(Some)
            .map_err(|e| ClientError::BadResponse(format!("cannot encode the request: {e}")))
    }

    /// `GET vmm.ping`.
    pub fn ping(&self) -> Result<PingResponse, ClientError> {
        self.get("vmm.ping")
    }

    /// `GET vmm.ping` as untyped JSON (what the CLI prints).
    pub fn ping_json(&self) -> Result<serde_json::Value, ClientError> {
        self.get_value("vmm.ping")
    }

    /// `PUT vmm.shutdown`: end the skiff process.
    pub fn shutdown_vmm(&self) -> Result<(), ClientError> {
        self.put("vmm.shutdown", None)
    }

    /// `PUT vm.create` with a typed configuration.
    pub fn create(&self, config: &VmConfig) -> Result<(), ClientError> {
        self.put("vm.create", Self::to_body(config)?)
    }

    /// `PUT vm.create` with a JSON body as given (the server checks it).
    pub fn create_raw(&self, json: Vec<u8>) -> Result<(), ClientError> {
        self.put("vm.create", Some(json))
    }

    /// `PUT vm.boot`.
    pub fn boot(&self) -> Result<(), ClientError> {
        self.put("vm.boot", None)
    }

    /// `PUT vm.pause`.
    pub fn pause(&self) -> Result<(), ClientError> {
        self.put("vm.pause", None)
    }

    /// `PUT vm.resume`.
    pub fn resume(&self) -> Result<(), ClientError> {
        self.put("vm.resume", None)
    }

    /// `PUT vm.shutdown`.
    pub fn shutdown(&self) -> Result<(), ClientError> {
        self.put("vm.shutdown", None)
    }

    /// `PUT vm.reboot`.
    pub fn reboot(&self) -> Result<(), ClientError> {
        self.put("vm.reboot", None)
    }

    /// `PUT vm.power-button`.
    pub fn power_button(&self) -> Result<(), ClientError> {
        self.put("vm.power-button", None)
    }

    /// `GET vm.info`.
    pub fn info(&self) -> Result<VmInfo, ClientError> {
        self.get("vm.info")
    }

    /// `GET vm.info` as untyped JSON (what the CLI prints).
    pub fn info_json(&self) -> Result<serde_json::Value, ClientError> {
        self.get_value("vm.info")
    }

    /// `GET vm.counters`.
    pub fn counters(&self) -> Result<Counters, ClientError> {
        self.get("vm.counters")
    }

    /// `PUT vm.snapshot` to `destination_url` (`file:///dir`).
    pub fn snapshot(&self, destination_url: &str) -> Result<(), ClientError> {
        self.put(
            "vm.snapshot",
            Self::to_body(&SnapshotRequest {
                destination_url: destination_url.into(),
            })?,
        )
    }

    /// `PUT vm.restore` from `source_url` (`file:///dir`), resuming it when `resume`.
    pub fn restore(&self, source_url: &str, resume: bool) -> Result<(), ClientError> {
        self.put(
            "vm.restore",
            Self::to_body(&RestoreRequest {
                source_url: source_url.into(),
                resume,
            })?,
        )
    }

    /// `PUT vm.delete`.
    pub fn delete(&self) -> Result<(), ClientError> {
        self.put("vm.delete", None)
    }

    /// `PUT vm.send-migration`: start migrating the VM. Returns once the migration is under
    /// way; follow it with [`ApiClient::migration_progress`].
    pub fn send_migration(&self, request: &SendMigrationRequest) -> Result<(), ClientError> {
        self.put("vm.send-migration", Self::to_body(request)?)
    }

    /// `PUT vm.receive-migration`: listen for a migrating VM (on a skiff without a VM).
    pub fn receive_migration(&self, request: &ReceiveMigrationRequest) -> Result<(), ClientError> {
        self.put("vm.receive-migration", Self::to_body(request)?)
    }

    /// `GET vm.migration-progress`.
    pub fn migration_progress(&self) -> Result<MigrationProgress, ClientError> {
        self.get("vm.migration-progress")
    }

    /// `PUT vm.migration-cancel`.
    pub fn migration_cancel(&self) -> Result<(), ClientError> {
        self.put("vm.migration-cancel", None)
    }
}
