//! The HTTP API: one routing table; handlers parse, call [`crate::service`], map the result.
//!
//! Served on the unix socket (trusted: file permissions are the access control) and, with
//! `--listen`, on TCP with TLS only (see [`crate::tls`]), where every request needs
//! `Authorization: Bearer <token>`: the API token for users, the host credential for the agent
//! endpoints of that host. `POST /v1/agent/register` is the exception: it carries the join
//! token in its body instead (checked by [`desired::register`]).

use std::io::SeekFrom;
use std::time::Duration;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tuchka_api::agent::{HostDesired, HostRegister, HostRegistered, HostReport};
use tuchka_api::{
    ApiError, Forward, ForwardCreate, Group, GroupCreate, GroupScale, Host, Image, JoinToken,
    Network, NetworkCreate, Operation, Rule, RuleCreate, Vm, VmStop,
};

use crate::error::{Error, Result};
use crate::service::{self, VmAction};
use crate::state::Controller;
use crate::{desired, images};

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The unix socket: trusted.
    Unix,
    /// TCP (TLS): bearer token required.
    Tcp,
}

/// The API router for one listener.
pub fn router(ctl: Controller, transport: Transport) -> Router {
    Router::new()
        .route(
            "/v1/images",
            get(list_images)
                .post(upload_image)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/images/{name}", get(get_image).delete(delete_image))
        .route("/v1/networks", get(list_networks).post(create_network))
        .route(
            "/v1/networks/{name}",
            get(get_network).delete(delete_network),
        )
        .route("/v1/networks/{name}/rules", get(list_rules).post(add_rule))
        .route(
            "/v1/networks/{name}/rules/{id}",
            axum::routing::delete(delete_rule),
        )
        .route(
            "/v1/networks/{name}/forwards",
            get(list_forwards).post(add_forward),
        )
        .route(
            "/v1/networks/{name}/forwards/{id}",
            axum::routing::delete(delete_forward),
        )
        .route("/v1/groups", get(list_groups).post(create_group))
        .route("/v1/groups/{name}", get(get_group).delete(delete_group))
        .route("/v1/groups/{name}/scale", post(scale_group))
        .route("/v1/vms", get(list_vms))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/console", get(vm_console))
        .route("/v1/vms/{name}/{action}", post(vm_action))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(get_host))
        .route("/v1/hosts/{name}/revoke", post(revoke_host))
        .route("/v1/hosts/{name}/drain", post(drain_host))
        .route("/v1/hosts/{name}/undrain", post(undrain_host))
        .route("/v1/join-token", get(join_token).post(rotate_join_token))
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/events", get(events))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/hosts/{id}/desired", get(host_desired))
        .route("/v1/agent/hosts/{id}/report", post(host_report))
        .route("/v1/agent/images/{sha256}", get(image_file))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(ctl.clone(), auth))
        .layer(Extension(transport))
        .with_state(ctl)
}

async fn not_found(method: axum::http::Method, uri: axum::http::Uri) -> Error {
    Error::NoRoute(format!("{method} {}", uri.path()))
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    headers
        .get(header::AUTHORIZATION)?
        .to_str()
        .ok()?
        .strip_prefix("Bearer ")
}

async fn auth(
    State(ctl): State<Controller>,
    Extension(t): Extension<Transport>,
    req: Request,
    next: Next,
) -> Response {
    if t == Transport::Tcp {
        let path = req.uri().path().to_string();
        let token = bearer(req.headers()).unwrap_or_default().to_string();
        let ok = if path == "/v1/agent/register" {
            true // checked by the handler (join token)
        } else if let Some(rest) = path.strip_prefix("/v1/agent/hosts/") {
            let id = rest.split('/').next().unwrap_or_default().to_string();
            let check = {
                let ctl = ctl.clone();
                blocking(move || Ok(desired::authenticate_host(&ctl, &id, &token))).await
            };
            match check {
                Ok(Ok(())) => true,
                Ok(Err(e)) => return host_auth_refused(e),
                Err(e) => return e.into_response(),
            }
        } else if path.starts_with("/v1/agent/images/")
            && !constant_time_eq(token.as_bytes(), ctl.api_token().as_bytes())
        {
            // Image downloads: any joined (not revoked) host, or a user.
            let check = {
                let ctl = ctl.clone();
                blocking(move || Ok(desired::authenticate_any_host(&ctl, &token))).await
            };
            match check {
                Ok(Ok(())) => true,
                Ok(Err(e)) => return host_auth_refused(e),
                Err(e) => return e.into_response(),
            }
        } else {
            constant_time_eq(token.as_bytes(), ctl.api_token().as_bytes())
        };
        if !ok {
            return Error::Unauthorized("missing or wrong bearer token (use --token or TUCHKA_TOKEN; it is in <data-dir>/token)".into())
                .into_response();
        }
    }
    next.run(req).await
}

