//! `config.toml` in the data directory. Every setting here is also a flag of
//! `tern node`; a flag wins over the file.

use std::{net::SocketAddr, path::Path, time::Duration};

use libp2p::Multiaddr;
use serde::{Deserialize, Serialize};

use crate::data_dir::{read_bounded, write_atomic};

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path} is not valid: {why}")]
    Invalid { path: String, why: String },
    #[error(
        "the control API must listen on a loopback address (127.0.0.1 or ::1), not {0}: it would be reachable from the network"
    )]
    ApiNotLoopback(SocketAddr),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// This device's name, shown to peers.
    pub name: String,
    /// Addresses to listen on. Port 0 picks a free port on first start and
    /// the same port again on later starts, so tickets stay valid.
    pub listen: Vec<Multiaddr>,
    /// Peers to dial at start (and to seed Kademlia from).
    pub bootstrap: Vec<Multiaddr>,
    /// Addresses at which others can reach this node (a server's public
    /// address). Announced to peers and in tickets; having one also turns on
    /// the relay service for peers behind NAT.
    pub external: Vec<Multiaddr>,
    /// Control API address; loopback only.
    pub api: SocketAddr,
    /// Discover peers on the local network with mDNS.
    pub mdns: bool,
    /// Most established connections, in and out together.
    pub max_connections: u32,
    /// While fewer peers than this are connected, the node dials peers it
    /// remembers or discovers.
    pub target_peers: u32,
    /// Seconds a connection with no open streams is kept.
    pub idle_timeout_secs: u64,
    /// Store page-cache size, in MiB.
    pub store_cache_mib: u64,
    /// Store cloud chats for any account not denied (testnets), instead of
    /// only for accounts allowed with `tern host allow`.
    pub host_open: bool,
    /// Most bytes of other people's chats this node stores, in MiB.
    pub storage_quota_mib: u64,
    /// Open lanes: direct encrypted TCP connections beside libp2p for long
    /// runs of pushes (a new replica catching up), both to peers and from
    /// them. Off: every push goes over libp2p.
    pub lanes: bool,
    /// TCP port peers open lanes to, on the address of the first TCP
    /// `listen` address; 0 picks a free port at each start (peers learn it
    /// when they ask for a lane).
    pub lane_port: u16,
    /// This account's chosen storage peers (peer ids, or multiaddrs ending
    /// in `/p2p/PEER`), published in its account record: new chats keep
    /// their messages there by default. Empty: this node itself.
    pub storage_peers: Vec<String>,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            name: "tern".into(),
            listen: vec![
                "/ip4/0.0.0.0/tcp/0".parse().expect("valid literal"),
                "/ip4/0.0.0.0/udp/0/quic-v1".parse().expect("valid literal"),
            ],
            bootstrap: Vec::new(),
            external: Vec::new(),
            api: SocketAddr::from(([127, 0, 0, 1], 0)),
            mdns: true,
            max_connections: 512,
            target_peers: 32,
            idle_timeout_secs: 3600,
            store_cache_mib: 8,
            host_open: false,
            storage_quota_mib: 1024,
            storage_peers: Vec::new(),
            lanes: true,
            lane_port: 0,
        }
    }
}

impl Config {
    const MAX_FILE: u64 = 64 * 1024;

    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let bytes = read_bounded(path, Self::MAX_FILE).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|_| ConfigError::Invalid {
            path: path.display().to_string(),
            why: "not UTF-8".into(),
        })?;
        let config: Config = toml::from_str(&text).map_err(|e| ConfigError::Invalid {
            path: path.display().to_string(),
            why: e.message().to_owned(),
        })?;
        config.validate()?;
        Ok(config)
    }

    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        let text = toml::to_string_pretty(self).map_err(std::io::Error::other)?;
        let body = format!(
            "# Tern node configuration. Every setting is also a flag of `tern node`;\n\
             # a flag wins over this file.\n\n{text}"
        );
        write_atomic(path, body.as_bytes(), false)
    }

    /// Where this node listens for lanes: the IP of the first TCP `listen`
    /// address (all IPv4 interfaces if none) and `lane_port`; `None` with
    /// lanes off.
    pub fn lane_addr(&self) -> Option<SocketAddr> {
        use libp2p::multiaddr::Protocol;
        if !self.lanes {
            return None;
        }
        let ip = self
            .listen
            .iter()
            .find_map(|a| match crate::net::event_loop::leading_ip(a)? {
                (ip, Protocol::Tcp(_)) => Some(ip),
                _ => None,
            })
            .unwrap_or(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
        Some(SocketAddr::new(ip, self.lane_port))
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.api.ip().is_loopback() {
            return Err(ConfigError::ApiNotLoopback(self.api));
        }
        let invalid = |why: &str| ConfigError::Invalid {
            path: "configuration".into(),
            why: why.into(),
        };
        if self.name.is_empty() || self.name.len() > tern_protocol::identity::MAX_DEVICE_NAME {
            return Err(invalid("name must be 1 to 64 bytes"));
        }
        if self.storage_peers.len() > tern_protocol::cloud::account::MAX_STORAGE_PEERS {
            return Err(invalid("storage_peers lists at most 8 peers"));
        }
        for p in &self.storage_peers {
            crate::cloud::service::parse_storage_peer(p)
                .map_err(|e| invalid(&format!("storage_peers: {e}")))?;
        }
        if self.max_connections == 0 {
            return Err(invalid("max_connections must be at least 1"));
        }
        if self.idle_timeout_secs == 0 {
            return Err(invalid("idle_timeout_secs must be at least 1"));
        }
        if !(1..=4096).contains(&self.store_cache_mib) {
            return Err(invalid("store_cache_mib must be between 1 and 4096"));
        }
        Ok(())
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_secs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lanes_listen_on_the_first_tcp_listen_address() {
        let mut c = Config {
            listen: vec![
                "/ip4/127.0.0.2/udp/9/quic-v1".parse().unwrap(),
                "/ip4/127.0.0.3/tcp/9".parse().unwrap(),
            ],
            lane_port: 4002,
            ..Config::default()
        };
        assert_eq!(c.lane_addr(), Some("127.0.0.3:4002".parse().unwrap()));
        c.listen.truncate(1);
        assert_eq!(c.lane_addr(), Some("0.0.0.0:4002".parse().unwrap()));
        c.lanes = false;
        assert_eq!(c.lane_addr(), None);
    }

    #[test]
    fn default_config_round_trips_through_the_file() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.toml");
        let c = Config {
            name: "community-node".into(),
            bootstrap: vec!["/ip4/127.0.0.1/tcp/4001".parse().unwrap()],
            ..Config::default()
        };
        c.save(&path).unwrap();
        assert_eq!(Config::load(&path).unwrap(), c);
    }

    #[test]
    fn partial_files_take_defaults() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.toml");
        std::fs::write(&path, "mdns = false\n").unwrap();
        let c = Config::load(&path).unwrap();
        assert!(!c.mdns);
        assert_eq!(c.listen, Config::default().listen);
    }

    #[test]
    fn bad_files_are_clear_errors() {
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("config.toml");
        for (body, expect) in [
            ("mdns = \"yes\"", "invalid type"),
            ("no_such_setting = 1", "unknown field"),
            ("listen = [\"not a multiaddr\"]", "invalid"),
            ("api = \"0.0.0.0:8080\"", "loopback"),
        ] {
            std::fs::write(&path, body).unwrap();
            let err = Config::load(&path).unwrap_err().to_string();
            assert!(err.contains(expect), "{body}: {err}");
        }
    }
}
