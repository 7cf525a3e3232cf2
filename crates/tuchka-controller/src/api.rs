//! The HTTP API: one routing table, and authentication. Handlers are in [`crate::handlers`].
//!
//! Served on the unix socket (trusted: file permissions are the access control) and, with
//! `--listen`, on TCP with TLS only (see [`crate::tls`]), where every request needs
//! `Authorization: Bearer <token>`: the API token for users, the host credential for the agent
//! endpoints of that host. `POST /v1/agent/register` is the exception: it carries the join
//! token in its body instead (checked by [`agents::register`]); so are the dashboard's own
//! files under `/ui/` (code, no data: the page then calls the API with the token). `/metrics`
//! needs the API token like any other route. Every request is counted by [`observe::track`].

use std::sync::Arc;

use axum::extract::{DefaultBodyLimit, Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use tuchka_api::ApiError;

use crate::error::Error;
use crate::handlers::*;
use crate::state::Controller;
use crate::{agents, dashboard, desired, observe};

pub use crate::handlers::Transport;

/// The API router for one listener. `desired` is the controller's one cache of what hosts'
/// desired states are built from (shared by all listeners).
pub fn router(ctl: Controller, transport: Transport, desired: Arc<desired::Cache>) -> Router {
    Router::new()
        .route(
            "/v1/images",
            get(list_images)
                .post(upload_image)
                .layer(DefaultBodyLimit::disable()),
        )
        .route("/v1/images/capture", post(capture_image))
        .route("/v1/images/build", post(build_image))
        .route("/v1/images/cache", get(image_cache))
        .route("/v1/images/cache/prune", post(prune_image_cache))
        .route("/v1/images/{name}", get(get_image).delete(delete_image))
        .route("/v1/volumes", get(list_volumes).post(create_volume))
        .route("/v1/volumes/{name}", get(get_volume).delete(delete_volume))
        .route("/v1/volumes/{name}/attach", post(attach_volume))
        .route("/v1/volumes/{name}/detach", post(detach_volume))
        .route("/v1/volumes/{name}/resize", post(resize_volume))
        .route("/v1/storage", get(storage))
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
        .route("/v1/vms/{name}/console/log", get(observe::console_log))
        .route("/v1/vms/{name}/migrate", post(migrate_vm))
        .route("/v1/vms/{name}/resize", post(resize_vm))
        .route("/v1/vms/{name}/{action}", post(vm_action))
        .route("/v1/hosts", get(list_hosts))
        .route("/v1/hosts/{name}", get(get_host).delete(remove_host))
        .route("/v1/hosts/{name}/revoke", post(revoke_host))
        .route("/v1/hosts/{name}/drain", post(drain_host))
        .route("/v1/hosts/{name}/undrain", post(undrain_host))
        .route("/v1/join-tokens", post(create_join_token))
        .route("/v1/balance", get(balance_status))
        .route("/v1/balance/plan", get(balance_plan))
        .route("/v1/balance/apply", post(balance_apply))
        .route("/v1/operations", get(list_operations))
        .route("/v1/operations/{id}", get(get_operation))
        .route("/v1/events", get(events))
        .route("/v1/history", get(observe::history))
        .route("/v1/ui", get(observe::ui_login))
        .route("/metrics", get(observe::metrics))
        .route("/", get(dashboard::to_index))
        .route("/ui", get(dashboard::to_index))
        .route("/ui/", get(dashboard::index))
        .route("/ui/{file}", get(dashboard::asset))
        .route("/v1/openapi.json", get(openapi))
        .route("/v1/agent/register", post(register))
        .route("/v1/agent/hosts/{id}/desired", get(host_desired))
        .route("/v1/agent/hosts/{id}/report", post(host_report))
        .route(
            "/v1/agent/hosts/{id}/captures/{capture}",
            axum::routing::put(receive_capture).layer(DefaultBodyLimit::disable()),
        )
        .route(
            "/v1/agent/hosts/{id}/consoles",
            post(observe::host_consoles),
        )
        .route("/v1/agent/images/{sha256}", get(image_file))
        .fallback(not_found)
        .layer(middleware::from_fn_with_state(ctl.clone(), auth))
        .layer(Extension(transport))
        .layer(Extension(desired))
        .layer(Extension(OpenApiDoc(Arc::new(crate::openapi::document()))))
        .layer(middleware::from_fn_with_state(ctl.clone(), observe::track))
        .layer(middleware::from_fn(json_errors))
        .with_state(ctl)
}

/// Largest error body [`json_errors`] reads to quote it.
const QUOTED_ERROR_MAX: usize = 4096;

/// Every error answers with the stable JSON body, also those the framework makes before a
/// handler runs (a query or path that does not parse, a method the route lacks, a body over
/// a limit): their text becomes the message, the code follows the status.
async fn json_errors(req: Request, next: Next) -> Response {
    let resp = next.run(req).await;
    let status = resp.status();
    let is_json = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|t| t.starts_with("application/json"));
    if !(status.is_client_error() || status.is_server_error()) || is_json {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let text = match axum::body::to_bytes(body, QUOTED_ERROR_MAX).await {
        Ok(b) => String::from_utf8_lossy(&b).trim().to_string(),
        Err(_) => String::new(),
    };
    let code = match status {
        StatusCode::BAD_REQUEST => "InvalidRequest",
        StatusCode::NOT_FOUND => "NoRoute",
        StatusCode::METHOD_NOT_ALLOWED => "MethodNotAllowed",
        StatusCode::PAYLOAD_TOO_LARGE => "BodyTooLarge",
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "UnsupportedMediaType",
        StatusCode::UNPROCESSABLE_ENTITY => "InvalidBody",
        StatusCode::RANGE_NOT_SATISFIABLE => "RangeNotSatisfiable",
        s if s.is_server_error() => "Internal",
        _ => "InvalidRequest",
    };
    let message = match (text.is_empty(), status) {
        (false, _) => text,
        (true, StatusCode::METHOD_NOT_ALLOWED) => {
            "this endpoint does not take this method (its Allow header says which it takes; the API is described at /v1/openapi.json)".to_string()
        }
        (true, s) => s.canonical_reason().unwrap_or("request refused").to_string(),
    };
    let body = ApiError {
        code: code.into(),
        message,
        chain: vec![],
    };
    // Only the body changes: the other headers (Allow, Content-Range, …) stay.
    let json = serde_json::to_vec(&body).unwrap_or_default();
    parts.headers.remove(header::CONTENT_LENGTH);
    parts.headers.insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static("application/json"),
    );
    Response::from_parts(parts, axum::body::Body::from(json))
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
    if t == Transport::Unix {
        // The unix socket's agent is the controller's own host, and only it.
        if let Some(rest) = req.uri().path().strip_prefix("/v1/agent/hosts/") {
            let id = rest.split('/').next().unwrap_or_default().to_string();
            let ctl = ctl.clone();
            match blocking(move || Ok(agents::authenticate_local(&ctl, &id))).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => return host_auth_refused(e),
                Err(e) => return e.into_response(),
            }
        }
    }
    if t == Transport::Tcp {
        let path = req.uri().path().to_string();
        let token = bearer(req.headers()).unwrap_or_default().to_string();
        // Registration is checked by its handler (the join token); the dashboard's own files
        // hold no data (the page then calls the API with the token).
        let ok = if path == "/v1/agent/register" || dashboard_asset(&path) {
            true
        } else if let Some(rest) = path.strip_prefix("/v1/agent/hosts/") {
            let id = rest.split('/').next().unwrap_or_default().to_string();
            let check = {
                let ctl = ctl.clone();
                blocking(move || Ok(agents::authenticate_host(&ctl, &id, &token))).await
            };
            match check {
                Ok(Ok(())) => true,
                Ok(Err(e)) => return host_auth_refused(e),
                Err(e) => return e.into_response(),
            }
        } else if path.starts_with("/v1/agent/images/")
            && !tuchka_core::digest::constant_time_eq(token.as_bytes(), ctl.api_token().as_bytes())
        {
            // Image downloads: any joined (not revoked) host, or a user.
            let check = {
                let ctl = ctl.clone();
                blocking(move || Ok(agents::authenticate_any_host(&ctl, &token))).await
            };
            match check {
                Ok(Ok(())) => true,
                Ok(Err(e)) => return host_auth_refused(e),
                Err(e) => return e.into_response(),
            }
        } else {
            tuchka_core::digest::constant_time_eq(token.as_bytes(), ctl.api_token().as_bytes())
        };
        if !ok {
            return Error::Unauthorized("missing or wrong bearer token (use --token or TUCHKA_TOKEN; it is in <data-dir>/token)".into())
                .into_response();
        }
    }
    next.run(req).await
}

