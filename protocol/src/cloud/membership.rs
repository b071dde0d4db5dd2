//! Who is in a chat, who manages it, and which key epoch is in force: the
//! state an entry is checked against.
//!
//! The membership in force for an entry is computed from the membership
//! changes among its ancestors only (what its author had seen), applied in
//! display order (lamport, hash). Both inputs are the same on every holder
//! of the entry, so every holder reaches the same verdict, whatever order
//! entries arrived in. A change that does not apply at its place in that
//! order (its author was removed by a concurrent change sorted earlier, or
//! it removes someone already gone) is skipped, also deterministically.

use std::collections::{BTreeMap, BTreeSet};

use super::{
    account::StoragePeer,
    entry::{EntryHash, EntryKind, KeyGrant},
    keys::EncryptionPublicKey,
};
use crate::identity::{AccountId, DevicePublicKey};

#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum MembershipError {
    #[error("only {0} may add or remove other members of this chat")]
    NotAllowedToManage(&'static str),
    #[error("{0:?} is already a member")]
    AlreadyMember(AccountId),
    #[error("{0:?} is not a member")]
    NotAMember(AccountId),
    #[error("the last member cannot be removed")]
    LastMember,
    #[error("a key rotation must wrap the new key to exactly the remaining members")]
    GrantsDoNotMatchMembers,
    #[error("an account key change may not seal the new key to a device revoked before")]
    KeyToRevokedDevice,
}

/// The membership and key epoch in force at some point of the log.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Membership {
    members: BTreeMap<AccountId, EncryptionPublicKey>,
    admins: BTreeSet<AccountId>,
    /// Set at genesis: a chat created with admins stays admin-managed.
    admin_managed: bool,
    removed: BTreeSet<AccountId>,
    epoch: u32,
    /// The entries whose keys make up the current chat key: genesis, then
    /// each rotation applied (see `ChatKey::rotate`).
    key_path: Vec<EntryHash>,
    /// The storage set and write quorum of the latest Storage entry applied.
    storage: Option<(Vec<StoragePeer>, u8)>,
    /// Devices their own account revoked (`AccountKey`), with that
    /// account: only an account's own entry revokes its device.
    revoked_devices: BTreeSet<(DevicePublicKey, AccountId)>,
}

impl Membership {
    pub fn members(&self) -> impl Iterator<Item = (&AccountId, &EncryptionPublicKey)> {
        self.members.iter()
    }

    pub fn member_count(&self) -> usize {
        self.members.len()
    }

    pub fn is_member(&self, account: &AccountId) -> bool {
        self.members.contains_key(account)
    }

    pub fn encryption_key(&self, account: &AccountId) -> Option<&EncryptionPublicKey> {
        self.members.get(account)
    }

    pub fn is_admin(&self, account: &AccountId) -> bool {
        self.admins.contains(account)
    }

    pub fn admins(&self) -> impl Iterator<Item = &AccountId> {
        self.admins.iter()
    }

    /// Whether `account` revoked its `device` here: its later entries are
    /// refused.
    pub fn is_revoked_device(&self, device: &DevicePublicKey, account: &AccountId) -> bool {
        self.revoked_devices.contains(&(*device, *account))
    }

