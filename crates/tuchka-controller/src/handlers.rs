//! The handlers of the HTTP API: each parses its request, calls the module of its resource and
//! maps the result (errors through [`Error`]'s one mapping). The routing table and
//! authentication are in [`crate::api`].

use std::io::SeekFrom;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRequest, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Extension, Json};
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tuchka_api::agent::{HostDesired, HostRegister, HostRegistered, HostReport, GENERATION_HEADER};
use tuchka_api::{
    ApiError, BalancePlan, BalanceStatus, Drain, Forward, ForwardCreate, Group, GroupCreate,
    GroupScale, Host, HostDrain, HostRemoved, Image, JoinToken, JoinTokenCreate, Network,
    NetworkCreate, Operation, Rule, RuleCreate, Vm, VmMigrate, VmStop,
};
use tuchka_api::{
    CachePrune, CachedImage, ImageBuild, ImageCapture, Storage, VmResize, Volume, VolumeAttach,
    VolumeCreate, VolumeResize,
};

use crate::error::{Error, Result};
use crate::state::Controller;
use crate::vms::VmAction;
use crate::{agents, desired, images};

/// Which listener a request came in on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// The unix socket: trusted.
    Unix,
    /// TCP (TLS): bearer token required.
    Tcp,
}

/// A JSON request body, always an object; a body that does not parse is a `400 InvalidBody`
/// with serde's words (which field, what was expected), like every other error.
#[derive(Debug)]
pub struct JsonBody<T>(pub T);

impl<S: Send + Sync, T: serde::de::DeserializeOwned> FromRequest<S> for JsonBody<T> {
    type Rejection = Error;

    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self> {
        let axum::Json(Object(v)) = axum::Json::<Object<T>>::from_request(req, state).await?;
        Ok(JsonBody(v))
    }
}

/// `T` read only from a JSON object: serde would also build a struct whose fields all have
/// defaults from an array (`[]`), which no client means.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> std::result::Result<Self, D::Error> {
        struct Fields<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Fields<T> {
            type Value = T;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> std::result::Result<T, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map))
            }
        }
        d.deserialize_map(Fields(std::marker::PhantomData))
            .map(Object)
    }
}

impl From<JsonRejection> for Error {
    fn from(r: JsonRejection) -> Error {
        Error::invalid(
            "InvalidBody",
            format!("bad request body: {}", r.body_text()),
        )
    }
}

/// The OpenAPI document, handed to [`openapi`] by the router.
#[derive(Debug, Clone)]
pub struct OpenApiDoc(pub Arc<String>);

/// Run blocking service code off the async threads.
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T> + Send + 'static,
) -> Result<T> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| Error::Internal {
            message: "worker failed".into(),
            chain: vec![e.to_string()],
        })?
}

/// `202` with the operation as it stands after the engine's first look at it (an operation
/// that has nothing to wait for is already finished).
async fn accepted(ctl: Controller, op: Operation) -> Result<(StatusCode, Json<Operation>)> {
    let op = blocking(move || {
        crate::progress::progress(&ctl);
        Ok(crate::operations::get(&ctl, &op.id).unwrap_or(op))
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(op)))
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
    blocking(move || images::list(&ctl)).await.map(Json)
}

/// Upload an image (raw file bytes as the body).
#[utoipa::path(post, path = "/v1/images", params(UploadQuery), request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Image), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn upload_image(
    State(ctl): State<Controller>,
    Query(q): Query<UploadQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Image>)> {
    let inc = images::Incoming {
        name: &q.name,
        made_from: "upload",
        size: content_length(&headers),
    };
    let img = images::upload(&ctl, inc, body.into_data_stream()).await?;
    Ok((StatusCode::CREATED, Json(img)))
}

/// Show an image.
#[utoipa::path(get, path = "/v1/images/{name}", responses((status = 200, body = Image), (status = 404, body = ApiError)))]
pub async fn get_image(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Image>> {
    blocking(move || images::get(&ctl, &name)).await.map(Json)
}

/// Remove an image (refused while in use).
#[utoipa::path(delete, path = "/v1/images/{name}", responses((status = 204), (status = 409, body = ApiError)))]
pub async fn delete_image(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    blocking(move || images::delete(&ctl, &name))
        .await
        .map(|_| StatusCode::NO_CONTENT)
}

/// List networks.
#[utoipa::path(get, path = "/v1/networks", responses((status = 200, body = Vec<Network>)))]
pub async fn list_networks(State(ctl): State<Controller>) -> Result<Json<Vec<Network>>> {
    blocking(move || crate::networks::list(&ctl))
        .await
        .map(Json)
}

/// Create a network.
#[utoipa::path(post, path = "/v1/networks", request_body = NetworkCreate, responses((status = 202, body = Operation), (status = 400, body = ApiError)))]
pub async fn create_network(
    State(ctl): State<Controller>,
    JsonBody(req): JsonBody<NetworkCreate>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::networks::create(&ctl, req)).await?;
    accepted(c2, op).await
}

