//! The control API: HTTP + JSON and a WebSocket event stream, on loopback
//! only, every route behind the bearer token kept in the data directory.
//! Described in `docs/api.md`.

use std::{sync::Arc, time::Instant};

use axum::{
    Json, Router,
    body::Bytes,
    extract::{
        DefaultBodyLimit, Request, State,
        ws::{Message, WebSocket, WebSocketUpgrade},
    },
    http::{StatusCode, header},
    middleware::{self, Next},
    response::{IntoResponse, Response},
    routing::{get, post},
};
use libp2p::{Multiaddr, PeerId};
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tern_protocol::{AccountId, DevicePublicKey, Ticket};
use tokio::sync::broadcast::error::RecvError;

use crate::{
    events::{Event, EventBus, Stamped, now_ms},
    keys::peer_id_of,
    metrics::{ApiLabels, NodeMetrics},
    net::{NetError, NetworkHandle},
    secret::SecretHandle,
};

/// Largest request body accepted.
const MAX_BODY: usize = 64 * 1024;
/// How long `connect` waits for the connection before giving up.
const DIAL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

pub struct ApiState {
    pub net: NetworkHandle,
    pub secret: SecretHandle,
    pub cloud: crate::cloud::service::CloudHandle,
    pub hosting: crate::cloud::hosting::Hosting,
    pub bus: EventBus,
    pub token: String,
    pub registry: Registry,
    pub metrics: NodeMetrics,
    pub peer_id: PeerId,
    pub account_id: AccountId,
    pub device: DevicePublicKey,
    pub name: String,
    pub started: Instant,
    /// Flips to true when the node stops; ends open event streams.
    pub shutdown: tokio::sync::watch::Receiver<bool>,
}

pub(crate) type Shared = Arc<ApiState>;

pub fn router(state: Shared) -> Router {
    Router::new()
        .route("/v1/status", get(status))
        .route("/v1/peers", get(peers))
        .route("/v1/ticket", get(ticket))
        .route("/v1/connect", post(connect))
        .route("/v1/events", get(events))
        .merge(crate::devices::api::routes())
        .route("/metrics", get(metrics))
        .merge(crate::secret::api::routes())
        .merge(crate::cloud::api::routes())
        .merge(crate::cloud::api::chat_routes())
        .fallback(not_found)
        .layer(DefaultBodyLimit::max(MAX_BODY))
        // Outermost: authenticate before anything else looks at the request.
        .layer(middleware::from_fn_with_state(state.clone(), authenticate))
        .with_state(state)
}

/// An error for API clients: a status and one line saying what was wrong.
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl ApiError {
    pub fn new(status: StatusCode, msg: impl Into<String>) -> Self {
        Self(status, msg.into())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        #[derive(Serialize)]
        struct Body {
            error: String,
        }
        (
            self.0,
            Json(Body {
                error: one_line(&self.1),
            }),
        )
            .into_response()
    }
}

impl From<NetError> for ApiError {
    fn from(e: NetError) -> Self {
        match e {
            NetError::Stopped => ApiError(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
            NetError::Dial(_) => ApiError(StatusCode::BAD_GATEWAY, e.to_string()),
        }
    }
}

/// Collapses a (possibly multi-line, nested) error message into one line.
pub fn one_line(msg: &str) -> String {
    msg.split_whitespace().collect::<Vec<_>>().join(" ")
}

pub fn bad_request(msg: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, msg.into())
}

