//! [`ChatMember`]: what a member device adds to a [`ChatLog`]: its keys. It
//! writes entries (signed by the device, encrypted under the chat key in
//! force) and reads the history (decrypted, edits applied, purged messages
//! gone, read receipts folded into each message's status).
//!
//! It keeps no log of its own: the driver inserts what [`ChatMember::compose`]
//! returns into its [`ChatLog`] (which verifies it like any other entry) and
//! pushes it to the chat's storage peers.
//!
//! Chat keys are found from the log alone and the account encryption key:
//! the genesis and every rotation wrap a key to each member's account, an
//! addition wraps the current key to the new member. So a newly linked
//! device of a member account reads the whole history with nothing but the
//! account key.

use std::{
    collections::{BTreeMap, HashMap},
    sync::Arc,
};

use ed25519_dalek::SigningKey;

use super::{
    account::StoragePeer,
    content::{Content, MAX_TEXT},
    entry::{
        AccountKeyChange, ChatId, Composed, DeviceKeyGrant, Entry, EntryBody, EntryHash,
        EntryHeader, EntryKind, KeyGrant, MAX_MEMBERS, MAX_PARENTS, MAX_PURGE_TARGETS, MemberGrant,
        check_storage_set, sign_run,
    },
    keys::{AccountEncryptionKey, BodyContext, ChatKey, EncryptionPublicKey, KeyError, WrappedKey},
    log::{ChatLog, LogOutput},
    membership::{Membership, MembershipError},
};
use crate::{
    codec::DecodeError,
    identity::{AccountId, AccountKeypair, DeviceCertificate, DevicePublicKey},
};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MemberError {
    #[error("the device certificate does not verify or is for another device key")]
    CertificateMismatch,
    #[error("the chat log has no genesis yet")]
    NoGenesis,
    #[error("this account is not a member of the chat")]
    NotMember,
    #[error("this device holds no key for that epoch (before joining, or after removal)")]
    NoKey,
    #[error("entry {0:?} is not in the log")]
    UnknownEntry(EntryHash),
    #[error("entry {0:?} has no body (purged, or not fetched yet)")]
    NoBody(EntryHash),
    #[error("text is {0} bytes; at most {MAX_TEXT} are allowed")]
    TextTooLong(usize),
    #[error("a chat has 2 to {MAX_MEMBERS} members")]
    MemberCount,
    #[error("only the author edits a message, and only text messages")]
    NotEditable,
    #[error("not allowed to delete that message for everyone")]
    NotAllowedToDelete,
    #[error("only members, or admins if the chat has any, set its storage set")]
    NotAllowedToSetStorage,
    #[error(transparent)]
    Membership(#[from] MembershipError),
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("undecodable content: {0}")]
    BadContent(#[from] DecodeError),
    #[error(transparent)]
    Malformed(#[from] super::entry::EntryError),
}

/// What a member wants to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Draft {
    Text {
        text: String,
        reply_to: Option<EntryHash>,
    },
    Edit {
        target: EntryHash,
        text: String,
    },
    Title {
        text: String,
    },
    /// A read receipt for everything this device has (the current heads).
    Read,
    /// Delete for everyone: purges the message and its edits.
    Delete {
        target: EntryHash,
    },
    AddMember {
        account: AccountId,
        encryption_key: EncryptionPublicKey,
    },
    RemoveMember {
        account: AccountId,
    },
    Rekey,
    /// This account revoked `revoked`: rotates the key as `Rekey` does,
    /// with this account's grant wrapped to its current encryption key
    /// (added with [`ChatMember::add_encryption_key`] first), which is
    /// sealed to each of `keep` and to this device.
    AccountKey {
        keep: Vec<DevicePublicKey>,
        revoked: Vec<DevicePublicKey>,
    },
    /// Sets the chat's storage peers and write quorum. A new chat's creator
    /// composes this right after the genesis; only members (admins, if the
    /// chat has any) may.
    Storage {
        peers: Vec<StoragePeer>,
        quorum: u8,
    },
}

/// A message as the user sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DisplayedMessage {
    pub entry: EntryHash,
    pub author: AccountId,
    pub device: DevicePublicKey,
    /// The latest edit's text, or the original.
    pub text: String,
    pub reply_to: Option<EntryHash>,
    pub edited: bool,
    /// Other accounts whose receipts cover this message ("read", two checks).
    pub read_by: Vec<AccountId>,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ChatHistory {
    pub title: Option<String>,
    /// In display order.
    pub messages: Vec<DisplayedMessage>,
    /// Messages this device holds no key for (written before it joined)
    /// or that failed to decrypt.
    pub unreadable: usize,
}

/// Splits one caller-provided random value into the independent values a
/// composition needs.
struct Randomness([u8; 32]);

impl Randomness {
    fn derive(&self, purpose: &str) -> [u8; 32] {
        blake3::derive_key(&format!("tern cloud compose {purpose} v1"), &self.0)
    }

    fn nonce(&self) -> [u8; 24] {
        let mut nonce = [0; 24];
        nonce.copy_from_slice(&self.derive("nonce")[..24]);
        nonce
    }
}

/// A member device's keys for its account's cloud chats.
pub struct ChatMember {
    account: AccountId,
    /// The account's encryption keys with their generations: never empty.
    /// The current one is [`AccountEncryptionKey::current`]; the others
    /// open older epochs.
    encryption: Vec<(u32, AccountEncryptionKey)>,
    /// Keys taken from `AccountKey` entries since the driver last asked.
    learned: Vec<(u32, AccountEncryptionKey)>,
    device_key: SigningKey,
    certificate: Arc<DeviceCertificate>,
    /// Chat keys found so far, by the key path (genesis and rotations)
    /// they belong to.
    keys: HashMap<Vec<EntryHash>, ChatKey>,
}

impl ChatMember {
    /// A device holding the account key.
    pub fn for_account(
        account: &AccountKeypair,
        device_key: SigningKey,
        certificate: DeviceCertificate,
    ) -> Result<Self, MemberError> {
        Self::new(
            AccountEncryptionKey::derive(account),
            device_key,
            certificate,
        )
    }

    /// A device holding the account's encryption key (given when it was
    /// linked) and its own certified device key.
    pub fn new(
        encryption: AccountEncryptionKey,
        device_key: SigningKey,
        certificate: DeviceCertificate,
    ) -> Result<Self, MemberError> {
        if certificate.verify().is_err()
            || certificate.device.as_bytes() != device_key.verifying_key().as_bytes()
        {
            return Err(MemberError::CertificateMismatch);
        }
        Ok(Self {
            account: certificate.account,
            encryption: vec![(0, encryption)],
            learned: Vec::new(),
            device_key,
            certificate: Arc::new(certificate),
            keys: HashMap::new(),
        })
    }

    pub fn account(&self) -> AccountId {
        self.account
    }

    pub fn device(&self) -> DevicePublicKey {
        self.certificate.device
    }

    /// The account's current encryption key (what others wrap to).
    pub fn encryption_key(&self) -> EncryptionPublicKey {
        self.current().1.public()
    }

    /// The current key's generation (0 until a device is revoked).
    pub fn key_generation(&self) -> u32 {
        self.current().0
    }

    fn current(&self) -> &(u32, AccountEncryptionKey) {
        AccountEncryptionKey::current(&self.encryption)
            .expect("a member holds at least one encryption key")
    }

    /// Adds a key of this account at `generation`; it becomes the current
    /// key if it is [`AccountEncryptionKey::current`] among those held.
    /// Returns whether it was new.
    pub fn add_encryption_key(&mut self, generation: u32, key: AccountEncryptionKey) -> bool {
        if self.holds(&key.public()) {
            return false;
        }
        self.encryption.push((generation, key));
        true
    }

    /// Finds the chat key in force at `log`'s heads, and with it any account
    /// key sealed to this device on the way (see
    /// [`Self::take_learned_keys`]).
    pub fn refresh_keys(&mut self, log: &ChatLog) {
        let heads = log.heads();
        let membership = log.membership_for_parents(&heads);
        let _ = self.key_for(log, membership.key_path());
    }

    /// The keys this device took from `AccountKey` entries (sealed to it by
    /// another device of the account) since the last call, for the driver
    /// to keep: chats created later may be wrapped to them alone.
    pub fn take_learned_keys(&mut self) -> Vec<(u32, AccountEncryptionKey)> {
        std::mem::take(&mut self.learned)
    }

    fn holds(&self, key: &EncryptionPublicKey) -> bool {
        self.encryption.iter().any(|(_, k)| k.public() == *key)
    }

    fn unwrap_any(&self, wrapped: &WrappedKey, chat: ChatId, epoch: u32) -> Option<ChatKey> {
        AccountEncryptionKey::unwrap_any(
            self.encryption.iter().map(|(_, k)| k),
            wrapped,
            chat,
            epoch,
        )
        .ok()
    }

    /// The genesis of a new chat with `others`, this account included as a
    /// member. `chat` and `random` must be fresh random bytes.
    pub fn create(
        &mut self,
        chat: ChatId,
        others: &[(AccountId, EncryptionPublicKey)],
        admins: Vec<AccountId>,
        title: Option<&str>,
        random: [u8; 32],
    ) -> Result<Composed, MemberError> {
        let random = Randomness(random);
        let key = ChatKey::from_bytes(random.derive("first key"));
        let wrap_random = random.derive("wrap");
        let mut members = vec![(self.account, self.encryption_key())];
        for (account, encryption_key) in others {
            if !members.iter().any(|(a, _)| a == account) {
                members.push((*account, *encryption_key));
            }
        }
        if members.len() < 2 || members.len() > MAX_MEMBERS {
            return Err(MemberError::MemberCount);
        }
        let members = members
            .into_iter()
            .map(|(account, encryption_key)| {
                Ok(MemberGrant {
                    account,
                    encryption_key,
                    wrapped_key: key.wrap_to(&encryption_key, chat, 0, &wrap_random)?,
                })
            })
            .collect::<Result<Vec<_>, KeyError>>()?;
        let body = match title {
            Some(text) => Some(self.seal(
                &key,
                chat,
                0,
                &Content::Title {
                    text: checked(text)?,
                },
                &random,
            )),
            None => None,
        };
        let header = EntryHeader {
            chat,
            author: self.certificate.clone(),
            parents: Vec::new(),
            seq: 0,
            lamport: 0,
            epoch: 0,
            kind: EntryKind::Genesis { members, admins },
            body_hash: body.as_ref().map(|b| b.hash()),
        };
        header.check_shape()?;
        let header = header.sign(&self.device_key);
        self.keys.insert(vec![header.hash()], key);
        Ok(Composed::new(Entry { header, body }))
    }

    /// The next entry of this device in `log`, on top of the heads it
    /// holds, signed alone. `random` must be 32 fresh random bytes.
    pub fn compose(
        &mut self,
        log: &ChatLog,
        draft: Draft,
        random: [u8; 32],
    ) -> Result<Composed, MemberError> {
        let (header, body) = self.compose_parts(log, draft, random)?;
        let header = header.sign(&self.device_key);
        Ok(Composed::new(Entry { header, body }))
    }

    /// [`Self::compose`] for an entry signed later with the others this
    /// device writes to `log` meanwhile: one signature for the run
    /// ([`Self::sign_composed`]). Insert it into `log` at once
    /// ([`ChatLog::insert_composed`]); the log holds it back (no
    /// `Persist`) until it is signed, and it must not leave the device
    /// before.
    pub fn compose_unsigned(
        &mut self,
        log: &ChatLog,
        draft: Draft,
        random: [u8; 32],
    ) -> Result<Composed, MemberError> {
        let (header, body) = self.compose_parts(log, draft, random)?;
        Ok(Composed::new(Entry {
            header: header.unsigned(),
            body,
        }))
    }

    /// Signs the entries composed with [`Self::compose_unsigned`] since the
    /// last call, a run (of at most [`super::MAX_RUN`]) per signature, and says
    /// to persist each: from now on they may go anywhere.
    pub fn sign_composed(&self, log: &mut ChatLog) -> Vec<LogOutput> {
        let hashes = log.take_unsigned();
        let signed = sign_run(&hashes, &self.device_key);
        hashes
            .into_iter()
            .zip(signed)
            .filter_map(|(hash, (signature, run))| {
                let record = log.set_signature(&hash, signature, run)?;
                Some(LogOutput::Persist { hash, record })
            })
            .collect()
    }

    fn compose_parts(
        &mut self,
        log: &ChatLog,
        draft: Draft,
        random: [u8; 32],
    ) -> Result<(EntryHeader, Option<EntryBody>), MemberError> {
        let chat = log.chat();
        log.genesis().ok_or(MemberError::NoGenesis)?;
        let random = Randomness(random);
        let parents = self.parents_for(log);
        let membership = log.membership_for_parents(&parents);
        if !membership.is_member(&self.account) {
            return Err(MemberError::NotMember);
        }
        let epoch = membership.epoch();
        let lamport = parents
            .iter()
            .filter_map(|p| log.lamport(p))
            .max()
            .unwrap_or(0)
            .saturating_add(1);

        let (kind, content) = match draft {
            Draft::Text { text, reply_to } => (
                EntryKind::Message,
                Some(Content::Text {
                    text: checked(&text)?,
                    reply_to,
                }),
            ),
            Draft::Title { text } => (
                EntryKind::Message,
                Some(Content::Title {
                    text: checked(&text)?,
                }),
            ),
            Draft::Edit { target, text } => {
                let original = self.decrypt(log, &target)?;
                let author = log
                    .get(&target)
                    .map(|e| e.header.author_account())
                    .ok_or(MemberError::UnknownEntry(target))?;
                if author != self.account || !matches!(original, Content::Text { .. }) {
                    return Err(MemberError::NotEditable);
                }
                (
                    EntryKind::Message,
                    Some(Content::Edit {
                        target,
                        text: checked(&text)?,
                    }),
                )
            }
            Draft::Read => (
                EntryKind::Message,
                Some(Content::Read {
                    up_to: parents.clone(),
                }),
            ),
            Draft::Delete { target } => {
                let targets = self.purge_targets(log, &membership, target)?;
                (EntryKind::Purge { targets }, None)
            }
            Draft::AddMember {
                account,
                encryption_key,
            } => {
                let key = self
                    .key_for(log, membership.key_path())
                    .ok_or(MemberError::NoKey)?;
                let member = MemberGrant {
                    account,
                    encryption_key,
                    wrapped_key: key.wrap_to(
                        &encryption_key,
                        chat,
                        epoch,
                        &random.derive("wrap"),
                    )?,
                };
                let kind = EntryKind::AddMember { member };
                membership.authorise(&self.account, &kind)?;
                (kind, None)
            }
            Draft::RemoveMember { account } => {
                let probe = EntryKind::RemoveMember {
                    account,
                    new_epoch: 0,
                    grants: Vec::new(),
                };
                membership.authorise(&self.account, &probe)?;
                let (new_epoch, grants) =
                    rotation_grants(&membership, Some(&account), None, chat, &random)?;
                (
                    EntryKind::RemoveMember {
                        account,
                        new_epoch,
                        grants,
                    },
                    None,
                )
            }
            Draft::Rekey => {
                let (new_epoch, grants) = rotation_grants(&membership, None, None, chat, &random)?;
                (EntryKind::Rekey { new_epoch, grants }, None)
            }
            Draft::AccountKey { keep, revoked } => {
                membership.authorise(
                    &self.account,
                    &EntryKind::Rekey {
                        new_epoch: 0,
                        grants: Vec::new(),
                    },
                )?;
                let (generation, current) = self.current();
                let encryption_key = current.public();
                let (new_epoch, grants) = rotation_grants(
                    &membership,
                    None,
                    Some((&self.account, &encryption_key)),
                    chat,
                    &random,
                )?;
                // Never back to a device revoked before, whatever the
                // caller's list says: the chat knows.
                let mut devices = vec![self.device()];
                for device in keep {
                    if !devices.contains(&device)
                        && !membership.is_revoked_device(&device, &self.account)
                    {
                        devices.push(device);
                    }
                }
                let wrap_random = random.derive("device wrap");
                let devices = devices
                    .iter()
                    .map(|device| {
                        Ok(DeviceKeyGrant {
                            device: *device,
                            wrapped_key: current.seal_to_device(
                                device,
                                chat,
                                new_epoch,
                                &wrap_random,
                            )?,
                        })
                    })
                    .collect::<Result<Vec<_>, KeyError>>()?;
                let change = AccountKeyChange {
                    generation: *generation,
                    encryption_key,
                    devices,
                    revoked,
                };
                (
                    EntryKind::AccountKey {
                        new_epoch,
                        grants,
                        change,
                    },
                    None,
                )
            }
            Draft::Storage { peers, quorum } => {
                check_storage_set(&peers, quorum)?;
                if !membership.may_set_storage(&self.account) {
                    return Err(MemberError::NotAllowedToSetStorage);
                }
                (EntryKind::Storage { peers, quorum }, None)
            }
        };

        let body = match content {
            Some(content) => {
                let key = self
                    .key_for(log, membership.key_path())
                    .ok_or(MemberError::NoKey)?;
                Some(self.seal(&key, chat, epoch, &content, &random))
            }
            None => None,
        };
        let header = EntryHeader {
            chat,
            author: self.certificate.clone(),
            parents,
            seq: log.next_seq(&self.certificate.device),
            lamport,
            epoch,
            kind,
            body_hash: body.as_ref().map(|b| b.hash()),
        };
        Ok((header, body))
    }

    /// The latest heads (at most 16), plus this device's previous entry,
    /// which every entry must name so a device's entries form a chain.
    fn parents_for(&self, log: &ChatLog) -> Vec<EntryHash> {
        let heads = log.heads();
        let skip = heads.len().saturating_sub(MAX_PARENTS);
        let mut parents: Vec<EntryHash> = heads.into_iter().skip(skip).collect();
        if let Some(own) = log.last_of_device(&self.certificate.device)
            && !parents.contains(&own)
        {
            if parents.len() == MAX_PARENTS {
                parents.remove(0);
            }
            parents.push(own);
        }
        parents
    }

    fn seal(
        &self,
        key: &ChatKey,
        chat: ChatId,
        epoch: u32,
        content: &Content,
        random: &Randomness,
    ) -> super::entry::EntryBody {
        let context = BodyContext {
            chat,
            epoch,
            author: self.certificate.device,
        };
        key.seal_body(&context, random.nonce(), &content.to_padded())
    }

    /// The message and the edits of it (same author), if this account may
    /// delete it for everyone.
    fn purge_targets(
        &mut self,
        log: &ChatLog,
        membership: &Membership,
        target: EntryHash,
    ) -> Result<Vec<EntryHash>, MemberError> {
        let entry = log.get(&target).ok_or(MemberError::UnknownEntry(target))?;
        let author = entry.header.author_account();
        if !matches!(entry.header.header.kind, EntryKind::Message)
            || log.is_purged(&target)
            || !membership.may_purge(&self.account, &author)
        {
            return Err(MemberError::NotAllowedToDelete);
        }
        let mut targets = vec![target];
        let candidates: Vec<EntryHash> = log
            .in_display_order()
            .filter(|(h, e)| {
                e.header.author_account() == author && e.body.is_some() && *h != target
            })
            .map(|(h, _)| h)
            .collect();
        for hash in candidates {
            if targets.len() == MAX_PURGE_TARGETS {
                break;
            }
            if let Ok(Content::Edit { target: t, .. }) = self.decrypt(log, &hash)
                && t == target
            {
                targets.push(hash);
            }
        }
        Ok(targets)
    }

    /// The content of one entry.
    pub fn decrypt(&mut self, log: &ChatLog, hash: &EntryHash) -> Result<Content, MemberError> {
        let entry = log.get(hash).ok_or(MemberError::UnknownEntry(*hash))?;
        let body = entry.body.as_ref().ok_or(MemberError::NoBody(*hash))?;
        let membership = log
            .membership_for(hash)
            .ok_or(MemberError::UnknownEntry(*hash))?;
        let key_path: Vec<EntryHash> =
            if matches!(entry.header.header.kind, EntryKind::Genesis { .. }) {
                vec![*hash]
            } else {
                membership.key_path().to_vec()
            };
        let key = self.key_for(log, &key_path).ok_or(MemberError::NoKey)?;
        let header = &entry.header.header;
        let context = BodyContext {
            chat: header.chat,
            epoch: header.epoch,
            author: header.author.device,
        };
        let plaintext = key.open_body(&context, body)?;
        Ok(Content::from_plaintext(&plaintext)?)
    }

    /// The chat key for a key path (genesis, then rotations), if this
    /// account can find it in the log.
    fn key_for(&mut self, log: &ChatLog, path: &[EntryHash]) -> Option<ChatKey> {
        for end in 1..=path.len() {
            let prefix = &path[..end];
            if self.keys.contains_key(prefix) {
                continue;
            }
            if let Some(key) = self.find_key(log, prefix) {
                self.keys.insert(prefix.to_vec(), key);
            }
        }
        self.keys.get(path).cloned()
    }

    fn find_key(&mut self, log: &ChatLog, path: &[EntryHash]) -> Option<ChatKey> {
        let chat = log.chat();
        // An addition of this account made under exactly this key.
        for addition in log.additions() {
            let Some(entry) = log.get(addition) else {
                continue;
            };
            let EntryKind::AddMember { member } = &entry.header.header.kind else {
                continue;
            };
            if member.account == self.account
                && log.membership_for(addition).map(|m| m.key_path()) == Some(path)
                && let Some(key) =
                    self.unwrap_any(&member.wrapped_key, chat, entry.header.header.epoch)
            {
                return Some(key);
            }
        }
        let (last, before) = path.split_last()?;
        let entry = log.get(last)?;
        match &entry.header.header.kind {
            EntryKind::Genesis { members, .. } if before.is_empty() => {
                let grant = members.iter().find(|m| m.account == self.account)?;
                self.unwrap_any(&grant.wrapped_key, chat, 0)
            }
            EntryKind::RemoveMember {
                new_epoch, grants, ..
            }
            | EntryKind::Rekey { new_epoch, grants } => {
                let previous = self.keys.get(before)?;
                let grant = grants.iter().find(|g| g.account == self.account)?;
                let fresh = self.unwrap_any(&grant.wrapped_key, chat, *new_epoch)?;
                Some(previous.rotate(&fresh))
            }
            EntryKind::AccountKey {
                new_epoch,
                grants,
                change,
            } => {
                let previous = self.keys.get(before)?.clone();
                if entry.header.author_account() == self.account
                    && !self.holds(&change.encryption_key)
                {
                    // Another device of this account revoked one: the new
                    // key is sealed to each device that stays.
                    let sealed = change.devices.iter().find(|g| g.device == self.device())?;
                    let key = AccountEncryptionKey::open_from_device(
                        &self.device_key,
                        &sealed.wrapped_key,
                        &change.encryption_key,
                        chat,
                        *new_epoch,
                    )
                    .ok()?;
                    let again = AccountEncryptionKey::from_secret_bytes(&key.secret_bytes());
                    if self.add_encryption_key(change.generation, key) {
                        self.learned.push((change.generation, again));
                    }
                }
                let grant = grants.iter().find(|g| g.account == self.account)?;
                let fresh = self.unwrap_any(&grant.wrapped_key, chat, *new_epoch)?;
                Some(previous.rotate(&fresh))
            }
            _ => None,
        }
    }

    /// The chat as the user sees it: messages in display order with edits
    /// applied, purged messages absent, receipts folded into `read_by`.
    ///
    /// Membership changes take effect in display order here too: a message
    /// whose author is no longer a member at its place in that order (it
    /// was written concurrently with the author's removal) is not shown.
    pub fn history(&mut self, log: &ChatLog) -> ChatHistory {
        let mut history = ChatHistory::default();
        let mut running = Membership::default();
        let mut index: HashMap<EntryHash, usize> = HashMap::new();
        let mut receipts: BTreeMap<AccountId, Vec<EntryHash>> = BTreeMap::new();

        let order: Vec<(EntryHash, AccountId, DevicePublicKey, bool, bool)> = log
            .in_display_order()
            .map(|(h, e)| {
                let kind = &e.header.header.kind;
                (
                    h,
                    e.header.author_account(),
                    e.header.author_device(),
                    kind.changes_membership(),
                    matches!(kind, EntryKind::Message | EntryKind::Genesis { .. })
                        && e.body.is_some(),
                )
            })
            .collect();
        for (hash, author, device, changes_membership, has_body) in order {
            if changes_membership && let Some(entry) = log.get(&hash) {
                running.apply(hash, &author, &device, &entry.header.header.kind);
            }
            if !has_body
                || log.is_purged(&hash)
                || !running.is_member(&author)
                || running.is_revoked_device(&device, &author)
            {
                continue;
            }
            let content = match self.decrypt(log, &hash) {
                Ok(content) => content,
                Err(_) => {
                    history.unreadable += 1;
                    continue;
                }
            };
            match content {
                Content::Title { text } => history.title = Some(text),
                Content::Text { text, reply_to } => {
                    let device = log
                        .get(&hash)
                        .map(|e| e.header.author_device())
                        .unwrap_or(self.certificate.device);
                    index.insert(hash, history.messages.len());
                    history.messages.push(DisplayedMessage {
                        entry: hash,
                        author,
                        device,
                        text,
                        reply_to,
                        edited: false,
                        read_by: Vec::new(),
                    });
                }
                Content::Edit { target, text } => {
                    if let Some(message) = index
                        .get(&target)
                        .and_then(|i| history.messages.get_mut(*i))
                        && message.author == author
                    {
                        message.text = text;
                        message.edited = true;
                    }
                }
                Content::Read { up_to } => receipts.entry(author).or_default().extend(up_to),
            }
        }

        for (reader, up_to) in receipts {
            let covered = log.ancestors_or_self(&up_to);
            for message in &mut history.messages {
                if message.author != reader && covered.contains(&message.entry) {
                    message.read_by.push(reader);
                }
            }
        }
        history
    }
}

impl std::fmt::Debug for ChatMember {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatMember")
            .field("account", &self.account)
            .field("device", &self.certificate.device)
            .field("keys", &self.keys.len())
            .finish()
    }
}