/// Show a network.
#[utoipa::path(get, path = "/v1/networks/{name}", responses((status = 200, body = Network), (status = 404, body = ApiError)))]
pub async fn get_network(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Network>> {
    blocking(move || crate::networks::get(&ctl, &name))
        .await
        .map(Json)
}

/// Remove a network (refused while VMs use it).
#[utoipa::path(delete, path = "/v1/networks/{name}", responses((status = 202, body = Operation), (status = 409, body = ApiError)))]
pub async fn delete_network(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::networks::delete(&ctl, &name)).await?;
    accepted(c2, op).await
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
    JsonBody(req): JsonBody<RuleCreate>,
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
    JsonBody(req): JsonBody<ForwardCreate>,
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
    blocking(move || crate::groups::list(&ctl)).await.map(Json)
}

/// Create a group (all or nothing).
#[utoipa::path(post, path = "/v1/groups", request_body = GroupCreate,
    responses((status = 202, body = Operation), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_group(
    State(ctl): State<Controller>,
    JsonBody(req): JsonBody<GroupCreate>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::groups::create(&ctl, req)).await?;
    accepted(c2, op).await
}

/// Show a group.
#[utoipa::path(get, path = "/v1/groups/{name}", responses((status = 200, body = Group), (status = 404, body = ApiError)))]
pub async fn get_group(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Group>> {
    blocking(move || crate::groups::get(&ctl, &name))
        .await
        .map(Json)
}

/// Scale a group.
#[utoipa::path(post, path = "/v1/groups/{name}/scale", request_body = GroupScale, responses((status = 202, body = Operation)))]
pub async fn scale_group(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<GroupScale>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::groups::scale(&ctl, &name, req)).await?;
    accepted(c2, op).await
}

/// Remove a group and all its VMs.
#[utoipa::path(delete, path = "/v1/groups/{name}", responses((status = 202, body = Operation)))]
pub async fn delete_group(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::groups::delete(&ctl, &name)).await?;
    accepted(c2, op).await
}

/// List VMs.
#[utoipa::path(get, path = "/v1/vms", responses((status = 200, body = Vec<Vm>)))]
pub async fn list_vms(State(ctl): State<Controller>) -> Result<Json<Vec<Vm>>> {
    blocking(move || crate::vms::list(&ctl)).await.map(Json)
}

/// Show a VM.
#[utoipa::path(get, path = "/v1/vms/{name}", responses((status = 200, body = Vm), (status = 404, body = ApiError)))]
pub async fn get_vm(State(ctl): State<Controller>, Path(name): Path<String>) -> Result<Json<Vm>> {
    blocking(move || crate::vms::get(&ctl, &name))
        .await
        .map(Json)
}

/// Remove a VM.
#[utoipa::path(delete, path = "/v1/vms/{name}", responses((status = 202, body = Operation)))]
pub async fn delete_vm(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::vms::delete(&ctl, &name)).await?;
    accepted(c2, op).await
}

/// The serial console log of a VM.
#[utoipa::path(get, path = "/v1/vms/{name}/console", responses((status = 200, body = String, content_type = "text/plain")))]
pub async fn vm_console(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Response> {
    let text = blocking(move || crate::vms::console(&ctl, &name)).await?;
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
    let Some(action) = VmAction::parse(&action) else {
        return Err(Error::invalid(
            "InvalidAction",
            format!(
                "unknown VM action {action:?}: use start, stop, pause, resume, reboot or migrate"
            ),
        ));
    };
    let stop: VmStop = if body.is_empty() {
        VmStop::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid("InvalidBody", format!("bad request body: {e}")))?
    };
    let c2 = ctl.clone();
    let op = blocking(move || crate::vms::action(&ctl, &name, action, stop)).await?;
    accepted(c2, op).await
}

