//! Whom this node keeps cloud chats for: the operator's hosting policy.
//!
//! A node stores chats only for accounts its operator agreed to
//! (`tern host allow ACCOUNT`), or for everyone in open mode (testnets: the
//! nodes of one `tern testnet` host for each other out of the box). A denied
//! account is refused even in open mode. All of it is bounded by a storage
//! quota. [`HostPolicy::decide`] is pure, so every refusal is unit tested;
//! [`Hosting`] keeps the policy on disk and shares it with the API.

use std::{collections::BTreeSet, sync::Arc};

use serde::{Deserialize, Serialize};
use tern_protocol::{AccountId, Record};
use tokio::sync::Mutex;

use crate::store::Keyspace;

/// Most accounts on each list.
pub const MAX_LISTED: usize = 10_000;

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostLists {
    pub allowed: BTreeSet<AccountId>,
    pub denied: BTreeSet<AccountId>,
}

impl Record for HostLists {
    const VERSION: u8 = 1;
    const MAX_LEN: usize = 2 * MAX_LISTED * 34 + 16;

    fn validate(&self) -> Result<(), tern_protocol::DecodeError> {
        if self.allowed.len() > MAX_LISTED || self.denied.len() > MAX_LISTED {
            return Err(tern_protocol::DecodeError::Invalid("list too long".into()));
        }
        Ok(())
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostPolicy {
    /// Host for every account not denied.
    pub open: bool,
    pub quota_bytes: u64,
    pub lists: HostLists,
}

/// Why a node will not store something; the message tells the sender what
/// to do about it.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "this node does not store chats for account {0}; its operator can allow it with `tern host allow {0}`"
    )]
    NotAllowed(AccountId),
    #[error("this node's operator has denied storage to account {0}")]
    Denied(AccountId),
    #[error(
        "this node's storage quota is full ({used} of {quota} bytes used); choose another storage peer or ask its operator for more"
    )]
    QuotaFull { used: u64, quota: u64 },
}

