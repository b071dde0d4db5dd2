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
use crate::api::{ApiError, Shared, bad_request, json_body};

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
    let req: AccountRequest = json_body(bytes)?;
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
    /// Its generation: 0 until the account revokes a device, then one more
    /// per revocation.
    pub key_generation: u32,
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
            encryption_key: crate::hex::hex(&r.body.encryption_key.0),
            key_generation: r.body.key_generation,
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

// ------------------------------------------------------------ /v1/chats

use std::time::Duration;

use libp2p::Multiaddr;
use tern_protocol::{Ticket, cloud::account::StoragePeer};

use super::{ChatInfo, CloudError, MessageView, ReplicaView, SendReceipt, service::NewChat};
use crate::events::Event;

/// How long `send` waits for the write quorum by default.
const SEND_WAIT_MS: u64 = 5_000;
/// How long `new` waits to learn a ticket's account record.
const RECORD_WAIT: Duration = Duration::from_secs(10);
/// How long `replicas` waits for the storage peers' answers.
const PROBE_WAIT: Duration = Duration::from_secs(5);

pub fn chat_routes() -> Router<Shared> {
    Router::new()
        .route("/v1/chats", get(list_chats).post(new_chat))
        .route("/v1/chats/{id}/messages", get(history).post(send))
        .route("/v1/chats/{id}/messages/{msg}", get(message_status))
        .route("/v1/chats/{id}/messages/{msg}/edit", post(edit))
        .route("/v1/chats/{id}/delete", post(delete))
        .route("/v1/chats/{id}/clear", post(clear))
        .route("/v1/chats/{id}/read", post(read))
        .route("/v1/chats/{id}/replicas", get(replicas))
        .route("/v1/chats/{id}/storage", post(storage))
}

impl From<CloudError> for ApiError {
    fn from(e: CloudError) -> Self {
        let status = match &e {
            CloudError::NoSuchChat(_) | CloudError::NoSuchMessage(_) => StatusCode::NOT_FOUND,
            CloudError::Ambiguous(_) | CloudError::BadInput(_) => StatusCode::BAD_REQUEST,
            CloudError::Refused(_) => StatusCode::CONFLICT,
            CloudError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
            CloudError::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        ApiError::new(status, e.to_string())
    }
}

#[derive(Serialize, Deserialize, Default)]
pub struct NewChatRequest {
    /// Account ids or tickets of the other members.
    pub with: Vec<String>,
    #[serde(default)]
    pub title: Option<String>,
    /// Peer ids, or multiaddrs ending in `/p2p/PEER`.
    #[serde(default)]
    pub storage: Option<Vec<String>>,
    #[serde(default)]
    pub quorum: Option<u8>,
}

/// A storage peer from a peer id or a multiaddr ending in `/p2p/PEER`.
pub fn parse_storage_peer(s: &str) -> Result<StoragePeer, ApiError> {
    super::service::parse_storage_peer(s).map_err(bad_request)
}

async fn list_chats(State(s): State<Shared>) -> Result<Json<Vec<ChatInfo>>, ApiError> {
    Ok(Json(s.cloud.list().await?))
}

/// Finds each member's signed account record: known already, or learned by
/// dialling the ticket's device.
async fn record_of(
    s: &Shared,
    given: &str,
) -> Result<tern_protocol::cloud::account::AccountRecord, ApiError> {
    let given = given.trim();
    let (account, dial) = if let Ok(account) = given.parse::<AccountId>() {
        (account, None)
    } else {
        let t: Ticket = given.parse().map_err(|e| {
            bad_request(format!(
                "{given:?} is neither an account id nor a ticket: {e}"
            ))
        })?;
        (t.account, Some(t))
    };
    if let Some(record) = s.net.account(account).await.map_err(stopped)? {
        return Ok(record);
    }
    if let Some(t) = dial {
        let peer = crate::keys::peer_id_of(&t.device)
            .ok_or_else(|| bad_request("the device key in the ticket is invalid"))?;
        let addrs = t
            .addrs
            .iter()
            .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
            .collect();
        s.net.dial(Some(peer), addrs).await.map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                format!("cannot reach the ticket's device: {e}"),
            )
        })?;
        let deadline = tokio::time::Instant::now() + RECORD_WAIT;
        while tokio::time::Instant::now() < deadline {
            if let Some(record) = s.net.account(account).await.map_err(stopped)? {
                return Ok(record);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    Err(ApiError::new(
        StatusCode::CONFLICT,
        format!(
            "account {} has not been met yet: connect to one of its devices first (`tern connect TICKET`) or give its ticket",
            account.short()
        ),
    ))
}

fn stopped(_: crate::net::NetError) -> ApiError {
    ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the node is shutting down")
}

async fn new_chat(State(s): State<Shared>, bytes: Bytes) -> Result<Json<ChatInfo>, ApiError> {
    let req: NewChatRequest = json_body(&bytes)?;
    if req.with.is_empty() {
        return Err(bad_request("name at least one other member (--with)"));
    }
    if req.with.len() > tern_protocol::cloud::entry::MAX_MEMBERS {
        return Err(bad_request("too many members"));
    }
    let mut with = Vec::with_capacity(req.with.len() + 1);
    with.push(
        s.net
            .account(s.account_id)
            .await
            .map_err(stopped)?
            .ok_or_else(|| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "no own record"))?,
    );
    for w in &req.with {
        with.push(record_of(&s, w).await?);
    }
    let storage = req
        .storage
        .map(|peers| peers.iter().map(|p| parse_storage_peer(p)).collect())
        .transpose()?;
    Ok(Json(
        s.cloud
            .new_chat(NewChat {
                with,
                title: req.title,
                storage,
                quorum: req.quorum,
            })
            .await?,
    ))
}

