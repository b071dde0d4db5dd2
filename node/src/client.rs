//! The client side of the control API, used by the `tern` subcommands (and
//! by the end-to-end tests, which drive nodes exactly as a user would).

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde::{Serialize, de::DeserializeOwned};
use tokio_tungstenite::tungstenite::{self, client::IntoClientRequest};

use crate::{
    data_dir::{DataDir, read_bounded},
    node::{ApiEndpoint, read_token},
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("no node is running for {0} (start one with `tern node --data-dir {0}`)")]
    NotRunning(String),
    #[error(
        "the node for {dir} does not answer at {address}; it may have stopped (start it with `tern node --data-dir {dir}`)"
    )]
    Unreachable { dir: String, address: String },
    #[error("the node refused the API token; {0} does not match the running node")]
    Unauthorized(String),
    #[error("{0}")]
    Api(String),
    #[error("{0}")]
    Other(String),
}

pub struct ApiClient {
    endpoint: ApiEndpoint,
    token: String,
    dir: String,
    http: reqwest::Client,
}

impl ApiClient {
    pub fn new(dir: &DataDir) -> Result<Self, ClientError> {
        let shown = dir.root().display().to_string();
        let bytes = read_bounded(&dir.api_endpoint(), 4096)
            .map_err(|_| ClientError::NotRunning(shown.clone()))?;
        let endpoint: ApiEndpoint =
            serde_json::from_slice(&bytes).map_err(|_| ClientError::NotRunning(shown.clone()))?;
        let token = read_token(dir).map_err(|e| ClientError::Other(format!("{e:#}")))?;
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(60))
            .no_proxy()
            .build()
            .map_err(|e| ClientError::Other(e.to_string()))?;
        Ok(Self {
            endpoint,
            token,
            dir: shown,
            http,
        })
    }

    pub fn endpoint(&self) -> &ApiEndpoint {
        &self.endpoint
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.endpoint.address)
    }

    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        let req = self.http.get(self.url(path)).bearer_auth(&self.token);
        self.send(req).await
    }

    pub async fn post<B: Serialize, T: DeserializeOwned>(
        &self,
        path: &str,
        body: &B,
    ) -> Result<T, ClientError> {
        let req = self
            .http
            .post(self.url(path))
            .bearer_auth(&self.token)
            .json(body);
        self.send(req).await
    }

    async fn send<T: DeserializeOwned>(
        &self,
        req: reqwest::RequestBuilder,
    ) -> Result<T, ClientError> {
        let resp = req.send().await.map_err(|e| {
            if e.is_connect() {
                ClientError::Unreachable {
                    dir: self.dir.clone(),
                    address: self.endpoint.address.to_string(),
                }
            } else {
                ClientError::Other(format!("request to the node failed: {e}"))
            }
        })?;
        let status = resp.status();
        let body = resp
            .bytes()
            .await
            .map_err(|e| ClientError::Other(format!("reading the node's answer failed: {e}")))?;
        if status == reqwest::StatusCode::UNAUTHORIZED {
            return Err(ClientError::Unauthorized(format!("{}/api.token", self.dir)));
        }
        if !status.is_success() {
            let msg = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(str::to_owned))
                .unwrap_or_else(|| format!("the node answered {status}"));
            return Err(ClientError::Api(msg));
        }
        serde_json::from_slice(&body)
            .map_err(|e| ClientError::Other(format!("unexpected answer from the node: {e}")))
    }

    /// Opens the event stream; yields one JSON object per event.
    pub async fn events(
        &self,
    ) -> Result<impl futures::Stream<Item = Result<serde_json::Value, ClientError>>, ClientError>
    {
        Ok(self.socket().await?.1)
    }

    /// Opens the event socket both ways: a sink for commands (JSON objects
    /// such as `{"type": "send", ...}`, see docs/api.md) and the stream of
    /// events and answers.
    pub async fn socket(
        &self,
    ) -> Result<
        (
            impl futures::Sink<serde_json::Value, Error = ClientError>,
            impl futures::Stream<Item = Result<serde_json::Value, ClientError>>,
        ),
        ClientError,
    > {
        let mut req = format!("ws://{}/v1/events", self.endpoint.address)
            .into_client_request()
            .map_err(|e| ClientError::Other(e.to_string()))?;
        let auth = format!("Bearer {}", self.token)
            .parse()
            .map_err(|_| ClientError::Other("API token is not a valid header value".into()))?;
        req.headers_mut().insert("authorization", auth);
        let (ws, _) = tokio_tungstenite::connect_async(req)
            .await
            .map_err(|e| match e {
                tungstenite::Error::Http(r) if r.status() == 401 => {
                    ClientError::Unauthorized(format!("{}/api.token", self.dir))
                }
                tungstenite::Error::Io(_) => ClientError::Unreachable {
                    dir: self.dir.clone(),
                    address: self.endpoint.address.to_string(),
                },
                other => ClientError::Other(format!("cannot open the event stream: {other}")),
            })?;
        let (sink, stream) = ws.split();
        let sink = sink
            .sink_map_err(|e| ClientError::Other(format!("event socket closed: {e}")))
            .with(|command: serde_json::Value| {
                futures::future::ready(Ok::<_, ClientError>(tungstenite::Message::Text(
                    command.to_string().into(),
                )))
            });
        let stream = stream.filter_map(|msg| async move {
            match msg {
                Ok(tungstenite::Message::Text(t)) => Some(
                    serde_json::from_str(t.as_str())
                        .map_err(|e| ClientError::Other(format!("bad event: {e}"))),
                ),
                Ok(_) => None,
                Err(e) => Some(Err(ClientError::Other(format!("event stream ended: {e}")))),
            }
        });
        Ok((sink, stream))
    }
}
