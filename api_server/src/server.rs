//! The HTTP/1.1 server on a Unix socket: one thread ("skiff-api") running a tokio current-thread
//! runtime with hyper; each connection is a task. Each request becomes an [`ApiRequest`] sent to
//! the control thread (channel + eventfd); the answer comes back through a oneshot.

use std::convert::Infallible;
use std::io;
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::{UnixListener as StdUnixListener, UnixStream as StdUnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_LENGTH, CONTENT_TYPE};
use hyper::{Request, Response, StatusCode};
use hyper_util::rt::{TokioIo, TokioTimer};
use serde::de::DeserializeOwned;
use thiserror::Error;
use vmm_sys_util::eventfd::EventFd;

use crate::action::{ApiAction, ApiError, ApiReply, ApiRequest, ApiResponse, Responder};
use crate::config::VmConfig;
use crate::migration::{ReceiveMigrationRequest, SendMigrationRequest};
use crate::models::{file_url_path, ApiErrorBody, PingResponse, RestoreRequest, SnapshotRequest};
use crate::openapi::Spec;

/// Prefix of every endpoint.
pub const API_PREFIX: &str = "/api/v1/";
/// Default largest request body accepted.
pub const DEFAULT_BODY_LIMIT: usize = 64 * 1024;
/// Default time the server waits for the control thread's answer.
pub const DEFAULT_REPLY_TIMEOUT: Duration = Duration::from_secs(120);

/// How long stopping waits for in-flight responses to be written.
const SHUTDOWN_GRACE: Duration = Duration::from_millis(500);
/// Connections served at once; more wait in the listen backlog until one ends. Bounds the
/// server's memory whatever the number of clients.
pub const MAX_CONNECTIONS: usize = 64;
/// A client must send a request's headers within this (also the idle time allowed between
/// requests on a kept-alive connection), so idle or stalled clients cannot hold every slot.
pub const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// What an endpoint's request body is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyKind {
    /// No body (an empty body or `{}` is accepted).
    None,
    /// A [`VmConfig`].
    VmConfig,
    /// A [`SnapshotRequest`].
    Snapshot,
    /// A [`RestoreRequest`].
    Restore,
    /// A [`SendMigrationRequest`].
    SendMigration,
    /// A [`ReceiveMigrationRequest`].
    ReceiveMigration,
}

/// One endpoint the server serves.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    /// Full path, e.g. `/api/v1/vm.pause`.
    pub path: &'static str,
    /// `GET` or `PUT`.
    pub method: &'static str,
    /// Its request body.
    pub body: BodyKind,
}

const fn route(path: &'static str, method: &'static str, body: BodyKind) -> Route {
    Route { path, method, body }
}

/// Every endpoint, the single source of truth the server dispatches on and the OpenAPI spec is
/// tested against.
pub const ROUTES: &[Route] = &[
    route("/api/v1/vmm.ping", "GET", BodyKind::None),
    route("/api/v1/vmm.shutdown", "PUT", BodyKind::None),
    route("/api/v1/vm.create", "PUT", BodyKind::VmConfig),
    route("/api/v1/vm.boot", "PUT", BodyKind::None),
    route("/api/v1/vm.pause", "PUT", BodyKind::None),
    route("/api/v1/vm.resume", "PUT", BodyKind::None),
    route("/api/v1/vm.shutdown", "PUT", BodyKind::None),
    route("/api/v1/vm.reboot", "PUT", BodyKind::None),
    route("/api/v1/vm.power-button", "PUT", BodyKind::None),
    route("/api/v1/vm.info", "GET", BodyKind::None),
    route("/api/v1/vm.counters", "GET", BodyKind::None),
    route("/api/v1/vm.snapshot", "PUT", BodyKind::Snapshot),
    route("/api/v1/vm.restore", "PUT", BodyKind::Restore),
    route("/api/v1/vm.delete", "PUT", BodyKind::None),
    route("/api/v1/vm.send-migration", "PUT", BodyKind::SendMigration),
    route(
        "/api/v1/vm.receive-migration",
        "PUT",
        BodyKind::ReceiveMigration,
    ),
    route("/api/v1/vm.migration-progress", "GET", BodyKind::None),
    route("/api/v1/vm.migration-cancel", "PUT", BodyKind::None),
];