#[derive(Deserialize)]
pub struct HistoryQuery {
    pub limit: Option<usize>,
}

async fn history(
    State(s): State<Shared>,
    Path(id): Path<String>,
    axum::extract::Query(q): axum::extract::Query<HistoryQuery>,
) -> Result<Json<Vec<MessageView>>, ApiError> {
    Ok(Json(s.cloud.history(id, q.limit).await?))
}

#[derive(Serialize, Deserialize, Default)]
pub struct SendRequest {
    pub text: String,
    #[serde(default)]
    pub reply_to: Option<String>,
    /// Milliseconds to wait for the write quorum (default 5000; 0 answers
    /// at once with `sending`).
    #[serde(default)]
    pub wait_ms: Option<u64>,
}

/// Waits (a little) for an entry to reach its write quorum, so the answer
/// usually already says `stored`.
async fn wait_stored(
    s: &Shared,
    mut events: tokio::sync::broadcast::Receiver<crate::events::Stamped>,
    receipt: SendReceipt,
    wait_ms: u64,
) -> Result<SendReceipt, ApiError> {
    if receipt.status != "sending" || wait_ms == 0 {
        return Ok(receipt);
    }
    let id = receipt.message_id.clone();
    let _ = tokio::time::timeout(Duration::from_millis(wait_ms), async {
        loop {
            match events.recv().await {
                Ok(e) => {
                    if let Event::ChatStatus { message_id, .. } = e.event
                        && message_id == id
                    {
                        break;
                    }
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => {
                    // Missed events: ask instead.
                    if let Ok(r) = s
                        .cloud
                        .status(receipt.chat_id.clone(), id.clone(), false)
                        .await
                        && r.status != "sending"
                    {
                        break;
                    }
                }
                Err(_) => break,
            }
        }
    })
    .await;
    Ok(s.cloud.status(receipt.chat_id, id, false).await?)
}

async fn send(
    State(s): State<Shared>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<SendReceipt>, ApiError> {
    let req: SendRequest = json_body(&bytes)?;
    let events = s.bus.subscribe();
    let receipt = s.cloud.send(id, req.text, req.reply_to).await?;
    let wait = req.wait_ms.unwrap_or(SEND_WAIT_MS).min(60_000);
    Ok(Json(wait_stored(&s, events, receipt, wait).await?))
}

async fn message_status(
    State(s): State<Shared>,
    Path((id, msg)): Path<(String, String)>,
) -> Result<Json<SendReceipt>, ApiError> {
    Ok(Json(s.cloud.status(id, msg, true).await?))
}

#[derive(Serialize, Deserialize)]
pub struct EditRequest {
    pub text: String,
}

async fn edit(
    State(s): State<Shared>,
    Path((id, msg)): Path<(String, String)>,
    bytes: Bytes,
) -> Result<Json<SendReceipt>, ApiError> {
    let req: EditRequest = json_body(&bytes)?;
    let events = s.bus.subscribe();
    let receipt = s.cloud.edit(id, msg, req.text).await?;
    Ok(Json(wait_stored(&s, events, receipt, SEND_WAIT_MS).await?))
}

#[derive(Serialize, Deserialize)]
pub struct DeleteRequest {
    pub messages: Vec<String>,
    #[serde(default)]
    pub for_everyone: bool,
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
    let req: DeleteRequest = json_body(&bytes)?;
    if req.messages.is_empty() {
        return Err(bad_request("name at least one message"));
    }
    let count = s.cloud.delete(id, req.messages, req.for_everyone).await?;
    Ok(Json(CountResponse { count }))
}

#[derive(Serialize, Deserialize, Default)]
pub struct ClearRequest {
    #[serde(default)]
    pub for_everyone: bool,
}

async fn clear(
    State(s): State<Shared>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<CountResponse>, ApiError> {
    let req: ClearRequest = if bytes.is_empty() {
        ClearRequest::default()
    } else {
        json_body(&bytes)?
    };
    let count = s.cloud.clear(id, req.for_everyone).await?;
    Ok(Json(CountResponse { count }))
}

async fn read(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Option<SendReceipt>>, ApiError> {
    let events = s.bus.subscribe();
    Ok(Json(match s.cloud.read(id).await? {
        Some(r) => Some(wait_stored(&s, events, r, SEND_WAIT_MS).await?),
        None => None,
    }))
}

/// Asks every storage peer for its summary, then reports them once all
/// answered (or after a few seconds).
async fn replicas(
    State(s): State<Shared>,
    Path(id): Path<String>,
) -> Result<Json<Vec<ReplicaView>>, ApiError> {
    let chat = s.cloud.probe(id).await?;
    let asked = std::time::Instant::now();
    let deadline = tokio::time::Instant::now() + PROBE_WAIT;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let views = s.cloud.replicas(chat.clone()).await?;
        let answered = views.iter().all(|v| {
            v.this_node
                || v.last_seen_ms
                    .is_some_and(|ms| u128::from(ms) < asked.elapsed().as_millis())
                || (!v.reachable && v.error.is_some())
        });
        if answered || tokio::time::Instant::now() >= deadline {
            return Ok(Json(views));
        }
    }
}

#[derive(Serialize, Deserialize)]
pub struct StorageRequest {
    pub peers: Vec<String>,
    #[serde(default)]
    pub quorum: Option<u8>,
}

async fn storage(
    State(s): State<Shared>,
    Path(id): Path<String>,
    bytes: Bytes,
) -> Result<Json<ChatInfo>, ApiError> {
    let req: StorageRequest = json_body(&bytes)?;
    let peers = req
        .peers
        .iter()
        .map(|p| parse_storage_peer(p))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(s.cloud.set_storage(id, peers, req.quorum).await?))
}