impl HostPolicy {
    /// May `account` store `incoming` more bytes here, with `used` in use?
    pub fn decide(&self, account: &AccountId, used: u64, incoming: u64) -> Result<(), Refusal> {
        if self.lists.denied.contains(account) {
            return Err(Refusal::Denied(*account));
        }
        if !self.open && !self.lists.allowed.contains(account) {
            return Err(Refusal::NotAllowed(*account));
        }
        if used.saturating_add(incoming) > self.quota_bytes {
            return Err(Refusal::QuotaFull {
                used,
                quota: self.quota_bytes,
            });
        }
        Ok(())
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct HostStatus {
    /// `open` (any account not denied) or `allow-list`.
    pub mode: String,
    pub quota_bytes: u64,
    pub allowed: Vec<String>,
    pub denied: Vec<String>,
}

/// The policy, shared and kept on disk.
#[derive(Clone)]
pub struct Hosting {
    inner: Arc<Mutex<HostPolicy>>,
    ks: Keyspace,
}

const KEY: &[u8] = b"lists";

#[derive(Debug, thiserror::Error)]
pub enum HostingError {
    #[error("at most {MAX_LISTED} accounts can be listed")]
    TooMany,
    #[error("cannot save the hosting policy: {0}")]
    Store(String),
}

impl Hosting {
    /// Loads the allow and deny lists; `open` and the quota come from the
    /// configuration.
    pub fn load(ks: Keyspace, open: bool, quota_bytes: u64) -> anyhow::Result<Self> {
        let lists = ks.get_record::<HostLists>(KEY)?.unwrap_or_default();
        Ok(Self {
            inner: Arc::new(Mutex::new(HostPolicy {
                open,
                quota_bytes,
                lists,
            })),
            ks,
        })
    }

    pub async fn policy(&self) -> HostPolicy {
        self.inner.lock().await.clone()
    }

    pub async fn status(&self) -> HostStatus {
        let p = self.inner.lock().await;
        HostStatus {
            mode: if p.open { "open" } else { "allow-list" }.into(),
            quota_bytes: p.quota_bytes,
            allowed: p.lists.allowed.iter().map(ToString::to_string).collect(),
            denied: p.lists.denied.iter().map(ToString::to_string).collect(),
        }
    }

    /// Allows `account` (and lifts a denial). Durable when it returns.
    pub async fn allow(&self, account: AccountId) -> Result<(), HostingError> {
        self.change(|l| {
            l.denied.remove(&account);
            l.allowed.insert(account);
        })
        .await
    }

    /// Denies `account` (and withdraws an allowance). Durable when it returns.
    pub async fn deny(&self, account: AccountId) -> Result<(), HostingError> {
        self.change(|l| {
            l.allowed.remove(&account);
            l.denied.insert(account);
        })
        .await
    }

    async fn change(&self, f: impl FnOnce(&mut HostLists)) -> Result<(), HostingError> {
        let mut p = self.inner.lock().await;
        let mut lists = p.lists.clone();
        f(&mut lists);
        if lists.allowed.len() > MAX_LISTED || lists.denied.len() > MAX_LISTED {
            return Err(HostingError::TooMany);
        }
        self.ks
            .insert_durable(KEY, &lists.encode())
            .await
            .map_err(|e| HostingError::Store(e.to_string()))?;
        p.lists = lists;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tern_protocol::AccountKeypair;

    fn account(seed: u8) -> AccountId {
        AccountKeypair::from_secret_bytes(&[seed; 32]).id()
    }

    #[test]
    fn only_agreed_accounts_within_the_quota_are_hosted() {
        let (alice, bob, mallory) = (account(1), account(2), account(3));
        let mut p = HostPolicy {
            open: false,
            quota_bytes: 1000,
            lists: HostLists::default(),
        };
        assert_eq!(p.decide(&alice, 0, 10), Err(Refusal::NotAllowed(alice)));
        p.lists.allowed.insert(alice);
        assert_eq!(p.decide(&alice, 0, 10), Ok(()));
        assert_eq!(
            p.decide(&alice, 995, 10),
            Err(Refusal::QuotaFull {
                used: 995,
                quota: 1000
            })
        );
        assert_eq!(p.decide(&bob, 0, 10), Err(Refusal::NotAllowed(bob)));
        // Open mode hosts anyone, except whom the operator denied.
        p.open = true;
        p.lists.denied.insert(mallory);
        assert_eq!(p.decide(&bob, 0, 10), Ok(()));
        assert_eq!(p.decide(&mallory, 0, 10), Err(Refusal::Denied(mallory)));
        assert!(
            Refusal::NotAllowed(bob)
                .to_string()
                .contains("tern host allow")
        );
        assert_eq!(
            p.decide(&bob, u64::MAX, 10),
            Err(Refusal::QuotaFull {
                used: u64::MAX,
                quota: 1000
            })
        );
    }

    #[tokio::test]
    async fn the_lists_survive_a_restart() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&tmp.path().join("s"), 1 << 20).unwrap();
        let h = Hosting::load(store.keyspace("hosting").unwrap(), false, 100).unwrap();
        h.allow(account(1)).await.unwrap();
        h.deny(account(2)).await.unwrap();
        h.allow(account(2)).await.unwrap(); // allowing lifts the denial
        h.deny(account(3)).await.unwrap();
        drop(h);
        drop(store);
        let store = crate::store::Store::open(&tmp.path().join("s"), 1 << 20).unwrap();
        let h = Hosting::load(store.keyspace("hosting").unwrap(), false, 100).unwrap();
        let s = h.status().await;
        assert_eq!(s.mode, "allow-list");
        assert_eq!(s.allowed.len(), 2);
        assert_eq!(s.denied, vec![account(3).to_string()]);
    }
}