    /// Removed and not added back since.
    pub fn was_removed(&self, account: &AccountId) -> bool {
        self.removed.contains(account)
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    pub fn key_path(&self) -> &[EntryHash] {
        &self.key_path
    }

    /// The storage peers and write quorum in force, once a Storage entry
    /// set them.
    pub fn storage_set(&self) -> Option<(&[StoragePeer], u8)> {
        self.storage
            .as_ref()
            .map(|(peers, quorum)| (peers.as_slice(), *quorum))
    }

    /// Who may set the storage set: a member, and with admins an admin.
    pub fn may_set_storage(&self, author: &AccountId) -> bool {
        self.is_member(author) && (!self.admin_managed || self.admins.contains(author))
    }

    fn may_manage(&self, actor: &AccountId) -> Result<(), MembershipError> {
        if self.admin_managed {
            if self.admins.contains(actor) {
                return Ok(());
            }
            return Err(MembershipError::NotAllowedToManage("admins"));
        }
        if self.is_member(actor) {
            return Ok(());
        }
        Err(MembershipError::NotAllowedToManage("members"))
    }

    /// Delete for everyone: the author of the target, either member of a
    /// two-person chat, or an admin.
    pub fn may_purge(&self, purger: &AccountId, target_author: &AccountId) -> bool {
        self.is_member(purger)
            && (purger == target_author || self.members.len() == 2 || self.admins.contains(purger))
    }

    /// Whether `author` may make the membership change `kind` here. Does not
    /// check rotation grants (see [`Self::check_grants`]).
    pub fn authorise(&self, author: &AccountId, kind: &EntryKind) -> Result<(), MembershipError> {
        match kind {
            EntryKind::AddMember { member } => {
                self.may_manage(author)?;
                if self.is_member(&member.account) {
                    return Err(MembershipError::AlreadyMember(member.account));
                }
                Ok(())
            }
            EntryKind::RemoveMember { account, .. } => {
                if !self.is_member(account) {
                    return Err(MembershipError::NotAMember(*account));
                }
                if account != author {
                    self.may_manage(author)?;
                }
                if self.members.len() < 2 {
                    return Err(MembershipError::LastMember);
                }
                Ok(())
            }
            EntryKind::AccountKey { change, .. }
                if change
                    .devices
                    .iter()
                    .any(|g| self.is_revoked_device(&g.device, author)) =>
            {
                Err(MembershipError::KeyToRevokedDevice)
            }
            EntryKind::Rekey { .. } | EntryKind::AccountKey { .. } => {
                if self.is_member(author) {
                    Ok(())
                } else {
                    Err(MembershipError::NotAMember(*author))
                }
            }
            EntryKind::Genesis { .. }
            | EntryKind::Message
            | EntryKind::Purge { .. }
            | EntryKind::Storage { .. } => Ok(()),
        }
    }

    /// A rotation must give the new key to every member who stays, and to
    /// nobody else: storage peers check that nobody is locked out and no
    /// outsider is let in, without seeing any key.
    pub fn check_grants(&self, kind: &EntryKind) -> Result<(), MembershipError> {
        let (leaving, grants): (Option<&AccountId>, &[KeyGrant]) = match kind {
            EntryKind::RemoveMember {
                account, grants, ..
            } => (Some(account), grants),
            EntryKind::Rekey { grants, .. } | EntryKind::AccountKey { grants, .. } => {
                (None, grants)
            }
            _ => return Ok(()),
        };
        let expected: BTreeSet<&AccountId> = self
            .members
            .keys()
            .filter(|a| Some(*a) != leaving)
            .collect();
        let given: BTreeSet<&AccountId> = grants.iter().map(|g| &g.account).collect();
        if expected == given && given.len() == grants.len() {
            Ok(())
        } else {
            Err(MembershipError::GrantsDoNotMatchMembers)
        }
    }

    /// Applies the change made by entry `hash`, written by `device` of
    /// `author`, if it applies here. A change by a device its account
    /// revoked earlier in this order (a concurrent branch) does not.
    pub(crate) fn apply(
        &mut self,
        hash: EntryHash,
        author: &AccountId,
        device: &DevicePublicKey,
        kind: &EntryKind,
    ) {
        if let EntryKind::Genesis { members, admins } = kind {
            if self.key_path.is_empty() {
                *self = Membership {
                    members: members
                        .iter()
                        .map(|m| (m.account, m.encryption_key))
                        .collect(),
                    admins: admins.iter().copied().collect(),
                    admin_managed: !admins.is_empty(),
                    removed: BTreeSet::new(),
                    epoch: 0,
                    key_path: vec![hash],
                    storage: None,
                    revoked_devices: BTreeSet::new(),
                };
            }
            return;
        }
        if self.key_path.is_empty() || self.is_revoked_device(device, author) {
            return;
        }
        if let EntryKind::Storage { peers, quorum } = kind {
            if self.may_set_storage(author) {
                self.storage = Some((peers.clone(), *quorum));
            }
            return;
        }
        if self.authorise(author, kind).is_err() {
            return;
        }
        match kind {
            EntryKind::AddMember { member } => {
                self.members.insert(member.account, member.encryption_key);
                self.removed.remove(&member.account);
            }
            EntryKind::RemoveMember { account, .. } => {
                self.members.remove(account);
                self.admins.remove(account);
                self.removed.insert(*account);
                self.rotate(hash);
            }
            EntryKind::Rekey { .. } => self.rotate(hash),
            EntryKind::AccountKey { change, .. } => {
                self.members.insert(*author, change.encryption_key);
                for device in &change.revoked {
                    self.revoked_devices.insert((*device, *author));
                }
                self.rotate(hash);
            }
            EntryKind::Genesis { .. }
            | EntryKind::Message
            | EntryKind::Purge { .. }
            | EntryKind::Storage { .. } => {}
        }
    }

    fn rotate(&mut self, hash: EntryHash) {
        self.epoch = self.epoch.saturating_add(1);
        self.key_path.push(hash);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        cloud::{entry::MemberGrant, keys::WrappedKey},
        identity::AccountKeypair,
    };

    fn device() -> DevicePublicKey {
        let key = ed25519_dalek::SigningKey::from_bytes(&[1; 32]);
        DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap()
    }

    fn account(seed: u8) -> AccountId {
        AccountKeypair::from_secret_bytes(&[seed; 32]).id()
    }

    fn grant(seed: u8) -> MemberGrant {
        MemberGrant {
            account: account(seed),
            encryption_key: EncryptionPublicKey([seed; 32]),
            wrapped_key: WrappedKey {
                ephemeral: [0; 32],
                ciphertext: [0; 32],
                tag: [0; 16],
            },
        }
    }

    fn key_grant(seed: u8) -> KeyGrant {
        KeyGrant {
            account: account(seed),
            wrapped_key: grant(seed).wrapped_key,
        }
    }

    fn genesis(admins: Vec<AccountId>) -> Membership {
        let mut m = Membership::default();
        m.apply(
            EntryHash([0; 32]),
            &account(1),
            &device(),
            &EntryKind::Genesis {
                members: vec![grant(1), grant(2), grant(3)],
                admins,
            },
        );
        m
    }

    #[test]
    fn without_admins_any_member_manages() {
        let mut m = genesis(vec![]);
        let add = EntryKind::AddMember { member: grant(4) };
        assert_eq!(m.authorise(&account(2), &add), Ok(()));
        assert!(m.authorise(&account(9), &add).is_err());
        m.apply(EntryHash([1; 32]), &account(2), &device(), &add);
        assert!(m.is_member(&account(4)));
        assert_eq!(m.epoch(), 0);
        assert_eq!(
            m.authorise(&account(2), &add),
            Err(MembershipError::AlreadyMember(account(4)))
        );
    }

    #[test]
    fn with_admins_only_admins_manage_but_anyone_may_leave() {
        let m = genesis(vec![account(1)]);
        let remove_3 = EntryKind::RemoveMember {
            account: account(3),
            new_epoch: 1,
            grants: vec![],
        };
        assert_eq!(m.authorise(&account(1), &remove_3), Ok(()));
        assert_eq!(
            m.authorise(&account(2), &remove_3),
            Err(MembershipError::NotAllowedToManage("admins"))
        );
        assert_eq!(m.authorise(&account(3), &remove_3), Ok(()));
    }

    #[test]
    fn removal_rotates_and_remembers_the_removed() {
        let mut m = genesis(vec![]);
        let remove = EntryKind::RemoveMember {
            account: account(3),
            new_epoch: 1,
            grants: vec![key_grant(1), key_grant(2)],
        };
        assert_eq!(m.check_grants(&remove), Ok(()));
        m.apply(EntryHash([5; 32]), &account(1), &device(), &remove);
        assert!(!m.is_member(&account(3)));
        assert!(m.was_removed(&account(3)));
        assert_eq!(m.epoch(), 1);
        assert_eq!(m.key_path(), &[EntryHash([0; 32]), EntryHash([5; 32])]);
        // Removing again is a no-op that rotates nothing.
        m.apply(EntryHash([6; 32]), &account(1), &device(), &remove);
        assert_eq!(m.epoch(), 1);
    }

    #[test]
    fn rotation_grants_must_match_remaining_members() {
        let m = genesis(vec![]);
        let missing_one = EntryKind::RemoveMember {
            account: account(3),
            new_epoch: 1,
            grants: vec![key_grant(1)],
        };
        let includes_removed = EntryKind::RemoveMember {
            account: account(3),
            new_epoch: 1,
            grants: vec![key_grant(1), key_grant(2), key_grant(3)],
        };
        let outsider = EntryKind::Rekey {
            new_epoch: 1,
            grants: vec![key_grant(1), key_grant(2), key_grant(3), key_grant(4)],
        };
        for kind in [missing_one, includes_removed, outsider] {
            assert_eq!(
                m.check_grants(&kind),
                Err(MembershipError::GrantsDoNotMatchMembers)
            );
        }
    }

    #[test]
    fn storage_set_follows_the_latest_authorised_change() {
        let peer = |seed: u8| StoragePeer {
            node: crate::identity::DevicePublicKey::from_bytes(
                ed25519_dalek::SigningKey::from_bytes(&[seed; 32])
                    .verifying_key()
                    .to_bytes(),
            )
            .unwrap(),
            addrs: vec![],
        };
        let set = |seed: u8| EntryKind::Storage {
            peers: vec![peer(seed)],
            quorum: 1,
        };
        let mut open = genesis(vec![]);
        assert_eq!(open.storage_set(), None);
        open.apply(EntryHash([1; 32]), &account(2), &device(), &set(50));
        assert_eq!(open.storage_set(), Some((&[peer(50)][..], 1)));
        // An outsider's change does not apply.
        open.apply(EntryHash([2; 32]), &account(9), &device(), &set(51));
        assert_eq!(open.storage_set(), Some((&[peer(50)][..], 1)));

        let mut managed = genesis(vec![account(1)]);
        assert!(managed.may_set_storage(&account(1)));
        assert!(!managed.may_set_storage(&account(2)));
        managed.apply(EntryHash([3; 32]), &account(2), &device(), &set(52));
        assert_eq!(managed.storage_set(), None);
        managed.apply(EntryHash([4; 32]), &account(1), &device(), &set(53));
        assert_eq!(managed.storage_set(), Some((&[peer(53)][..], 1)));
    }

    #[test]
    fn purge_rule() {
        let group = genesis(vec![account(1)]);
        assert!(group.may_purge(&account(2), &account(2)));
        assert!(!group.may_purge(&account(2), &account(3)));
        assert!(group.may_purge(&account(1), &account(3)));
        assert!(!group.may_purge(&account(9), &account(9)));

        let mut pair = genesis(vec![]);
        pair.apply(
            EntryHash([1; 32]),
            &account(3),
            &device(),
            &EntryKind::RemoveMember {
                account: account(3),
                new_epoch: 1,
                grants: vec![],
            },
        );
        assert_eq!(pair.member_count(), 2);
        assert!(pair.may_purge(&account(2), &account(1)));
        assert!(!pair.may_purge(&account(3), &account(3)));
    }
}
