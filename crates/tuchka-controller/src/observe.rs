//! The handlers of what people and monitoring watch: `/metrics`, the hosts' load history, VM
//! console logs (read and followed by users, shipped by agents), the dashboard's login, and the
//! middleware that counts every API request. Like [`crate::handlers`], each parses, calls its
//! module and maps the result.

use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use tuchka_api::agent::{ConsoleUpload, ConsoleUploaded};
use tuchka_api::{ConsoleLog, LoadHistory, UiLogin};

use crate::error::Result;
use crate::handlers::{blocking, JsonBody};
use crate::state::Controller;

/// Prometheus metrics (text format 0.0.4); over TCP the API token is required.
#[utoipa::path(get, path = "/metrics", responses((status = 200, description = "Prometheus text format 0.0.4 (see docs/monitoring.md)", content_type = "text/plain")))]
pub async fn metrics(State(ctl): State<Controller>) -> Result<Response> {
    let text = blocking(move || crate::monitoring::scrape(&ctl)).await?;
    Ok(([(header::CONTENT_TYPE, crate::metrics::CONTENT_TYPE)], text).into_response())
}

/// The hosts' load over the last hour (one sample every 20 s), for the dashboard's charts.
#[utoipa::path(get, path = "/v1/history", responses((status = 200, body = LoadHistory)))]
pub async fn history(State(ctl): State<Controller>) -> Result<Json<LoadHistory>> {
    blocking(move || crate::monitoring::history(&ctl))
        .await
        .map(Json)
}

/// Query of the console log.
#[derive(Debug, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Only what follows this offset (the `end` of the previous answer); absent: all that is kept.
    #[serde(default)]
    pub from: Option<u64>,
    /// With `from`: when nothing follows it yet, wait up to this many seconds (at most 30) for
    /// new text before answering (a long poll).
    #[serde(default)]
    pub wait: Option<u64>,
}

/// A VM's serial console log as JSON with offsets, to follow it: ask again with `from` = the
/// answer's `end` and `wait` = a few seconds. The same for a VM on any host.
#[utoipa::path(get, path = "/v1/vms/{name}/console/log", params(("name" = String, Path, description = "VM name"), ConsoleQuery),
    responses((status = 200, body = ConsoleLog), (status = 404, body = tuchka_api::ApiError)))]
pub async fn console_log(
    State(ctl): State<Controller>,
    Path(name): Path<String>,
    Query(q): Query<ConsoleQuery>,
) -> Result<Json<ConsoleLog>> {
    let wait = Duration::from_secs(q.wait.unwrap_or(0));
    crate::consoles::follow(&ctl, &name, q.from, wait)
        .await
        .map(Json)
}

/// What is new in the console logs of a host's VMs (agents); answers the offsets wanted next.
#[utoipa::path(post, path = "/v1/agent/hosts/{id}/consoles", request_body = ConsoleUpload, responses((status = 200, body = ConsoleUploaded)))]
pub async fn host_consoles(
    State(ctl): State<Controller>,
    Path(id): Path<String>,
    JsonBody(upload): JsonBody<ConsoleUpload>,
) -> Result<Json<ConsoleUploaded>> {
    blocking(move || crate::consoles::ship(&ctl, &id, upload))
        .await
        .map(Json)
}

/// Where the dashboard is, and a login link carrying the API token (users only).
#[utoipa::path(get, path = "/v1/ui", responses((status = 200, body = UiLogin)))]
pub async fn ui_login(State(ctl): State<Controller>) -> Json<UiLogin> {
    Json(crate::dashboard::login(&ctl))
}

/// Count the request in the metrics: its method, route template (`unmatched` when no route
/// matched), status and time to the response's headers.
pub async fn track(State(ctl): State<Controller>, req: Request, next: Next) -> Response {
    let started = Instant::now();
    let method = req.method().as_str().to_string();
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map(|p| p.as_str().to_string())
        .unwrap_or_else(|| "unmatched".to_string());
    let resp = next.run(req).await;
    ctl.metrics()
        .request(&method, &route, resp.status().as_u16(), started.elapsed());
    resp
}