/// Errors starting or stopping the server.
#[derive(Debug, Error)]
pub enum ApiServerError {
    /// Another server answers on the socket path.
    #[error("API socket {0}: another process is already serving on it")]
    InUse(PathBuf),
    /// The path exists and is not a socket; skiff does not delete it.
    #[error(
        "API socket {0}: the path exists and is not a socket; remove it or choose another path"
    )]
    NotASocket(PathBuf),
    /// The socket's directory does not exist.
    #[error("API socket {0}: directory {1} does not exist")]
    NoDirectory(PathBuf, PathBuf),
    /// Binding, removing a stale socket or setting permissions failed.
    #[error("API socket {path}: {source}")]
    Socket {
        /// The socket path.
        path: PathBuf,
        /// The cause (e.g. permission denied).
        source: io::Error,
    },
    /// The server thread could not be started.
    #[error("cannot start the API thread: {0}")]
    Thread(io::Error),
}

/// Tunables of the server (defaults suit skiff; tests shorten them).
#[derive(Debug, Clone)]
pub struct ServerOptions {
    /// Largest request body accepted; larger ones get 400.
    pub body_limit: usize,
    /// How long to wait for the control thread; then 503.
    pub reply_timeout: Duration,
}

impl Default for ServerOptions {
    fn default() -> Self {
        Self {
            body_limit: DEFAULT_BODY_LIMIT,
            reply_timeout: DEFAULT_REPLY_TIMEOUT,
        }
    }
}

/// The running API server. Stopping it (or dropping it) ends the thread and removes the socket.
#[derive(Debug)]
pub struct ApiServer {
    path: PathBuf,
    stop: Option<tokio::sync::watch::Sender<bool>>,
    thread: Option<JoinHandle<()>>,
}

struct Ctx {
    to_vmm: Sender<ApiRequest>,
    wake: EventFd,
    opts: ServerOptions,
    /// The `vmm.ping` answer.
    ping: serde_json::Value,
}

impl ApiServer {
    /// Bind `socket_path` and serve on a new "skiff-api" thread. Requests go to `to_vmm`; after
    /// each send, 1 is written to `wake` so the control thread's event loop notices.
    pub fn start(
        socket_path: &Path,
        to_vmm: Sender<ApiRequest>,
        wake: EventFd,
    ) -> Result<ApiServer, ApiServerError> {
        Self::start_with(socket_path, to_vmm, wake, ServerOptions::default())
    }

    /// [`ApiServer::start`] with explicit [`ServerOptions`].
    pub fn start_with(
        socket_path: &Path,
        to_vmm: Sender<ApiRequest>,
        wake: EventFd,
        opts: ServerOptions,
    ) -> Result<ApiServer, ApiServerError> {
        let path = socket_path.to_path_buf();
        spec();
        let listener = bind(&path)?;
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let ping = serde_json::to_value(PingResponse::current()).unwrap_or_default();
        let ctx = Arc::new(Ctx {
            to_vmm,
            wake,
            opts,
            ping,
        });
        let thread = std::thread::Builder::new()
            .name("skiff-api".into())
            .spawn(move || {
                sandbox::apply_or_exit(sandbox::ThreadKind::Api);
                serve_thread(listener, ctx, stop_rx)
            })
            .map_err(|e| {
                let _ = std::fs::remove_file(&path);
                ApiServerError::Thread(e)
            })?;
        log::info!("API server listening on {}", socket_path.display());
        Ok(ApiServer {
            path: socket_path.to_path_buf(),
            stop: Some(stop_tx),
            thread: Some(thread),
        })
    }

    /// The socket path.
    pub fn socket_path(&self) -> &Path {
        &self.path
    }