/// List hosts.
#[utoipa::path(get, path = "/v1/hosts", responses((status = 200, body = Vec<Host>)))]
pub async fn list_hosts(State(ctl): State<Controller>) -> Result<Json<Vec<Host>>> {
    blocking(move || crate::hosts::list(&ctl)).await.map(Json)
}

/// Show a host.
#[utoipa::path(get, path = "/v1/hosts/{name}", responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn get_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Host>> {
    blocking(move || crate::hosts::get(&ctl, &name))
        .await
        .map(Json)
}

/// Move a VM to another host: live if it runs or is paused, cold if it is stopped. Without
/// `to` the scheduler picks the target.
#[utoipa::path(post, path = "/v1/vms/{name}/migrate", request_body(content = Option<VmMigrate>),
    responses((status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn migrate_vm(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Operation>)> {
    let req: VmMigrate = if body.is_empty() {
        VmMigrate::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid("InvalidBody", format!("bad request body: {e}")))?
    };
    let c2 = ctl.clone();
    let op = blocking(move || crate::migrations::start(&ctl, &name, req)).await?;
    accepted(c2, op).await
}

/// Drain a host: no new VMs are placed on it, and its VMs move off (one migration each, a few
/// at a time). `202` with the operation; VMs that cannot move are listed with the reason.
#[utoipa::path(post, path = "/v1/hosts/{name}/drain", request_body(content = Option<HostDrain>),
    responses((status = 202, body = Drain), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn drain_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<Drain>)> {
    let req: HostDrain = if body.is_empty() {
        HostDrain::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| Error::invalid("InvalidBody", format!("bad request body: {e}")))?
    };
    let c2 = ctl.clone();
    let mut d = blocking(move || crate::drain::start(&ctl, &name, req)).await?;
    if let Some(op) = d.operation.take() {
        d.operation = Some(accepted(c2, op).await?.1 .0);
    }
    Ok((StatusCode::ACCEPTED, Json(d)))
}

/// Undrain a host: it accepts new VMs again.
#[utoipa::path(post, path = "/v1/hosts/{name}/undrain", responses((status = 200, body = Host), (status = 404, body = ApiError)))]
pub async fn undrain_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Host>> {
    blocking(move || crate::hosts::undrain(&ctl, &name))
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
    blocking(move || crate::hosts::revoke(&ctl, &name))
        .await
        .map(Json)
}

/// Remove a host. Refused while it is up with VMs (`409 HostInUse`: drain it first) and,
/// without `force`, while it is down with VMs (`409 HostHasVms`); with `force` its VMs become
/// `lost` and their addresses are freed. Its identity is refused from then on.
#[utoipa::path(delete, path = "/v1/hosts/{name}", params(tuchka_api::HostRemove), responses((status = 200, body = HostRemoved), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn remove_host(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Query(q): Query<tuchka_api::HostRemove>,
) -> Result<Json<HostRemoved>> {
    blocking(move || crate::hosts::remove(&ctl, &name, q.force))
        .await
        .map(Json)
}

/// Make a join token (users only: unix socket or API token): it expires (`ttl_s`, default one
/// hour), may be single-use or for one existing host, and is shown only in this answer.
#[utoipa::path(post, path = "/v1/join-tokens", request_body = JoinTokenCreate, responses((status = 200, body = JoinToken), (status = 400, body = ApiError), (status = 404, body = ApiError)))]
pub async fn create_join_token(
    State(ctl): State<Controller>,
    JsonBody(req): JsonBody<JoinTokenCreate>,
) -> Result<Json<JoinToken>> {
    blocking(move || ctl.create_join_token(&req))
        .await
        .map(Json)
}

/// Latest operations, newest first.
#[utoipa::path(get, path = "/v1/operations", responses((status = 200, body = Vec<Operation>)))]
pub async fn list_operations(State(ctl): State<Controller>) -> Result<Json<Vec<Operation>>> {
    blocking(move || crate::operations::list(&ctl))
        .await
        .map(Json)
}

/// Query of `GET /v1/operations/{id}`.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
pub struct OperationQuery {
    /// Long poll: with `If-None-Match` set to the operation's last `ETag`, answer as soon as the
    /// operation differs from it, or `304 Not Modified` after this many seconds (at most 60).
    #[serde(default)]
    pub wait: Option<u64>,
}

/// The longest an operation long poll waits.
const OPERATION_WAIT_MAX: Duration = Duration::from_secs(60);