/// The answer to an agent whose host credential was refused: `401` with code
/// [`tuchka_api::CODE_HOST_REVOKED`] for a revoked host (the agent stops), `Unauthorized` else.
fn host_auth_refused(e: desired::HostAuthError) -> Response {
    let code = match &e {
        desired::HostAuthError::Store(s) => {
            return Error::internal("cannot check the host credential", s).into_response()
        }
        desired::HostAuthError::Revoked(_) => tuchka_api::CODE_HOST_REVOKED,
        _ => "Unauthorized",
    };
    let body = ApiError {
        code: code.into(),
        message: e.to_string(),
        chain: vec![],
    };
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Run blocking service code off the async threads.
async fn blocking<T: Send + 'static>(f: impl FnOnce() -> Result<T> + Send + 'static) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal {
            message: "worker failed".into(),
            chain: vec![e.to_string()],
        })?
}

fn accepted(op: Operation) -> (StatusCode, Json<Operation>) {
    (StatusCode::ACCEPTED, Json(op))
}

/// Query of the image upload.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct UploadQuery {
    /// Name of the new image.
    pub name: String,
}

/// List images.
#[utoipa::path(get, path = "/v1/images", responses((status = 200, body = Vec<Image>)))]
pub async fn list_images(State(ctl): State<Controller>) -> Result<Json<Vec<Image>>> {
    blocking(move || service::list_images(&ctl)).await.map(Json)
}

/// Upload an image (raw file bytes as the body).
#[utoipa::path(post, path = "/v1/images", params(UploadQuery), request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Image), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn upload_image(
    State(ctl): State<Controller>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Result<(StatusCode, Json<Image>)> {
    let img = images::upload(&ctl, &q.name, body.into_data_stream()).await?;
    Ok((StatusCode::CREATED, Json(img)))
}