    /// Stop serving (open connections are closed), join the thread and remove the socket file.
    pub fn stop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(true);
        }
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                log::error!("the API thread panicked");
            }
            if let Err(e) = std::fs::remove_file(&self.path) {
                if e.kind() != io::ErrorKind::NotFound {
                    log::warn!("cannot remove API socket {}: {e}", self.path.display());
                }
            }
        }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn bind(path: &Path) -> Result<StdUnixListener, ApiServerError> {
    let sock_err = |source| ApiServerError::Socket {
        path: path.to_path_buf(),
        source,
    };
    let dir = match path.parent() {
        Some(d) if d.as_os_str().is_empty() => Path::new("."),
        Some(d) => d,
        None => Path::new("/"),
    };
    if !dir.is_dir() {
        return Err(ApiServerError::NoDirectory(
            path.to_path_buf(),
            dir.to_path_buf(),
        ));
    }
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() => {
            if StdUnixStream::connect(path).is_ok() {
                return Err(ApiServerError::InUse(path.to_path_buf()));
            }
            log::info!("removing stale API socket {}", path.display());
            std::fs::remove_file(path).map_err(sock_err)?;
        }
        Ok(_) => return Err(ApiServerError::NotASocket(path.to_path_buf())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(sock_err(e)),
    }
    // Bind and listen under a temporary name, restrict it, then rename it into place: once the
    // path exists a client can connect (a script waiting for the file never races the listen
    // call), and nobody else can connect in the meantime. A temporary name too long for a
    // socket address falls back to binding the path itself.
    let temp = dir.join(format!(".skiff-api-{}", std::process::id()));
    let staged = temp.as_os_str().len() < 108;
    let at = if staged { temp.as_path() } else { path };
    if staged {
        let _ = std::fs::remove_file(at);
    }
    let listener = StdUnixListener::bind(at).map_err(sock_err)?;
    let cleanup = |e| {
        let _ = std::fs::remove_file(at);
        sock_err(e)
    };
    // The socket controls the VM: only its owner may connect.
    std::fs::set_permissions(at, std::fs::Permissions::from_mode(0o600)).map_err(cleanup)?;
    listener.set_nonblocking(true).map_err(cleanup)?;
    if staged {
        std::fs::rename(at, path).map_err(cleanup)?;
    }
    Ok(listener)
}

fn serve_thread(
    listener: StdUnixListener,
    ctx: Arc<Ctx>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_io()
        .enable_time()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            log::error!("API server: cannot build the runtime: {e}");
            return;
        }
    };
    rt.block_on(async move {
        let listener = match tokio::net::UnixListener::from_std(listener) {
            Ok(l) => l,
            Err(e) => {
                log::error!("API server: {e}");
                return;
            }
        };
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
        loop {
            // Take a connection slot first: at the limit, new clients wait in the backlog.
            let slot = tokio::select! {
                _ = stop.changed() => break,
                slot = slots.clone().acquire_owned() => match slot {
                    Ok(s) => s,
                    Err(_) => break,
                },
            };
            tokio::select! {
                _ = stop.changed() => break,
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => {
                        let ctx = ctx.clone();
                        let service = hyper::service::service_fn(move |req| {
                            let ctx = ctx.clone();
                            async move { Ok::<_, Infallible>(handle(req, &ctx).await) }
                        });
                        let conn = hyper::server::conn::http1::Builder::new()
                            .timer(TokioTimer::new())
                            .header_read_timeout(HEADER_READ_TIMEOUT)
                            .serve_connection(TokioIo::new(stream), service);
                        let conn = graceful.watch(conn);
                        tokio::task::spawn(async move {
                            if let Err(e) = conn.await {
                                log::debug!("API connection ended: {e}");
                            }
                            drop(slot);
                        });
                    }
                    Err(e) => {
                        log::warn!("API server: accept: {e}");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                    }
                },
            }
        }
        // Let answers already on their way (e.g. the 204 of vmm.shutdown) reach their clients;
        // idle connections are closed at once, requests still waiting for the VMM are cut off.
        drop(listener);
        if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
            .await
            .is_err()
        {
            log::debug!(
                "API server: connections still busy after {SHUTDOWN_GRACE:?}; closing them"
            );
        }
        log::info!("API server stopped");
    });
}

fn json_response(status: u16, body: Vec<u8>) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn error_response(e: &ApiError) -> Response<Full<Bytes>> {
    let body = ApiErrorBody {
        error: e.message.clone(),
        state: e.state,
    };
    json_response(e.status, serde_json::to_vec(&body).unwrap_or_default())
}

fn reply_response(r: ApiResponse) -> Response<Full<Bytes>> {
    match r {
        Ok(ApiReply::Empty) => {
            let mut resp = Response::new(Full::new(Bytes::new()));
            *resp.status_mut() = StatusCode::NO_CONTENT;
            resp
        }
        Ok(ApiReply::Json(v)) => match serde_json::to_vec_pretty(&v) {
            Ok(body) => json_response(200, body),
            Err(e) => error_response(&ApiError::internal(format!("cannot encode reply: {e}"))),
        },
        Err(e) => error_response(&e),
    }
}

async fn handle(req: Request<Incoming>, ctx: &Ctx) -> Response<Full<Bytes>> {
    let path = req.uri().path().to_string();
    let method = req.method().clone();
    let resp = match dispatch(req, ctx).await {
        Ok(r) => reply_response(r),
        Err(e) => {
            let mut r = error_response(&e.error);
            if let Some(allow) = e.allow {
                r.headers_mut()
                    .insert(ALLOW, HeaderValue::from_static(allow));
            }
            r
        }
    };
    log::debug!("API {method} {path} -> {}", resp.status().as_u16());
    resp
}

