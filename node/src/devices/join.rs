//! The new device's side of linking (`tern init --link`): a short-lived
//! libp2p client that dials the device named in the code, proves it holds
//! the code, and returns what that device grants.

use std::time::Duration;

use futures::StreamExt;
use libp2p::{
    Multiaddr, PeerId, Swarm, identity, noise, request_response,
    swarm::{SwarmEvent, dial_opts::DialOpts},
    tcp, yamux,
};
use rand::RngCore;
use tern_protocol::{
    AccountKeypair,
    link::{LinkCode, LinkGrant, LinkRefusal, LinkRequest, LinkResponse, link_proof},
};

use crate::{
    keys::{device_public_key, peer_id_of},
    net::behaviour::{LINK_PROTOCOL, LinkCodec},
};

/// How long the whole exchange may take.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum JoinError {
    #[error(
        "could not reach the device that made this link code ({0}); is its `tern node` running, and can this machine reach one of its addresses?"
    )]
    Unreachable(String),
    #[error("{0}")]
    Refused(LinkRefusal),
    #[error("the device that made this link code answered wrongly: {0}")]
    Protocol(String),
    #[error(
        "no answer within {} s from the device that made this link code",
        JOIN_TIMEOUT.as_secs()
    )]
    Timeout,
    #[error("cannot start networking: {0}")]
    Transport(String),
}

/// The account key and the grant, checked against this device.
pub struct Joined {
    pub account: AccountKeypair,
    pub grant: LinkGrant,
}

/// Runs the link exchange for `device` (the new device's key) with the
/// device that issued `code`, asking to be called `name`.
pub async fn join(
    code: &LinkCode,
    device: &identity::Keypair,
    name: &str,
) -> Result<Joined, JoinError> {
    tokio::time::timeout(JOIN_TIMEOUT, exchange(code, device, name))
        .await
        .map_err(|_| JoinError::Timeout)?
}

async fn exchange(
    code: &LinkCode,
    device: &identity::Keypair,
    name: &str,
) -> Result<Joined, JoinError> {
    let joiner = device_public_key(&device.public())
        .ok_or_else(|| JoinError::Transport("the new device key is not Ed25519".into()))?;
    let linker = peer_id_of(&code.linker)
        .ok_or_else(|| JoinError::Protocol("the code names an invalid device key".into()))?;
    let addrs: Vec<Multiaddr> = code
        .addrs
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect();
    if addrs.is_empty() {
        return Err(JoinError::Unreachable(
            "the code holds no usable address".into(),
        ));
    }
    let mut swarm = client(device.clone())?;
    // Naming the peer makes the Noise handshake prove it is the device in
    // the code; an impostor at one of the addresses fails it.
    swarm
        .dial(DialOpts::peer_id(linker).addresses(addrs).build())
        .map_err(|e| JoinError::Unreachable(e.to_string()))?;
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::ConnectionEstablished { peer_id, .. } if peer_id == linker => break,
            SwarmEvent::OutgoingConnectionError { error, .. } => {
                return Err(JoinError::Unreachable(error.to_string()));
            }
            _ => {}
        }
    }

    let mut joiner_nonce = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut joiner_nonce);
    let hello = LinkRequest::Hello {
        code: code.id,
        nonce: joiner_nonce,
    };
    let linker_nonce = match ask(&mut swarm, linker, hello).await? {
        LinkResponse::Challenge { nonce } => nonce,
        LinkResponse::Refused(why) => return Err(JoinError::Refused(why)),
        LinkResponse::Granted(_) => {
            return Err(JoinError::Protocol("a grant before any proof".into()));
        }
    };
    let mac = link_proof(
        &code.secret,
        &code.id,
        &code.linker,
        &joiner,
        &joiner_nonce,
        &linker_nonce,
    );
    let proof = LinkRequest::Proof {
        code: code.id,
        mac,
        name: name.to_owned(),
    };
    match ask(&mut swarm, linker, proof).await? {
        LinkResponse::Granted(grant) => {
            let account = grant
                .check(&joiner)
                .map_err(|e| JoinError::Protocol(e.to_string()))?;
            Ok(Joined {
                account,
                grant: *grant,
            })
        }
        LinkResponse::Refused(why) => Err(JoinError::Refused(why)),
        LinkResponse::Challenge { .. } => Err(JoinError::Protocol(
            "a second challenge instead of an answer".into(),
        )),
    }
}

type Client = Swarm<request_response::Behaviour<LinkCodec>>;

/// TCP and QUIC, Noise, Yamux, and `/tern/link/1` as a client only.
fn client(device: identity::Keypair) -> Result<Client, JoinError> {
    let transport = |e: &dyn std::fmt::Display| JoinError::Transport(e.to_string());
    let codec = LinkCodec::new(prometheus_client::metrics::counter::Counter::default());
    let swarm = libp2p::SwarmBuilder::with_existing_identity(device)
        .with_tokio()
        .with_tcp(
            tcp::Config::default().nodelay(true),
            noise::Config::new,
            yamux::Config::default,
        )
        .map_err(|e| transport(&e))?
        .with_quic()
        .with_behaviour(|_| {
            request_response::Behaviour::with_codec(
                codec,
                [(LINK_PROTOCOL, request_response::ProtocolSupport::Outbound)],
                request_response::Config::default().with_request_timeout(JOIN_TIMEOUT),
            )
        })
        .map_err(|e| transport(&e))?
        .with_swarm_config(|c| c.with_idle_connection_timeout(JOIN_TIMEOUT))
        .build();
    Ok(swarm)
}

/// Sends one request and waits for its answer.
async fn ask(
    swarm: &mut Client,
    peer: PeerId,
    request: LinkRequest,
) -> Result<LinkResponse, JoinError> {
    let id = swarm.behaviour_mut().send_request(&peer, request);
    loop {
        match swarm.select_next_some().await {
            SwarmEvent::Behaviour(request_response::Event::Message {
                message:
                    request_response::Message::Response {
                        request_id,
                        response,
                    },
                ..
            }) if request_id == id => return Ok(response),
            SwarmEvent::Behaviour(request_response::Event::OutboundFailure {
                request_id,
                error,
                ..
            }) if request_id == id => {
                return Err(match error {
                    request_response::OutboundFailure::UnsupportedProtocols => JoinError::Protocol(
                        "it does not support device linking (is it an older version of Tern?)"
                            .into(),
                    ),
                    request_response::OutboundFailure::DialFailure
                    | request_response::OutboundFailure::ConnectionClosed => {
                        JoinError::Unreachable(error.to_string())
                    }
                    other => JoinError::Protocol(other.to_string()),
                });
            }
            _ => {}
        }
    }
}