/// The paths of the dashboard's own files, which a browser loads without a token.
fn dashboard_asset(path: &str) -> bool {
    matches!(path, "/" | "/ui" | "/ui/")
        || path
            .strip_prefix("/ui/")
            .is_some_and(|f| !f.is_empty() && !f.contains('/'))
}

/// The answer to an agent whose host credential was refused: `401` with code
/// [`tuchka_api::CODE_HOST_REVOKED`] for a revoked host and [`tuchka_api::CODE_HOST_REMOVED`]
/// for a removed one (the agent stops), `Unauthorized` else.
fn host_auth_refused(e: agents::HostAuthError) -> Response {
    let code = match &e {
        agents::HostAuthError::Store(s) => {
            return Error::internal("cannot check the host credential", s).into_response()
        }
        agents::HostAuthError::Revoked(_) => tuchka_api::CODE_HOST_REVOKED,
        agents::HostAuthError::Removed(_) => tuchka_api::CODE_HOST_REMOVED,
        agents::HostAuthError::NotLocal(..) => "NotLocalHost",
        _ => "Unauthorized",
    };
    let body = ApiError {
        code: code.into(),
        message: e.to_string(),
        chain: vec![],
    };
    (StatusCode::UNAUTHORIZED, Json(body)).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tower::ServiceExt;

    #[tokio::test]
    async fn framework_errors_get_the_json_body_and_keep_their_headers() {
        let app = Router::new()
            .route(
                "/range",
                get(|| async {
                    (
                        StatusCode::RANGE_NOT_SATISFIABLE,
                        [(header::CONTENT_RANGE, "bytes */10")],
                    )
                }),
            )
            .route("/json", get(|| async { Error::invalid("Nope", "no") }))
            .layer(middleware::from_fn(json_errors));
        let call = |uri: &str, method: &str| {
            let req = axum::http::Request::builder()
                .uri(uri)
                .method(method)
                .body(axum::body::Body::empty())
                .expect("request");
            app.clone().oneshot(req)
        };
        let resp = call("/range", "GET").await.expect("answer");
        assert_eq!(resp.status(), StatusCode::RANGE_NOT_SATISFIABLE);
        assert_eq!(resp.headers()[header::CONTENT_RANGE], "bytes */10");
        let body = axum::body::to_bytes(resp.into_body(), 4096)
            .await
            .expect("body");
        let e: ApiError = serde_json::from_slice(&body).expect("the JSON error body");
        assert_eq!(e.code, "RangeNotSatisfiable");

        let resp = call("/range", "POST").await.expect("answer");
        assert_eq!(resp.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert!(resp.headers().contains_key(header::ALLOW));
        let body = axum::body::to_bytes(resp.into_body(), 4096)
            .await
            .expect("body");
        let e: ApiError = serde_json::from_slice(&body).expect("the JSON error body");
        assert_eq!(e.code, "MethodNotAllowed");
        assert!(e.message.contains("Allow"), "{}", e.message);

        // A handler's own error passes unchanged.
        let resp = call("/json", "GET").await.expect("answer");
        let body = axum::body::to_bytes(resp.into_body(), 4096)
            .await
            .expect("body");
        let e: ApiError = serde_json::from_slice(&body).expect("JSON");
        assert_eq!((e.code.as_str(), e.message.as_str()), ("Nope", "no"));
    }
}