struct HttpError {
    error: ApiError,
    allow: Option<&'static str>,
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        HttpError { error, allow: None }
    }
}

async fn dispatch(req: Request<Incoming>, ctx: &Ctx) -> Result<ApiResponse, HttpError> {
    let path = req.uri().path();
    let Some(route) = ROUTES.iter().find(|r| r.path == path) else {
        return Err(ApiError::not_found(format!(
            "no endpoint {path}; endpoints are under {API_PREFIX} (e.g. {API_PREFIX}vmm.ping)"
        ))
        .into());
    };
    if req.method().as_str() != route.method {
        return Err(HttpError {
            error: ApiError {
                status: 405,
                message: format!(
                    "{} {}: method not allowed; use {}",
                    req.method(),
                    route.path,
                    route.method
                ),
                state: None,
            },
            allow: Some(route.method),
        });
    }
    let endpoint = route.path.trim_start_matches(API_PREFIX);
    let limit = ctx.opts.body_limit;
    let too_big = || {
        ApiError::bad_request(format!(
            "{endpoint}: request body is larger than the limit of {limit} bytes"
        ))
    };
    // Read the body frame by frame. Past the limit, keep reading and dropping what the client is
    // still sending (up to LINGER_MAX, whether it announced a Content-Length or sends chunks) so
    // it reads the 400 instead of failing its write on a socket we already closed.
    let announced_too_big = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|l| l.to_str().ok())
        .and_then(|l| l.parse::<u64>().ok())
        .is_some_and(|l| l > limit as u64);
    let mut incoming = req.into_body();
    let mut body = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = incoming.frame().await {
        let frame = match frame {
            Ok(f) => f,
            Err(e) if seen > limit || announced_too_big => {
                log::debug!("{endpoint}: over-limit body ended early: {e}");
                break;
            }
            Err(e) => {
                return Err(
                    ApiError::bad_request(format!("{endpoint}: cannot read the body: {e}")).into(),
                )
            }
        };
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen = seen.saturating_add(data.len());
        if seen > LINGER_MAX {
            break;
        }
        if seen <= limit && !announced_too_big {
            body.extend_from_slice(&data);
        }
    }
    if seen > limit || announced_too_big {
        return Err(too_big().into());
    }
    let action = parse_action(route, endpoint, &body)?;
    if let ApiAction::Ping = action {
        // Answered here, without the control thread: the ping says the API server is available
        // (as Cloud Hypervisor's API documents it) and carries only what never changes. Its one
        // hop to the control thread and back cost two thread wake-ups, most of its latency on
        // this host (see the API bench).
        return Ok(Ok(ApiReply::Json(ctx.ping.clone())));
    }
    Ok(call_vmm(action, ctx).await)
}

/// Most bytes of an over-limit body read and dropped before the 400 is sent.
const LINGER_MAX: usize = 4 << 20;

/// The spec, parsed once; request bodies are checked against its schemas as well as by serde
/// (serde alone would, e.g., accept a JSON array for a struct).
fn spec() -> &'static Spec {
    static SPEC: OnceLock<Spec> = OnceLock::new();
    SPEC.get_or_init(Spec::load)
}

fn parse_json<T: DeserializeOwned>(
    route: &Route,
    endpoint: &str,
    body: &[u8],
) -> Result<T, ApiError> {
    parse_json_checked(route, endpoint, body, false, |_: &T| Ok(()))
}

/// Parse a body: JSON, then serde, then `check` (the model's own checks, whose errors name the
/// field), then the spec's schema. With `name_fields`, a serde error is replaced by the spec's
/// error when the spec rejects the body too, since the spec's errors name the field (`$.x`) and
/// serde_json's do not.
fn parse_json_checked<T: DeserializeOwned>(
    route: &Route,
    endpoint: &str,
    body: &[u8],
    name_fields: bool,
    check: impl FnOnce(&T) -> Result<(), String>,
) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::bad_request(format!(
            "{endpoint}: a JSON body is required"
        )));
    }
    let bad = |e: String| ApiError::bad_request(format!("{endpoint}: invalid JSON body: {e}"));
    let value: serde_json::Value = serde_json::from_slice(body).map_err(|e| bad(e.to_string()))?;
    let schema = spec().request_schema(route.path, route.method);
    let typed = match T::deserialize(&value) {
        Ok(t) => t,
        Err(e) => {
            if name_fields {
                if let Some(Err(named)) = schema.as_ref().map(|s| spec().validate(s, &value)) {
                    return Err(bad(named));
                }
            }
            return Err(bad(e.to_string()));
        }
    };
    check(&typed).map_err(|e| ApiError::bad_request(format!("{endpoint}: {e}")))?;
    if let Some(schema) = schema {
        spec().validate(&schema, &value).map_err(bad)?;
    }
    Ok(typed)
}