fn checked(text: &str) -> Result<String, MemberError> {
    if text.len() > MAX_TEXT {
        return Err(MemberError::TextTooLong(text.len()));
    }
    Ok(text.to_owned())
}

/// A fresh secret for the next epoch, wrapped to every member but
/// `leaving`; to `own`'s key instead of the one in force for that account.
fn rotation_grants(
    membership: &Membership,
    leaving: Option<&AccountId>,
    own: Option<(&AccountId, &EncryptionPublicKey)>,
    chat: ChatId,
    random: &Randomness,
) -> Result<(u32, Vec<KeyGrant>), MemberError> {
    let new_epoch = membership
        .epoch()
        .checked_add(1)
        .ok_or(MemberError::NoKey)?;
    let fresh = ChatKey::from_bytes(random.derive("fresh key"));
    let wrap_random = random.derive("wrap");
    let grants = membership
        .members()
        .filter(|(account, _)| Some(*account) != leaving)
        .map(|(account, encryption_key)| {
            let encryption_key = match own {
                Some((a, key)) if a == account => key,
                _ => encryption_key,
            };
            Ok(KeyGrant {
                account: *account,
                wrapped_key: fresh.wrap_to(encryption_key, chat, new_epoch, &wrap_random)?,
            })
        })
        .collect::<Result<Vec<_>, KeyError>>()?;
    Ok((new_epoch, grants))
}