async fn authenticate(State(state): State<Shared>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .unwrap_or("");
    let authorised =
        !presented.is_empty() && constant_time_eq(presented.as_bytes(), state.token.as_bytes());
    let response = if authorised {
        next.run(req).await
    } else {
        ApiError(
            StatusCode::UNAUTHORIZED,
            "missing or wrong bearer token (it is in the data directory, file api.token)".into(),
        )
        .into_response()
    };
    state
        .metrics
        .api_requests
        .get_or_create(&ApiLabels {
            status: response.status().as_u16(),
        })
        .inc();
    response
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[derive(Serialize, Deserialize)]
pub struct StatusResponse {
    pub peer_id: String,
    pub account_id: String,
    pub name: String,
    pub listen_addrs: Vec<String>,
    pub external_addrs: Vec<String>,
    pub connected_peers: usize,
    pub known_peers: usize,
    pub pid: u32,
    pub version: String,
    pub uptime_secs: u64,
}

async fn status(State(s): State<Shared>) -> Result<Json<StatusResponse>, ApiError> {
    let net = s.net.status().await?;
    Ok(Json(StatusResponse {
        peer_id: s.peer_id.to_string(),
        account_id: s.account_id.to_string(),
        name: s.name.clone(),
        listen_addrs: net.listen_addrs,
        external_addrs: net.external_addrs,
        connected_peers: net.connected_peers,
        known_peers: net.known_peers,
        pid: std::process::id(),
        version: env!("CARGO_PKG_VERSION").into(),
        uptime_secs: s.started.elapsed().as_secs(),
    }))
}

async fn peers(State(s): State<Shared>) -> Result<impl IntoResponse, ApiError> {
    Ok(Json(s.net.peers().await?))
}

#[derive(Serialize, Deserialize)]
pub struct TicketResponse {
    pub ticket: String,
}

async fn ticket(State(s): State<Shared>) -> Result<Json<TicketResponse>, ApiError> {
    let net = s.net.status().await?;
    // Confirmed external addresses first: they are what a remote peer can use.
    let addrs = net
        .external_addrs
        .iter()
        .chain(&net.listen_addrs)
        .filter_map(|a| a.parse::<Multiaddr>().ok())
        .map(|a| a.to_vec())
        .collect();
    let t = Ticket::new(s.account_id, s.device, addrs);
    Ok(Json(TicketResponse {
        ticket: t.to_string(),
    }))
}

#[derive(Serialize, Deserialize)]
pub struct ConnectRequest {
    /// A ticket, or a multiaddr (with or without `/p2p/PEER`).
    pub target: String,
}

#[derive(Serialize, Deserialize)]
pub struct ConnectResponse {
    pub peer_id: String,
}

/// A JSON request body, or a 400 that says what is wrong with it.
pub fn json_body<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| bad_request(format!("invalid request body: {e}")))
}

async fn connect(State(s): State<Shared>, body: Bytes) -> Result<Json<ConnectResponse>, ApiError> {
    let req: ConnectRequest = json_body(&body)?;
    let (peer, addrs) = parse_target(&req.target)?;
    let dialed = tokio::time::timeout(DIAL_TIMEOUT, s.net.dial(peer, addrs))
        .await
        .map_err(|_| {
            ApiError(
                StatusCode::GATEWAY_TIMEOUT,
                "no answer from that peer within 30 s".into(),
            )
        })??;
    Ok(Json(ConnectResponse {
        peer_id: dialed.to_string(),
    }))
}

/// Parses what `tern connect` accepts: a ticket or a multiaddr.
pub fn parse_target(target: &str) -> Result<(Option<PeerId>, Vec<Multiaddr>), ApiError> {
    let target = target.trim();
    if target.starts_with('/') {
        let addr: Multiaddr = target
            .parse()
            .map_err(|e| bad_request(format!("not a valid multiaddr: {e}")))?;
        let peer = match addr.iter().last() {
            Some(libp2p::multiaddr::Protocol::P2p(p)) => Some(p),
            _ => None,
        };
        return Ok((peer, vec![addr]));
    }
    let ticket: Ticket = target
        .parse()
        .map_err(|e| bad_request(format!("not a ticket or multiaddr: {e}")))?;
    let peer = peer_id_of(&ticket.device)
        .ok_or_else(|| bad_request("ticket names an invalid device key"))?;
    let addrs: Vec<Multiaddr> = ticket
        .addrs
        .into_iter()
        .filter_map(|a| Multiaddr::try_from(a).ok())
        .collect();
    if addrs.is_empty() {
        return Err(bad_request("ticket has no usable address"));
    }
    Ok((Some(peer), addrs))
}

async fn events(State(s): State<Shared>, ws: WebSocketUpgrade) -> Response {
    let rx = s.bus.subscribe();
    let stop = s.shutdown.clone();
    let cloud = s.cloud.clone();
    ws.max_message_size(MAX_BODY)
        .on_upgrade(move |socket| stream_events(socket, rx, stop, cloud))
}

/// Commands a client may send on the event socket: the cheap way to send
/// many messages (no HTTP request each; answers share writes).
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum SocketCommand {
    Send {
        chat_id: String,
        text: String,
        #[serde(default)]
        reply_to: Option<String>,
        /// Echoed in the answer, to match it to this command.
        #[serde(rename = "ref", default)]
        reference: Option<String>,
    },
}

/// The answer to one [`SocketCommand`], on the same socket as the events.
#[derive(Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum SocketAnswer {
    /// The message is kept by this device and on its way to the storage
    /// peers; `chat_status` events follow as it is stored.
    Sent {
        #[serde(rename = "ref")]
        reference: Option<String>,
        #[serde(flatten)]
        receipt: crate::cloud::SendReceipt,
    },
    /// Not sent, and why.
    Refused {
        #[serde(rename = "ref")]
        reference: Option<String>,
        error: String,
    },
}