/// Parse `body` for `route` as the server does once path and method matched (fuzz targets).
pub fn parse_route_body(route: &Route, body: &[u8]) -> Result<ApiAction, ApiError> {
    parse_action(route, route.path.trim_start_matches(API_PREFIX), body)
}

/// Map a route and its body to an action, rejecting bad bodies with 400.
fn parse_action(route: &Route, endpoint: &str, body: &[u8]) -> Result<ApiAction, ApiError> {
    Ok(match route.body {
        BodyKind::None => {
            if !body.iter().all(u8::is_ascii_whitespace) {
                match serde_json::from_slice::<serde_json::Value>(body) {
                    Ok(serde_json::Value::Object(m)) if m.is_empty() => {}
                    _ => {
                        return Err(ApiError::bad_request(format!(
                            "{endpoint} takes no request body (send none, or {{}})"
                        )))
                    }
                }
            }
            match endpoint {
                "vmm.ping" => ApiAction::Ping,
                "vmm.shutdown" => ApiAction::VmmShutdown,
                "vm.boot" => ApiAction::Boot,
                "vm.pause" => ApiAction::Pause,
                "vm.resume" => ApiAction::Resume,
                "vm.shutdown" => ApiAction::Shutdown,
                "vm.reboot" => ApiAction::Reboot,
                "vm.power-button" => ApiAction::PowerButton,
                "vm.info" => ApiAction::Info,
                "vm.counters" => ApiAction::Counters,
                "vm.delete" => ApiAction::Delete,
                "vm.migration-progress" => ApiAction::MigrationProgress,
                "vm.migration-cancel" => ApiAction::MigrationCancel,
                other => return Err(ApiError::internal(format!("unmapped endpoint {other}"))),
            }
        }
        BodyKind::VmConfig => {
            let config: VmConfig = parse_json(route, endpoint, body)?;
            config
                .validate()
                .map_err(|e| ApiError::bad_request(format!("{endpoint}: {e}")))?;
            ApiAction::Create(Box::new(config))
        }
        BodyKind::Snapshot => {
            let r: SnapshotRequest = parse_json(route, endpoint, body)?;
            file_url_path(&r.destination_url)
                .map_err(|e| ApiError::bad_request(format!("{endpoint}: destination_url {e}")))?;
            ApiAction::Snapshot(r)
        }
        BodyKind::Restore => {
            let r: RestoreRequest = parse_json(route, endpoint, body)?;
            file_url_path(&r.source_url)
                .map_err(|e| ApiError::bad_request(format!("{endpoint}: source_url {e}")))?;
            ApiAction::Restore(r)
        }
        BodyKind::SendMigration => ApiAction::SendMigration(parse_json_checked(
            route,
            endpoint,
            body,
            true,
            SendMigrationRequest::validate,
        )?),
        BodyKind::ReceiveMigration => ApiAction::ReceiveMigration(parse_json_checked(
            route,
            endpoint,
            body,
            true,
            ReceiveMigrationRequest::validate,
        )?),
    })
}

async fn call_vmm(action: ApiAction, ctx: &Ctx) -> ApiResponse {
    let endpoint = action.endpoint();
    let (respond, rx) = Responder::new();
    if ctx.to_vmm.send(ApiRequest { action, respond }).is_err() {
        return Err(ApiError::unavailable(
            "the VMM is shutting down and takes no more requests",
        ));
    }
    if let Err(e) = ctx.wake.write(1) {
        log::error!("API server: cannot wake the control thread: {e}");
    }
    match tokio::time::timeout(ctx.opts.reply_timeout, rx).await {
        Ok(Ok(r)) => r,
        Ok(Err(_)) => Err(ApiError::internal(format!(
            "{endpoint}: the VMM dropped the request without answering"
        ))),
        Err(_) => Err(ApiError::unavailable(format!(
            "{endpoint}: the VMM did not answer within {} s",
            ctx.opts.reply_timeout.as_secs_f64()
        ))),
    }
}