/// Show an image.
#[utoipa::path(get, path = "/v1/images/{name}", responses((status = 200, body = Image), (status = 404, body = ApiError)))]
pub async fn get_image(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Image>> {
    blocking(move || service::get_image(&ctl, &name))
        .await
        .map(Json)
}

/// Remove an image (refused while in use).
#[utoipa::path(delete, path = "/v1/images/{name}", responses((status = 204), (status = 409, body = ApiError)))]
pub async fn delete_image(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    blocking(move || service::delete_image(&ctl, &name))
        .await
        .map(|_| StatusCode::NO_CONTENT)
}

/// List networks.
#[utoipa::path(get, path = "/v1/networks", responses((status = 200, body = Vec<Network>)))]
pub async fn list_networks(State(ctl): State<Controller>) -> Result<Json<Vec<Network>>> {
    blocking(move || service::list_networks(&ctl))
        .await
        .map(Json)
}

/// Create a network.
#[utoipa::path(post, path = "/v1/networks", request_body = NetworkCreate, responses((status = 202, body = Operation), (status = 400, body = ApiError)))]
pub async fn create_network(
    State(ctl): State<Controller>,
    Json(req): Json<NetworkCreate>,
) -> Result<(StatusCode, Json<Operation>)> {
    blocking(move || service::create_network(&ctl, req))
        .await
        .map(accepted)
}

/// Show a network.
#[utoipa::path(get, path = "/v1/networks/{name}", responses((status = 200, body = Network), (status = 404, body = ApiError)))]
pub async fn get_network(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Network>> {
    blocking(move || service::get_network(&ctl, &name))
        .await
        .map(Json)
}

/// Remove a network (refused while VMs use it).
#[utoipa::path(delete, path = "/v1/networks/{name}", responses((status = 202, body = Operation), (status = 409, body = ApiError)))]
pub async fn delete_network(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>)> {
    blocking(move || service::delete_network(&ctl, &name))
        .await
        .map(accepted)
}

/// Access rules of a network.
#[utoipa::path(get, path = "/v1/networks/{name}/rules", responses((status = 200, body = Vec<Rule>), (status = 404, body = ApiError)))]
pub async fn list_rules(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Rule>>> {
    blocking(move || crate::netrules::list_rules(&ctl, &name))
        .await
        .map(Json)
}

/// Add an access rule; hosts apply it within a second, without restarting anything.
#[utoipa::path(post, path = "/v1/networks/{name}/rules", request_body = RuleCreate,
    responses((status = 201, body = Rule), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn add_rule(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<RuleCreate>,
) -> Result<(StatusCode, Json<Rule>)> {
    blocking(move || crate::netrules::add_rule(&ctl, &name, req))
        .await
        .map(|r| (StatusCode::CREATED, Json(r)))
}

/// Remove an access rule.
#[utoipa::path(delete, path = "/v1/networks/{name}/rules/{id}", responses((status = 204), (status = 404, body = ApiError)))]
pub async fn delete_rule(
    State(ctl): State<Controller>,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode> {
    blocking(move || crate::netrules::delete_rule(&ctl, &name, &id))
        .await
        .map(|_| StatusCode::NO_CONTENT)
}

/// Port forwards of a network.
#[utoipa::path(get, path = "/v1/networks/{name}/forwards", responses((status = 200, body = Vec<Forward>), (status = 404, body = ApiError)))]
pub async fn list_forwards(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Forward>>> {
    blocking(move || crate::netrules::list_forwards(&ctl, &name))
        .await
        .map(Json)
}

/// Add a port forward host:port → vm:port.
#[utoipa::path(post, path = "/v1/networks/{name}/forwards", request_body = ForwardCreate,
    responses((status = 201, body = Forward), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn add_forward(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<ForwardCreate>,
) -> Result<(StatusCode, Json<Forward>)> {
    blocking(move || crate::netrules::add_forward(&ctl, &name, req))
        .await
        .map(|f| (StatusCode::CREATED, Json(f)))
}

/// Remove a port forward.
#[utoipa::path(delete, path = "/v1/networks/{name}/forwards/{id}", responses((status = 204), (status = 404, body = ApiError)))]
pub async fn delete_forward(
    State(ctl): State<Controller>,
    Path((name, id)): Path<(String, String)>,
) -> Result<StatusCode> {
    blocking(move || crate::netrules::delete_forward(&ctl, &name, &id))
        .await
        .map(|_| StatusCode::NO_CONTENT)
}

/// List groups.
#[utoipa::path(get, path = "/v1/groups", responses((status = 200, body = Vec<Group>)))]
pub async fn list_groups(State(ctl): State<Controller>) -> Result<Json<Vec<Group>>> {
    blocking(move || service::list_groups(&ctl)).await.map(Json)
}

/// Create a group (all or nothing).
#[utoipa::path(post, path = "/v1/groups", request_body = GroupCreate,
    responses((status = 202, body = Operation), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_group(
    State(ctl): State<Controller>,
    Json(req): Json<GroupCreate>,
) -> Result<(StatusCode, Json<Operation>)> {
    blocking(move || service::create_group(&ctl, req))
        .await
        .map(accepted)
}

/// Show a group.
#[utoipa::path(get, path = "/v1/groups/{name}", responses((status = 200, body = Group), (status = 404, body = ApiError)))]
pub async fn get_group(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Group>> {
    blocking(move || service::get_group(&ctl, &name))
        .await
        .map(Json)
}

/// Scale a group.
#[utoipa::path(post, path = "/v1/groups/{name}/scale", request_body = GroupScale, responses((status = 202, body = Operation)))]
pub async fn scale_group(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Json(req): Json<GroupScale>,
) -> Result<(StatusCode, Json<Operation>)> {
    blocking(move || service::scale_group(&ctl, &name, req))
        .await
        .map(accepted)
}

/// Remove a group and all its VMs.
#[utoipa::path(delete, path = "/v1/groups/{name}", responses((status = 202, body = Operation)))]
pub async fn delete_group(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>)> {
    blocking(move || service::delete_group(&ctl, &name))
        .await
        .map(accepted)
}

/// List VMs.
#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<Vm>)))]
pub async fn list_vms(State(ctl): State<Controller>) -> Result<Json<Vec<Vm>>> {
    blocking(move || service::list_vms(&ctl)).await.map(Json)
}

/// Show a VM.
#[utoipa::path(get, path = "/v1/vms/{name}", responses((status = 200, body = Vm), (status = 404, body = ApiError)))]
pub async fn get_vm(State(ctl): State<Controller>, Path(name): Path<String>) -> Result<Json<Vm>> {
    blocking(move || service::get_vm(&ctl, &name))
        .await
        .map(Json)
}

/// Remove a VM.
#[utoipa::path(delete, path = "/v1/vms/{name}", responses((status = 202, body = Operation)))]
pub async fn delete_vm(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>)> {
    blocking(move || service::delete_vm(&ctl, &name))
        .await
        .map(accepted)
}

/// The serial console log of a VM.
#[utoipa::path(get, path = "/v1/vms/{name}/console", responses((status = 200, body = String, content_type = "text/plain")))]
pub async fn vm_console(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Response> {
    let text = blocking(move || service::vm_console(&ctl, &name)).await?;
    Ok(([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response())
}

/// Start, stop, pause, resume or reboot a VM. `stop` takes an optional [`VmStop`] body.
#[utoipa::path(post, path = "/v1/vms/{name}/{action}", request_body(content = Option<VmStop>),
    params(("name" = String, Path, description = "VM name"), ("action" = String, Path, description = "start | stop | pause | resume | reboot")),
    responses((status = 202, body = Operation), (status = 409, body = ApiError)))]
pub async fn vm_action(
    State(ctl): State<Controller>,
    Path((name, action)): Path<(String, String)>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Operation>)> {
    let action = match action.as_str() {
        "start" => VmAction::Start,
        "stop" => VmAction::Stop,
        "pause" => VmAction::Pause,
        "resume" => VmAction::Resume,
        "reboot" => VmAction::Reboot,
        other => {
            return Err(Error::invalid(
                "InvalidAction",
                format!("unknown VM action {other:?}: use start, stop, pause, resume or reboot"),
            ))
        }
    };
    let stop: VmStop = if body.is_empty() {
        VmStop::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid("InvalidBody", format!("bad request body: {e}")))?
    };
    blocking(move || service::vm_action(&ctl, &name, action, stop))
        .await
        .map(accepted)
}

/// List hosts.
#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = Vec<Host>)))]
pub async fn list_hosts(State(ctl): State<Controller>) -> Result<Json<Vec<Host>>> {
    blocking(move || service::list_hosts(&ctl)).await.map(Json)
}

/// Show a host.
#[utoipa::path(get, path = "/v1/hosts/{name}", responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn get_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Host>> {
    blocking(move || service::get_host(&ctl, &name))
        .await
        .map(Json)
}

/// Drain a host: no new VMs are placed on it; its VMs stay.
#[utoipa::path(post, path = "/v1/hosts/{name}/drain", responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn drain_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Host>> {
    blocking(move || desired::set_draining(&ctl, &name, true))
        .await
        .map(Json)
}

/// Undrain a host: it accepts new VMs again.
#[utoipa::path(post, path = "/v1/hosts/{name}/undrain", responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn undrain_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Host>> {
    blocking(move || desired::set_draining(&ctl, &name, false))
        .await
        .map(Json)
}

/// Revoke a host: its agent's credential is refused from now on (it may join again only with
/// a join token).
#[utoipa::path(post, path = "/v1/hosts/{name}/revoke", responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn revoke_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Host>> {
    blocking(move || desired::revoke_host(&ctl, &name))
        .await
        .map(Json)
}

/// The join token and the command that joins a host (users only: unix socket or API token).
#[utoipa::path(get, path = "/v1/join-token", responses((status = 200, body = JoinToken)))]
pub async fn join_token(State(ctl): State<Controller>) -> Json<JoinToken> {
    Json(ctl.join_info())
}

/// Replace the join token; the old one stops admitting hosts (joined hosts are not affected).
#[utoipa::path(post, path = "/v1/join-token", responses((status = 200, body = JoinToken)))]
pub async fn rotate_join_token(State(ctl): State<Controller>) -> Result<Json<JoinToken>> {
    blocking(move || ctl.rotate_join_token()).await.map(Json)
}

/// Latest operations, newest first.
#[utoipa::path(get, path = "/v1/operations", responses((status = 200, body = Vec<Operation>)))]
pub async fn list_operations(State(ctl): State<Controller>) -> Result<Json<Vec<Operation>>> {
    blocking(move || service::list_operations(&ctl))
        .await
        .map(Json)
}

/// Show an operation.
#[utoipa::path(get, path = "/v1/operations/{id}", responses((status = 200, body = Operation), (status = 404, body = ApiError)))]
pub async fn get_operation(
    State(ctl): State<Controller>,
    Path(id): Path<String>,
) -> Result<Json<Operation>> {
    blocking(move || service::get_operation(&ctl, &id))
        .await
        .map(Json)
}

/// Server-sent events: one `tuchka_api::Event` (JSON) per message.
#[utoipa::path(get, path = "/v1/events", responses((status = 200, description = "text/event-stream of Event", content_type = "text/event-stream")))]
pub async fn events(State(ctl): State<Controller>) -> impl IntoResponse {
    let stream =
        tokio_stream::wrappers::BroadcastStream::new(ctl.events()).filter_map(|ev| async move {
            let ev = ev.ok()?;
            Some(Ok::<_, std::convert::Infallible>(
                SseEvent::default()
                    .event(ev.kind.clone())
                    .data(serde_json::to_string(&ev).ok()?),
            ))
        });
    Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
}

/// The OpenAPI document of this API.
#[utoipa::path(get, path = "/v1/openapi.json", responses((status = 200, description = "OpenAPI 3.1 document")))]
pub async fn openapi() -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi::document(),
    )
        .into_response()
}

/// Register a host (agents). Over TCP the body's `join_token` must be the current join token
/// (else `401` "join token refused"); on the unix socket the agent is trusted.
#[utoipa::path(post, path = "/v1/agent/register", request_body = HostRegister, responses((status = 200, body = HostRegistered), (status = 401, body = ApiError)))]
pub async fn register(
    State(ctl): State<Controller>,
    Extension(t): Extension<Transport>,
    Json(req): Json<HostRegister>,
) -> Result<Json<HostRegistered>> {
    blocking(move || desired::register(&ctl, req, t == Transport::Unix))
        .await
        .map(Json)
}

/// Query of the desired-state long poll.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct DesiredQuery {
    /// Answer once the generation is above this (or after the long-poll timeout).
    #[serde(default)]
    pub after: u64,
}

/// The desired state of a host (long poll).
#[utoipa::path(get, path = "/v1/agent/hosts/{id}/desired", params(DesiredQuery), responses((status = 200, body = HostDesired)))]
pub async fn host_desired(
    State(ctl): State<Controller>,
    Path(id): Path<String>,
    Query(q): Query<DesiredQuery>,
) -> Result<Json<HostDesired>> {
    let generation = ctl.wait_generation(q.after, ctl.config().long_poll).await;
    blocking(move || desired::desired_for(&ctl, &id, generation))
        .await
        .map(Json)
}

/// A host's report of what it observed.
#[utoipa::path(post, path = "/v1/agent/hosts/{id}/report", request_body = HostReport, responses((status = 204)))]
pub async fn host_report(
    State(ctl): State<Controller>,
    Path(id): Path<String>,
    Json(report): Json<HostReport>,
) -> Result<StatusCode> {
    blocking(move || desired::apply_report(&ctl, &id, report))
        .await
        .map(|_| StatusCode::NO_CONTENT)
}

/// The stored qcow2 of an image (agents); honours `Range: bytes=N-`.
#[utoipa::path(get, path = "/v1/agent/images/{sha256}", responses((status = 200, content_type = "application/octet-stream", body = Vec<u8>), (status = 206)))]
pub async fn image_file(
    State(ctl): State<Controller>,
    Path(sha): Path<String>,
    headers: HeaderMap,
) -> Result<Response> {
    if sha.len() != 64 || !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid("InvalidSha256", "not a sha256"));
    }
    let path = images::stored_path(&ctl, &sha);
    let mut f = tokio::fs::File::open(&path)
        .await
        .map_err(|_| Error::NotFound {
            kind: "image",
            cli: "image",
            name: sha.clone(),
        })?;
    let len = f
        .metadata()
        .await
        .map_err(|e| Error::internal("cannot stat image", &e))?
        .len();
    let start = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<u64>().ok());
    let (status, start) = match start {
        Some(s) if s <= len => (StatusCode::PARTIAL_CONTENT, s),
        Some(_) => {
            return Ok((
                StatusCode::RANGE_NOT_SATISFIABLE,
                [(header::CONTENT_RANGE, format!("bytes */{len}"))],
            )
                .into_response())
        }
        None => (StatusCode::OK, 0),
    };
    f.seek(SeekFrom::Start(start))
        .await
        .map_err(|e| Error::internal("cannot read image", &e))?;
    let body = Body::from_stream(tokio_util::io::ReaderStream::new(f.take(len - start)));
    let mut resp = Response::builder()
        .status(status)
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::CONTENT_LENGTH, len - start);
    if status == StatusCode::PARTIAL_CONTENT {
        resp = resp.header(
            header::CONTENT_RANGE,
            format!("bytes {start}-{}/{len}", len.saturating_sub(1)),
        );
    }
    resp.body(body)
        .map_err(|e| Error::internal("cannot build response", &e))
}
