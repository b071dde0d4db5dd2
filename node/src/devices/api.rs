//! `/v1/devices` routes: link codes and the account's devices (docs/api.md).

use axum::{
    Json, Router,
    body::Bytes,
    extract::State,
    http::StatusCode,
    routing::{get, post},
};
use serde::{Deserialize, Serialize};

use super::{DeviceView, RevokeError};
use crate::{
    api::{ApiError, Shared},
    events::now_ms,
    keys::device_of_peer,
};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/devices", get(list))
        .route("/v1/devices/link", post(link))
        .route("/v1/devices/revoke", post(revoke))
}

#[derive(Serialize, Deserialize)]
pub struct LinkCodeResponse {
    /// One line: `tern-link:…`, for `tern init --link` on the new device.
    pub code: String,
    pub expires_at_ms: u64,
    pub expires_in_secs: u64,
}

#[derive(Serialize, Deserialize)]
pub struct RevokeRequest {
    /// A device's peer id, or a prefix that names one device.
    pub device: String,
}

impl From<RevokeError> for ApiError {
    fn from(e: RevokeError) -> Self {
        let status = match e {
            RevokeError::NotFound(_) => StatusCode::NOT_FOUND,
            RevokeError::Ambiguous { .. } => StatusCode::BAD_REQUEST,
            RevokeError::ThisDevice(_) => StatusCode::CONFLICT,
            RevokeError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError::new(status, e.to_string())
    }
}

async fn list(State(s): State<Shared>) -> Result<Json<Vec<DeviceView>>, ApiError> {
    Ok(Json(s.net.account_devices().await?))
}

async fn link(State(s): State<Shared>) -> Result<Json<LinkCodeResponse>, ApiError> {
    let issued = s
        .net
        .link_code()
        .await?
        .map_err(|e| ApiError::new(StatusCode::CONFLICT, e))?;
    Ok(Json(LinkCodeResponse {
        code: issued.code,
        expires_at_ms: issued.expires_at_ms,
        expires_in_secs: issued.expires_at_ms.saturating_sub(now_ms()) / 1000,
    }))
}

/// What revoking answers: the device, and how many cloud chats got a new
/// key.
#[derive(serde::Serialize, serde::Deserialize)]
pub struct RevokeResponse {
    #[serde(flatten)]
    pub device: DeviceView,
    pub chats_rekeyed: usize,
}

async fn revoke(State(s): State<Shared>, body: Bytes) -> Result<Json<RevokeResponse>, ApiError> {
    let req: RevokeRequest = crate::api::json_body(&body)?;
    let device = s.net.revoke_device(req.device).await??;
    // A new account key for the devices that stay, and a new chat key
    // wrapped to it in every chat of the account: the revoked device reads
    // nothing that follows.
    let of = |d: &DeviceView| d.device.parse().ok().and_then(|p| device_of_peer(&p));
    let revoked = of(&device).into_iter().collect();
    let keep = s
        .net
        .account_devices()
        .await?
        .iter()
        .filter(|d| !d.revoked && !d.this_device)
        .filter_map(of)
        .collect();
    let chats_rekeyed = s.cloud.revoke_keys(keep, revoked).await?;
    Ok(Json(RevokeResponse {
        device,
        chats_rekeyed,
    }))
}