/// Commands of one socket being carried out at once, at most; beyond
/// that the socket is not read until one finishes.
const SOCKET_COMMANDS_IN_FLIGHT: usize = 256;
/// Events or answers written together before one flush, at most.
const SOCKET_WRITE_BATCH: usize = 256;

async fn run_command(
    cloud: crate::cloud::service::CloudHandle,
    command: SocketCommand,
) -> SocketAnswer {
    match command {
        SocketCommand::Send {
            chat_id,
            text,
            reply_to,
            reference,
        } => match cloud.send(chat_id, text, reply_to).await {
            Ok(receipt) => SocketAnswer::Sent { reference, receipt },
            Err(e) => SocketAnswer::Refused {
                reference,
                error: one_line(&e.to_string()),
            },
        },
    }
}

async fn stream_events(
    mut socket: WebSocket,
    mut rx: tokio::sync::broadcast::Receiver<Stamped>,
    mut stop: tokio::sync::watch::Receiver<bool>,
    cloud: crate::cloud::service::CloudHandle,
) {
    use futures::{FutureExt, SinkExt, StreamExt, stream::FuturesUnordered};

    fn text(value: &impl Serialize) -> Option<Message> {
        serde_json::to_string(value)
            .ok()
            .map(|t| Message::Text(t.into()))
    }
    fn stamped(ev: Result<Stamped, RecvError>) -> Option<Stamped> {
        match ev {
            Ok(ev) => Some(ev),
            Err(RecvError::Lagged(missed)) => Some(Stamped {
                at_ms: now_ms(),
                event: Event::Lagged { missed },
            }),
            Err(RecvError::Closed) => None,
        }
    }

    let hello = Stamped {
        at_ms: now_ms(),
        event: Event::Subscribed,
    };
    let Some(hello) = text(&hello) else {
        return;
    };
    if socket.send(hello).await.is_err() {
        return;
    }
    let mut running = FuturesUnordered::new();
    loop {
        let mut out: Vec<Message> = Vec::new();
        tokio::select! {
            _ = stop.changed() => break,
            incoming = socket.recv(), if running.len() < SOCKET_COMMANDS_IN_FLIGHT => match incoming {
                Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                Some(Ok(Message::Text(t))) => match serde_json::from_str::<SocketCommand>(&t) {
                    Ok(command) => running.push(run_command(cloud.clone(), command)),
                    Err(e) => out.extend(text(&SocketAnswer::Refused {
                        reference: None,
                        error: format!("not a command: {e}"),
                    })),
                },
                Some(Ok(_)) => {}
            },
            Some(answer) = running.next(), if !running.is_empty() => out.extend(text(&answer)),
            ev = rx.recv() => match stamped(ev) {
                Some(ev) => out.extend(text(&ev)),
                None => break,
            },
        }
        // Whatever else is ready goes out in the same write.
        while out.len() < SOCKET_WRITE_BATCH {
            match rx.try_recv() {
                Ok(ev) => out.extend(text(&ev)),
                Err(tokio::sync::broadcast::error::TryRecvError::Lagged(missed)) => {
                    out.extend(text(&Stamped {
                        at_ms: now_ms(),
                        event: Event::Lagged { missed },
                    }))
                }
                Err(_) => break,
            }
        }
        while out.len() < SOCKET_WRITE_BATCH {
            match running.next().now_or_never() {
                Some(Some(answer)) => out.extend(text(&answer)),
                _ => break,
            }
        }
        let mut failed = false;
        for message in out {
            if socket.feed(message).await.is_err() {
                failed = true;
                break;
            }
        }
        if failed || socket.flush().await.is_err() {
            break;
        }
    }
}

async fn metrics(State(s): State<Shared>) -> Result<Response, ApiError> {
    let mut out = String::new();
    prometheus_client::encoding::text::encode(&mut out, &s.registry)
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()))?;
    Ok((
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        out,
    )
        .into_response())
}

async fn not_found() -> ApiError {
    ApiError(
        StatusCode::NOT_FOUND,
        "no such endpoint (see docs/api.md)".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_comparison_needs_an_exact_match() {
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"", b"abc"));
    }

    #[test]
    fn connect_targets_parse_or_explain() {
        let p = PeerId::random();
        let (peer, addrs) = parse_target(&format!("/ip4/127.0.0.1/tcp/1/p2p/{p}")).unwrap();
        assert_eq!(peer, Some(p));
        assert_eq!(addrs.len(), 1);
        let (peer, _) = parse_target("/ip4/127.0.0.1/tcp/1").unwrap();
        assert_eq!(peer, None);
        for bad in ["", "hello", "/ip4/999.0.0.1/tcp/1", "ternxyz"] {
            assert!(parse_target(bad).is_err(), "{bad}");
        }
    }
}
