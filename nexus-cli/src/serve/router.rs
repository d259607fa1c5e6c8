//! The routes: `/health`, `/metrics`, `/v1/models` (and `/v1/models/{id}`), `/v1/completions`
//! and `/v1/chat/completions`, behind the API key when one is set; every other path is a JSON
//! 404, every other method a JSON 405. Each request is stamped with its arrival, the origin of
//! its latency metrics; request bodies are read with a size limit (413) and a time limit (408).

use std::sync::Arc;
use std::time::Instant;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{FromRequest, Path, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Extension, Json};
use serde_json::{Value, json};
use tokio_stream::StreamExt;

use crate::serve::AppState;
use crate::serve::metrics::Health;
use crate::serve::openai::{self, ChatRequest, CompletionRequest};
use crate::serve::response::{ApiError, Kind, bad_request, error, respond};

/// The largest request body: room for a prompt of a million token ids.
pub const MAX_BODY_BYTES: usize = 8 << 20;

/// When the request's head arrived: where its time to first token and its latency start.
#[derive(Clone, Copy)]
struct Arrival(Instant);

pub fn router(state: Arc<AppState>) -> Router {
    let api = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/models/{*id}", get(model))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat_completions))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_api_key));
    Router::new()
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .merge(api)
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn(stamp_arrival))
        .with_state(state)
}

async fn stamp_arrival(mut request: Request, next: Next) -> Response {
    request.extensions_mut().insert(Arrival(Instant::now()));
    next.run(request).await
}

async fn require_api_key(State(state): State<Arc<AppState>>, request: Request, next: Next) -> Response {
    if let Some(key) = &state.config.api_key {
        let given = request
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        if given != Some(key.as_str()) {
            return error(StatusCode::UNAUTHORIZED, "authentication_error", "missing or wrong API key").into_response();
        }
    }
    next.run(request).await
}

async fn not_found(request: Request) -> ApiError {
    error(StatusCode::NOT_FOUND, "invalid_request_error", format!("no route for {}", request.uri().path()))
}

async fn method_not_allowed(request: Request) -> ApiError {
    let message = format!("{} is not allowed on {}", request.method(), request.uri().path());
    error(StatusCode::METHOD_NOT_ALLOWED, "invalid_request_error", message)
}

/// 200 `ok` while the engine runs and no request failed lately, 200 `degraded` with the latest
/// failure after one, 503 once the engine thread has ended.
async fn health(State(state): State<Arc<AppState>>) -> Response {
    match state.metrics.health() {
        Health::Ok { failures } => Json(json!({ "status": "ok", "failed_requests": failures })).into_response(),
        Health::Degraded { failures, last_error, ago } => Json(json!({
            "status": "degraded",
            "failed_requests": failures,
            "last_error": { "message": last_error, "seconds_ago": ago.as_secs_f64() }
        }))
        .into_response(),
        Health::Down => {
            let body = json!({
                "status": "down",
                "error": { "message": "the engine has stopped", "type": "server_error", "param": null, "code": null }
            });
            (StatusCode::SERVICE_UNAVAILABLE, Json(body)).into_response()
        }
    }
}

async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render()).into_response()
}

/// The model's entry, with `max_model_len` as vLLM gives it: the most tokens (prompt and output)
/// of one request.
fn model_card(state: &AppState) -> Value {
    json!({
        "id": state.config.model_name,
        "object": "model",
        "created": 0,
        "owned_by": "nexus",
        "max_model_len": state.config.max_context
    })
}

async fn models(State(state): State<Arc<AppState>>) -> Json<Value> {
    Json(json!({ "object": "list", "data": [model_card(&state)] }))
}

async fn model(State(state): State<Arc<AppState>>, Path(id): Path<String>) -> Result<Json<Value>, ApiError> {
    if id == state.config.model_name {
        Ok(Json(model_card(&state)))
    } else {
        let message = format!("the model `{id}` does not exist; this server has `{}`", state.config.model_name);
        Err(error(StatusCode::NOT_FOUND, "invalid_request_error", message))
    }
}

/// A request body, read whole within the body timeout and [`MAX_BODY_BYTES`].
struct Body(Bytes);

impl FromRequest<Arc<AppState>> for Body {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &Arc<AppState>) -> Result<Self, ApiError> {
        let too_large = || {
            let message = format!("the request body is over {MAX_BODY_BYTES} bytes");
            error(StatusCode::PAYLOAD_TOO_LARGE, "invalid_request_error", message)
        };
        // A declared length over the limit is refused before any of the body is read.
        let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
        if declared.is_some_and(|len| len > MAX_BODY_BYTES as u64) {
            return Err(too_large());
        }
        let timeout = state.config.limits.body_timeout;
        let read = async {
            let mut body = Vec::new();
            let mut chunks = request.into_body().into_data_stream();
            while let Some(chunk) = chunks.next().await {
                let chunk = chunk.map_err(|e| bad_request(format!("cannot read the request body: {e}")))?;
                if body.len() + chunk.len() > MAX_BODY_BYTES {
                    return Err(too_large());
                }
                body.extend_from_slice(&chunk);
            }
            Ok(Body(body.into()))
        };
        tokio::time::timeout(timeout, read).await.unwrap_or_else(|_| {
            let message = format!("the request body did not arrive within {} s", timeout.as_secs_f64());
            Err(error(StatusCode::REQUEST_TIMEOUT, "invalid_request_error", message))
        })
    }
}

async fn completions(
    State(state): State<Arc<AppState>>,
    Extension(arrival): Extension<Arrival>,
    body: Body,
) -> Response {
    let prepared = openai::parse::<CompletionRequest>(&body.0).and_then(|request| openai::completion(&state, &request));
    match prepared {
        Ok(prepared) => respond(state, prepared, Kind::Completion, arrival.0).await,
        Err(e) => e.into_response(),
    }
}

async fn chat_completions(
    State(state): State<Arc<AppState>>,
    Extension(arrival): Extension<Arrival>,
    body: Body,
) -> Response {
    let prepared = openai::parse::<ChatRequest>(&body.0).and_then(|request| openai::chat(&state, &request));
    match prepared {
        Ok(prepared) => respond(state, prepared, Kind::Chat, arrival.0).await,
        Err(e) => e.into_response(),
    }
}
