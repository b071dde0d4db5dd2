//! `/v1/host` routes: the hosting policy (docs/api.md).

use axum::{
    Json, Router,
    body::Bytes,
    extract::{Path, State},
    http::StatusCode,
    routing::{get, post},
};
use serde::{Deserialize, Serialize};
use tern_protocol::{AccountId, cloud::account::AccountRecord};

use super::hosting::{HostStatus, HostingError};
use crate::api::{ApiError, Shared};

pub fn routes() -> Router<Shared> {
    Router::new()
        .route("/v1/account", get(own_account))
        .route("/v1/accounts/{id}", get(account_of))
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

/// An account record as the API shows it.
#[derive(Serialize, Deserialize)]
pub struct AccountView {
    pub account_id: String,
    pub seq: u64,
    /// The X25519 key others wrap chat keys to, hex.
    pub encryption_key: String,
    /// Device peer ids and names.
    pub devices: Vec<(String, String)>,
    /// Storage peers' peer ids.
    pub storage_peers: Vec<String>,
}

impl From<&AccountRecord> for AccountView {
    fn from(r: &AccountRecord) -> Self {
        let peer = |d| {
            crate::keys::peer_id_of(d)
                .map(|p| p.to_string())
                .unwrap_or_default()
        };
        Self {
            account_id: r.body.account.to_string(),
            seq: r.body.seq,
            encryption_key: data_encoding::HEXLOWER.encode(&r.body.encryption_key.0),
            devices: r
                .body
                .devices
                .iter()
                .map(|c| (peer(&c.device), c.name.clone()))
                .collect(),
            storage_peers: r.body.storage_peers.iter().map(|p| peer(&p.node)).collect(),
        }
    }
}

async fn own_account(State(s): State<Shared>) -> Result<Json<AccountView>, ApiError> {
    account_view(&s, s.account_id).await
}

async fn account_of(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<AccountView>, ApiError> {
    let account: AccountId = id.trim().parse().map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("{id:?} is not an account id: {e}"),
        )
    })?;
    account_view(&s, account).await
}

async fn account_view(s: &Shared, account: AccountId) -> Result<Json<AccountView>, ApiError> {
    match s.net.account(account).await? {
        Some(r) => Ok(Json(AccountView::from(&r))),
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "no record of account {} yet: it arrives when one of its devices connects (`tern connect TICKET`)",
                account.short()
            ),
        )),
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