/// Show an operation; with `?wait=` and `If-None-Match`, once it changed (a long poll).
#[utoipa::path(get, path = "/v1/operations/{id}", params(OperationQuery,
    ("If-None-Match" = Option<String>, Header, description = "The ETag of the operation as last seen")),
    responses((status = 200, body = Operation, headers(("ETag" = String, description = "Changes whenever the operation does"))),
        (status = 304, description = "Unchanged until `wait` ran out"), (status = 404, body = ApiError)))]
pub async fn get_operation(
    State(ctl): State<Controller>,
    Path(id): Path<String>,
    Query(q): Query<OperationQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    let seen = if_none_match(&headers);
    let wait = Duration::from_secs(q.wait.unwrap_or(0)).min(OPERATION_WAIT_MAX);
    let deadline = tokio::time::Instant::now() + wait;
    // Subscribed before each read, so a commit between the read and the wait is not missed.
    let mut commits = ctl.commits();
    loop {
        let (c, id) = (ctl.clone(), id.clone());
        let op = blocking(move || crate::operations::get(&c, &id)).await?;
        let etag = operation_etag(&op)?;
        if seen.as_deref() != Some(etag.as_str()) {
            return Ok(([(header::ETAG, etag)], Json(op)).into_response());
        }
        let changed = tokio::time::timeout_at(deadline, commits.changed()).await;
        if !matches!(changed, Ok(Ok(()))) {
            return Ok(([(header::ETAG, etag)], StatusCode::NOT_MODIFIED).into_response());
        }
    }
}

/// A strong ETag of an operation: a digest of what the client would see.
fn operation_etag(op: &Operation) -> Result<String> {
    Ok(etag_of(&encode(op, "an operation")?))
}

/// `value` as JSON.
fn encode(value: &impl serde::Serialize, what: &str) -> Result<Vec<u8>> {
    serde_json::to_vec(value).map_err(|e| Error::internal(format!("cannot encode {what}"), &e))
}

/// A strong ETag of a JSON answer.
fn etag_of(json: &[u8]) -> String {
    let digest = tuchka_core::digest::sha256_hex(json);
    format!("\"{}\"", &digest[..16])
}

/// The `If-None-Match` request header, if any.
fn if_none_match(headers: &HeaderMap) -> Option<String> {
    headers
        .get(header::IF_NONE_MATCH)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string)
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
pub async fn openapi(Extension(doc): Extension<OpenApiDoc>) -> Response {
    (
        [(header::CONTENT_TYPE, "application/json")],
        doc.0.as_str().to_string(),
    )
        .into_response()
}

/// The balancer: its mode, the imbalance now, and its latest decisions (why it moved, or why
/// not).
#[utoipa::path(get, path = "/v1/balance", responses((status = 200, body = BalanceStatus)))]
pub async fn balance_status(State(ctl): State<Controller>) -> Result<Json<BalanceStatus>> {
    blocking(move || crate::balance::status(&ctl))
        .await
        .map(Json)
}

/// The moves that would even out the load now, each with its reason, the imbalance before and
/// after, and its cost. Changes nothing.
#[utoipa::path(get, path = "/v1/balance/plan", responses((status = 200, body = BalancePlan)))]
pub async fn balance_plan(State(ctl): State<Controller>) -> Result<Json<BalancePlan>> {
    blocking(move || crate::balance::plan(&ctl)).await.map(Json)
}

/// Carry out the plan now: one operation, one `vm.migrate` child per move.
#[utoipa::path(post, path = "/v1/balance/apply", responses((status = 202, body = Operation), (status = 409, body = ApiError)))]
pub async fn balance_apply(State(ctl): State<Controller>) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::balance::apply(&ctl)).await?;
    accepted(c2, op).await
}

/// Register a host (agents), with its identity or, over TCP, a join token: a valid identity
/// registers that host again (also under a new name); otherwise the token must be valid (`401`
/// `Unauthorized`, `JoinTokenExpired`, `JoinTokenUsed`) and the name free (`409`
/// `HostNameTaken`). The identity of a removed host is refused (`401 HostRemoved`). On the unix
/// socket no token is needed, and with a local agent only the controller's own host registers.
#[utoipa::path(post, path = "/v1/agent/register", request_body = HostRegister, responses((status = 200, body = HostRegistered), (status = 401, body = ApiError), (status = 409, body = ApiError)))]
pub async fn register(
    State(ctl): State<Controller>,
    Extension(t): Extension<Transport>,
    JsonBody(req): JsonBody<HostRegister>,
) -> Result<Json<HostRegistered>> {
    blocking(move || agents::register(&ctl, req, t == Transport::Unix))
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

/// The desired state of a host (long poll). With `If-None-Match` naming what the host has, an
/// unchanged desired state is a bodiless `304`: a long poll that ran out (or a change elsewhere
/// in the cloud) costs the host nothing to read. The generation is in [`GENERATION_HEADER`].
#[utoipa::path(get, path = "/v1/agent/hosts/{id}/desired", params(DesiredQuery,
    ("If-None-Match" = Option<String>, Header, description = "The ETag of the desired state the host has")),
    responses((status = 200, body = HostDesired, headers(("ETag" = String, description = "Of the content, not of the generation"))),
        (status = 304, description = "What the host has is still its desired state")))]
