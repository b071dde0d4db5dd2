//! `/v1/host` routes: the hosting policy (docs/api.md).

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tern_protocol::AccountId;

use super::hosting::{HostStatus, HostingError};
use crate::api::{ApiError, Shared};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/host", get(status))
        .route("/v1/host/allow", post(allow))
        .route("/v1/host/deny", post(deny))
}

#[derive(Serialize, Deserialize)]
pub struct AccountRequest {
    pub account: String,
}

fn account(bytes: &Bytes) -> Result<AccountId, ApiError> {
    let req: AccountRequest = serde_json::from_slice(bytes).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid request body: {e}"),
        )
    })?;
    req.account.trim().parse().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{:?} is not an account id: {e}", req.account),
        )
    })
}

impl From<HostingError> for ApiError {
    fn from(e: HostingError) -> Self {
        let status = match e {
            HostingError::TooMany => StatusCode::CONFLICT,
            HostingError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

async fn status(State(s): State<Shared>) -> Json<HostStatus> {
    Json(s.hosting.status().await)
}

async fn allow(State(s): State<Shared>, bytes: Bytes) -> Result<Json<HostStatus>, ApiError> {
    s.hosting.allow(account(&bytes)?).await?;
    Ok(Json(s.hosting.status().await))
}

async fn deny(State(s): State<Shared>, bytes: Bytes) -> Result<Json<HostStatus>, ApiError> {
    s.hosting.deny(account(&bytes)?).await?;
    Ok(Json(s.hosting.status().await))
}
