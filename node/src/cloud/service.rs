//! The storage-peer service: answers `/tern/store/1` requests from the
//! [`Replicas`] this node keeps, on a thread of its own (its syncs never
//! hold up the network), in batches: every request already waiting joins
//! the batch, one commit covers all of them, and only then are they
//! answered.

use libp2p::{PeerId, request_response::ResponseChannel};
use tokio::sync::{mpsc, oneshot, watch};
use tracing::{debug, warn};

use super::{
    hosting::Hosting,
    replica::{Outcome, Replicas},
    wire::{PushResult, StoreRequest, StoreResponse},
};
use crate::net::NetworkHandle;

/// Requests from peers waiting for the service.
pub const INBOUND_QUEUE: usize = 256;
/// Most requests answered by one commit.
const MAX_BATCH: usize = 256;

/// A `/tern/store/1` request from a peer, handed over by the event loop.
pub struct InboundStore {
    pub peer: PeerId,
    pub request: StoreRequest,
    pub channel: ResponseChannel<StoreResponse>,
}

pub struct StoreService {
    replicas: Replicas,
    hosting: Hosting,
    net: NetworkHandle,
    inbound: mpsc::Receiver<InboundStore>,
}

impl StoreService {
    pub fn new(
        replicas: Replicas,
        hosting: Hosting,
        net: NetworkHandle,
        inbound: mpsc::Receiver<InboundStore>,
    ) -> Self {
        Self {
            replicas,
            hosting,
            net,
            inbound,
        }
    }

    /// Runs on a thread of its own until `shutdown` flips.
    pub fn spawn(self, shutdown: watch::Receiver<bool>) -> tokio::task::JoinHandle<()> {
        let (done_tx, done_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("tern-store".into())
            .spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt.block_on(self.run(shutdown)),
                    Err(e) => warn!("cannot start the storage service: {e}"),
                }
                let _ = done_tx.send(());
            });
        if let Err(e) = spawned {
            warn!("cannot start the storage thread: {e}");
        }
        tokio::spawn(async move {
            let _ = done_rx.await;
        })
    }

    async fn run(mut self, mut shutdown: watch::Receiver<bool>) {
        loop {
            let first = tokio::select! {
                biased;
                _ = shutdown.changed() => break,
                Some(r) = self.inbound.recv() => r,
                else => break,
            };
            let mut batch = vec![first];
            while batch.len() < MAX_BATCH {
                match self.inbound.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
            self.handle(batch).await;
        }
        debug!("storage service stopped");
    }

    async fn handle(&mut self, batch: Vec<InboundStore>) {
        let policy = self.hosting.policy().await;
        let mut answers = Vec::with_capacity(batch.len());
        for InboundStore {
            peer,
            request,
            channel,
        } in batch
        {
            let response = match request {
                StoreRequest::Push { entries } => match self.replicas.accept(&policy, entries) {
                    Ok(outcomes) => StoreResponse::Pushed {
                        results: outcomes
                            .into_iter()
                            .map(|o| match o {
                                Outcome::Stored => PushResult::Stored,
                                Outcome::Duplicate => PushResult::Duplicate,
                                Outcome::Missing(_) => PushResult::Missing,
                                Outcome::Refused(r) => PushResult::refused(&r.to_string()),
                                Outcome::Rejected(r) => PushResult::rejected(&r),
                            })
                            .collect(),
                    },
                    Err(e) => {
                        warn!("cannot store pushed entries: {e}");
                        StoreResponse::refused("this node cannot store right now")
                    }
                },
                StoreRequest::Sync(req) => match self.replicas.serve(&req) {
                    Ok(r) => StoreResponse::Synced(r),
                    Err(e) => StoreResponse::refused(&e.to_string()),
                },
            };
            answers.push((peer, channel, response));
        }
        // Nothing is acknowledged before it is on disk.
        let committed = self.replicas.commit();
        if let Err(e) = &committed {
            warn!("cannot sync stored chats: {e}");
        }
        for (peer, channel, response) in answers {
            let response = match (&committed, response) {
                (Ok(()), r) => r,
                (Err(_), StoreResponse::Synced(r)) => StoreResponse::Synced(r),
                (Err(_), _) => StoreResponse::refused("this node cannot store right now"),
            };
            let _ = self.net.store_respond(peer, channel, response).await;
        }
    }
}