pub async fn host_desired(
    State(ctl): State<Controller>,
    Extension(cache): Extension<Arc<desired::Cache>>,
    Path(id): Path<String>,
    Query(q): Query<DesiredQuery>,
    headers: HeaderMap,
) -> Result<Response> {
    ctl.wait_generation(q.after, ctl.config().long_poll).await;
    if let Some(wait) = cache.reload_wait(&ctl) {
        tokio::time::sleep(wait).await;
    }
    let mut d = blocking(move || cache.desired_for(&ctl, &id)).await?;
    let generation = d.generation;
    d.generation = 0;
    let tag = etag_of(&encode(&d, "a desired state")?);
    let gen_header = (
        header::HeaderName::from_static(GENERATION_HEADER),
        generation.to_string(),
    );
    if if_none_match(&headers).as_deref() == Some(tag.as_str()) {
        return Ok(([(header::ETAG, tag), gen_header], StatusCode::NOT_MODIFIED).into_response());
    }
    d.generation = generation;
    Ok(([(header::ETAG, tag), gen_header], Json(d)).into_response())
}

/// A host's report of what it observed.
#[utoipa::path(post, path = "/v1/agent/hosts/{id}/report", request_body = HostReport, responses((status = 204)))]
pub async fn host_report(
    State(ctl): State<Controller>,
    Path(id): Path<String>,
    JsonBody(report): JsonBody<HostReport>,
) -> Result<StatusCode> {
    blocking(move || {
        // A heartbeat that changed nothing leaves the operations to the engine's tick.
        if agents::apply_report(&ctl, &id, report)? {
            crate::progress::progress(&ctl);
        }
        Ok(())
    })
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

/// The body length a client announced.
fn content_length(h: &axum::http::HeaderMap) -> Option<u64> {
    h.get(axum::http::header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

// ------------------------------------------------------------------ volumes and disk space

/// List volumes.
#[utoipa::path(get, path = "/v1/volumes", responses((status = 200, body = Vec<Volume>)))]
pub async fn list_volumes(State(ctl): State<Controller>) -> Result<Json<Vec<Volume>>> {
    blocking(move || crate::volumes::list(&ctl)).await.map(Json)
}

/// Make a volume (recorded at once; its host makes the file on its next pass).
#[utoipa::path(post, path = "/v1/volumes", request_body = VolumeCreate,
    responses((status = 201, body = Volume), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn create_volume(
    State(ctl): State<Controller>,
    JsonBody(req): JsonBody<VolumeCreate>,
) -> Result<(StatusCode, Json<Volume>)> {
    let v = blocking(move || crate::volumes::create(&ctl, req)).await?;
    Ok((StatusCode::CREATED, Json(v)))
}

/// Show a volume.
#[utoipa::path(get, path = "/v1/volumes/{name}", responses((status = 200, body = Volume), (status = 404, body = ApiError)))]
pub async fn get_volume(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<Json<Volume>> {
    blocking(move || crate::volumes::get(&ctl, &name))
        .await
        .map(Json)
}

/// Remove a volume (refused while attached).
#[utoipa::path(delete, path = "/v1/volumes/{name}", responses((status = 204), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn delete_volume(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<StatusCode> {
    blocking(move || crate::volumes::delete(&ctl, &name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Attach a volume to a VM on its host.
#[utoipa::path(post, path = "/v1/volumes/{name}/attach", request_body = VolumeAttach,
    responses((status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn attach_volume(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<VolumeAttach>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::volumes::attach(&ctl, &name, req)).await?;
    accepted(c2, op).await
}

/// Detach a volume from its VM.
#[utoipa::path(post, path = "/v1/volumes/{name}/detach",
    responses((status = 202, body = Operation), (status = 404, body = ApiError), (status = 409, body = ApiError)))]
pub async fn detach_volume(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::volumes::detach(&ctl, &name)).await?;
    accepted(c2, op).await
}

/// Grow a volume.
#[utoipa::path(post, path = "/v1/volumes/{name}/resize", request_body = VolumeResize,
    responses((status = 202, body = Operation), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn resize_volume(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<VolumeResize>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::volumes::resize(&ctl, &name, req)).await?;
    accepted(c2, op).await
}

/// Change a VM's size; the operation's message says what applies now and what at the next start.
#[utoipa::path(post, path = "/v1/vms/{name}/resize", request_body = VmResize,
    responses((status = 202, body = Operation), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn resize_vm(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    JsonBody(req): JsonBody<VmResize>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::vms::resize(&ctl, &name, req)).await?;
    accepted(c2, op).await
}

/// Disk space: every host's pool and the controller's image store.
#[utoipa::path(get, path = "/v1/storage", responses((status = 200, body = Storage)))]
pub async fn storage(State(ctl): State<Controller>) -> Result<Json<Storage>> {
    blocking(move || crate::storage::view(&ctl)).await.map(Json)
}

/// The images cached on hosts.
#[utoipa::path(get, path = "/v1/images/cache", responses((status = 200, body = Vec<CachedImage>)))]
pub async fn image_cache(State(ctl): State<Controller>) -> Result<Json<Vec<CachedImage>>> {
    blocking(move || crate::storage::cache_list(&ctl))
        .await
        .map(Json)
}

/// Drop every cached image nothing uses.
#[utoipa::path(post, path = "/v1/images/cache/prune", responses((status = 200, body = CachePrune)))]
pub async fn prune_image_cache(State(ctl): State<Controller>) -> Result<Json<CachePrune>> {
    blocking(move || crate::storage::cache_prune(&ctl))
        .await
        .map(Json)
}

// ------------------------------------------------------------------ images from VMs

/// Make an image of a VM's root disk (a running VM keeps running).
#[utoipa::path(post, path = "/v1/images/capture", request_body = ImageCapture,
    responses((status = 202, body = Operation), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn capture_image(
    State(ctl): State<Controller>,
    JsonBody(req): JsonBody<ImageCapture>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::captures::start(&ctl, req)).await?;
    accepted(c2, op).await
}

/// Build an image with a builder VM that runs a script and powers itself off.
#[utoipa::path(post, path = "/v1/images/build", request_body = ImageBuild,
    responses((status = 202, body = Operation), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn build_image(
    State(ctl): State<Controller>,
    JsonBody(req): JsonBody<ImageBuild>,
) -> Result<(StatusCode, Json<Operation>)> {
    let c2 = ctl.clone();
    let op = blocking(move || crate::builds::start(&ctl, req)).await?;
    accepted(c2, op).await
}

/// A host sends the image it captured (agents): stored through the checks of an upload.
#[utoipa::path(put, path = "/v1/agent/hosts/{id}/captures/{capture}", request_body(content = Vec<u8>, content_type = "application/octet-stream"),
    responses((status = 201, body = Image), (status = 400, body = ApiError), (status = 409, body = ApiError)))]
pub async fn receive_capture(
    State(ctl): State<Controller>,
    Path((host, id)): Path<(String, String)>,
    headers: HeaderMap,
    body: Body,
) -> Result<(StatusCode, Json<Image>)> {
    let c2 = ctl.clone();
    let x = match blocking(move || crate::captures::expected(&c2, &host, &id)).await {
        Ok(x) => x,
        Err(e) => {
            // Read the body before answering (see images::upload).
            let mut s = body.into_data_stream();
            while s.next().await.is_some() {}
            return Err(e);
        }
    };
    let inc = images::Incoming {
        name: &x.image,
        made_from: &x.made_from,
        size: content_length(&headers),
    };
    let outcome = images::upload(&ctl, inc, body.into_data_stream()).await;
    let (c2, x2) = (ctl.clone(), x.clone());
    // The refusal keeps its causes for `op show`.
    let stored = outcome
        .as_ref()
        .map(|i| i.stored_size)
        .map_err(Error::to_api);
    let recorded = blocking(move || {
        crate::captures::received(&c2, &x2, stored)?;
        crate::progress::progress(&c2);
        Ok(())
    })
    .await;
    let img = outcome?;
    recorded?;
    Ok((StatusCode::CREATED, Json(img)))
}
