//! Helpers for the node's unit tests.

use std::path::{Path, PathBuf};

use ed25519_dalek::SigningKey;
use tern_protocol::{
    AccountKeypair, DevicePublicKey,
    cloud::{ChatId, ChatLog, ChatMember, Draft, Entry},
};

/// Every file under `dir` (recursively) whose bytes contain `needle`: how
/// tests check that deleted or secret data is really not on disk.
pub fn files_containing(dir: &Path, needle: &[u8]) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if std::fs::read(&p)
                .unwrap_or_default()
                .windows(needle.len())
                .any(|w| w == needle)
            {
                found.push(p);
            }
        }
    }
    found
}

fn member(seed: u8) -> ChatMember {
    let account = AccountKeypair::from_secret_bytes(&[seed; 32]);
    let key = SigningKey::from_bytes(&[seed.wrapping_add(50); 32]);
    let public = DevicePublicKey::from_bytes(key.verifying_key().to_bytes()).unwrap();
    let cert = account.certify(public, "phone", 1).unwrap();
    ChatMember::for_account(&account, key, cert).unwrap()
}

/// A real chat's first `n` entries (genesis, then messages).
pub fn chat_entries(n: usize) -> Vec<Entry> {
    let mut alice = member(1);
    let bob = member(2);
    let bob_id = AccountKeypair::from_secret_bytes(&[2; 32]).id();
    let chat = ChatId([9; 16]);
    let mut log = ChatLog::new(chat);
    let genesis = alice
        .create(
            chat,
            &[(bob_id, bob.encryption_key())],
            vec![],
            None,
            [3; 32],
        )
        .unwrap();
    log.insert(genesis.clone()).unwrap();
    let mut out = vec![genesis.into_entry()];
    for i in 1..n {
        let draft = Draft::Text {
            text: format!("message {i}"),
            reply_to: None,
        };
        let e = alice.compose(&log, draft, [i as u8; 32]).unwrap();
        log.insert(e.clone()).unwrap();
        out.push(e.into_entry());
    }
    out
}
