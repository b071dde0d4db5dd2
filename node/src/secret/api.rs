//! The control API's secret-chat routes (`/v1/secret/...`, `/v1/logout`),
//! described in `docs/api.md`.

use std::time::Duration;

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tern_protocol::{AccountId, Ticket};

use super::{HistoryItem, KeyInfo, SecretError, SecretInfo, StartTarget, time::parse_timer};
use crate::{
    api::{ApiError, Shared, json_body},
    events::Event,
};

/// How long `accept` waits for the other device to complete the handshake.
const ACCEPT_WAIT: Duration = Duration::from_secs(10);

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/secret", get(list).post(start))
        .route("/v1/secret/{id}/accept", post(accept))
        .route("/v1/secret/{id}/decline", post(decline))
        .route("/v1/secret/{id}/close", post(close))
        .route("/v1/secret/{id}/key", get(key))
        .route("/v1/secret/{id}/messages", get(history).post(send))
        .route("/v1/secret/{id}/timer", post(timer))
        .route("/v1/secret/{id}/delete", post(delete))
        .route("/v1/secret/{id}/clear", post(clear))
        .route("/v1/secret/{id}/forward", post(forward))
        .route("/v1/logout", post(logout))
}

impl From<SecretError> for ApiError {
    fn from(e: SecretError) -> Self {
        use tern_protocol::secret::ChatError;
        let status = match &e {
            SecretError::NoSuchChat(_) => StatusCode::NOT_FOUND,
            SecretError::Ambiguous(_) | SecretError::BadInput(_) => StatusCode::BAD_REQUEST,
            SecretError::Chat(ChatError::TextTooLong(_) | ChatError::BadTimer) => {
                StatusCode::BAD_REQUEST
            }
            SecretError::Chat(ChatError::UnknownMessage(_)) => StatusCode::NOT_FOUND,
            SecretError::Chat(_) | SecretError::Refused(_) => StatusCode::CONFLICT,
            SecretError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            SecretError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

#[derive(Serialize, Deserialize)]
pub struct StartRequest {
    /// An account id or a ticket.
    pub peer: String,
}

/// Parses what `tern secret start` accepts: an account id or a ticket.
pub fn parse_start_target(s: &str) -> Result<StartTarget, ApiError> {
    let s = s.trim();
    if let Ok(account) = s.parse::<AccountId>() {
        return Ok(StartTarget::Account(account));
    }
    s.parse::<Ticket>().map(StartTarget::Ticket).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{s:?} is neither an account id nor a ticket: {e}"),
        )
    })
}

async fn list(State(s): State<Shared>) -> Result<Json<Vec<SecretInfo>>, ApiError> {
    Ok(Json(s.secret.list().await?))
}

async fn start(State(s): State<Shared>, bytes: Bytes) -> Result<Json<SecretInfo>, ApiError> {
    let req: StartRequest = json_body(&bytes)?;
    let target = parse_start_target(&req.peer)?;
    Ok(Json(s.secret.start(target).await?))
}

/// Accepts, then waits (a little) for the handshake to complete, so the
/// answer usually already says `active`.
async fn accept(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<SecretInfo>, ApiError> {
    let mut events = s.bus.subscribe();
    let info = s.secret.accept(id).await?;
    let full = info.secret_id.clone();
    if info.state == "pending" {
        let _ = tokio::time::timeout(ACCEPT_WAIT, async {
            while let Ok(e) = events.recv().await {
                match e.event {
                    Event::SecretAccepted { secret_id } | Event::SecretCancelled { secret_id }
                        if secret_id == full =>
                    {
                        break;
                    }
                    _ => {}
                }
            }
        })
        .await;
    }
    let now = s.secret.list().await?;
    Ok(Json(
        now.into_iter()
            .find(|c| c.secret_id == full)
            .unwrap_or(info),
    ))
}

async fn decline(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<SecretInfo>, ApiError> {
    Ok(Json(s.secret.decline(id).await?))
}

async fn close(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<SecretInfo>, ApiError> {
    Ok(Json(s.secret.close(id).await?))
}

async fn key(State(s): State<Shared>, Path(id): Path<String>) -> Result<Json<KeyInfo>, ApiError> {
    Ok(Json(s.secret.key(id).await?))
}

#[derive(Serialize, Deserialize)]
pub struct SendRequest {
    pub text: String,
}

#[derive(Serialize, Deserialize)]
pub struct SendResponse {
    pub message_id: String,
}

async fn send(
    State(s): State<Shared>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<SendResponse>, ApiError> {
    let req: SendRequest = json_body(&bytes)?;
    Ok(Json(SendResponse {
        message_id: s.secret.send(id, req.text).await?,
    }))
}

async fn history(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Vec<HistoryItem>>, ApiError> {
    Ok(Json(s.secret.history(id).await?))
}

#[derive(Serialize, Deserialize)]
pub struct TimerRequest {
    /// `off`, or a duration such as `10s`, `5m`, `1d`, `1w`.
    pub timer: String,
}

async fn timer(
    State(s): State<Shared>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<SecretInfo>, ApiError> {
    let req: TimerRequest = json_body(&bytes)?;
    let ms = parse_timer(&req.timer).map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, e))?;
    Ok(Json(s.secret.timer(id, ms).await?))
}

#[derive(Serialize, Deserialize)]
pub struct MessagesRequest {
    pub messages: Vec<String>,
}

#[derive(Serialize, Deserialize)]
pub struct CountResponse {
    pub count: usize,
}

async fn delete(
    State(s): State<Shared>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<CountResponse>, ApiError> {
    let req: MessagesRequest = json_body(&bytes)?;
    Ok(Json(CountResponse {
        count: s.secret.delete(id, req.messages).await?,
    }))
}

async fn clear(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<CountResponse>, ApiError> {
    Ok(Json(CountResponse {
        count: s.secret.clear(id).await?,
    }))
}

#[derive(Serialize, Deserialize)]
pub struct ForwardRequest {
    pub message: String,
    /// Where to: any chat. Refused for every message of a secret chat.
    pub to: String,
}

async fn forward(
    State(s): State<Shared>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<CountResponse>, ApiError> {
    let req: ForwardRequest = json_body(&bytes)?;
    match s.secret.forward(id, req.message).await {
        Ok(()) => Ok(Json(CountResponse { count: 1 })),
        Err(SecretError::Refused(why)) => Err(ApiError::new(StatusCode::FORBIDDEN, why)),
        Err(e) => Err(e.into()),
    }
}

async fn logout(State(s): State<Shared>) -> Result<Json<CountResponse>, ApiError> {
    Ok(Json(CountResponse {
        count: s.secret.logout().await?,
    }))
}
