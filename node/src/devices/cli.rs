//! `tern device …` and `tern init --link CODE`.

use anyhow::Context;
use clap::Subcommand;
use libp2p::{Multiaddr, identity};
use serde_json::Value;
use tern_protocol::{Record, cloud::AccountEncryptionKey, link::LinkCode};

use super::{
    DeviceView, KEYSPACE, StoredDevice,
    api::{LinkCodeResponse, RevokeRequest},
    join::join,
};
use crate::{
    cli::{InitArgs, host_name, init_with_identity},
    client::ApiClient,
    cloud::account_keys::AccountKeys,
    config::Config,
    data_dir::DataDir,
    keys::{self, Identity},
    store::Store,
};

#[derive(Subcommand, Debug)]
pub enum DeviceCommand {
    /// Print a one-time code that makes another data directory a device of
    /// this account (run `tern init --link CODE` there within 10 minutes).
    Link {
        /// Print one JSON document (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// List this account's devices.
    List {
        /// Print one JSON document (for scripts).
        #[arg(long)]
        json: bool,
    },
    /// Leave a device out of this account's record from now on.
    Revoke {
        /// The device's peer id, or enough of its start to name one device.
        device: String,
    },
}

pub async fn run(dir: &DataDir, cmd: DeviceCommand) -> anyhow::Result<()> {
    let client = ApiClient::new(dir)?;
    match cmd {
        DeviceCommand::Link { json } => {
            let r: Value = client
                .post("/v1/devices/link", &serde_json::json!({}))
                .await?;
            if json {
                println!("{r}");
                return Ok(());
            }
            let r: LinkCodeResponse = serde_json::from_value(r)?;
            println!("{}", r.code);
            eprintln!(
                "On the new device, within {} minutes: tern init --link CODE (the code works once)",
                r.expires_in_secs.div_ceil(60)
            );
        }
        DeviceCommand::List { json } => {
            let v: Value = client.get("/v1/devices").await?;
            if json {
                println!("{v}");
                return Ok(());
            }
            let devices: Vec<DeviceView> = serde_json::from_value(v)?;
            for d in devices {
                let note = match (d.this_device, d.revoked) {
                    (true, _) => "  (this device)",
                    (false, true) => "  (revoked)",
                    (false, false) => "",
                };
                println!("{}  {}{note}", d.device, d.name);
            }
        }
        DeviceCommand::Revoke { device } => {
            let r: super::api::RevokeResponse = client
                .post("/v1/devices/revoke", &RevokeRequest { device })
                .await?;
            let d = r.device;
            println!(
                "revoked {} ({}): this device's account record no longer lists it; new keys in {} cloud chat(s)",
                d.device, d.name, r.chats_rekeyed
            );
            eprintln!(
                "note: it still holds the account key, so it could unwrap the new keys too; cutting it off needs a new account encryption key, which is not built yet"
            );
        }
    }
    Ok(())
}

/// `tern init --link CODE`: joins the account of the device that issued the
/// code. Everything that can be checked locally is checked before the code
/// is used, since any attempt uses it up.
pub async fn init_linked(dir: &DataDir, args: InitArgs) -> anyhow::Result<()> {
    let code: LinkCode = args.link.as_deref().unwrap_or_default().parse()?;
    if dir.is_initialized() {
        return Err(keys::KeyError::AlreadyInitialized(dir.root().display().to_string()).into());
    }
    let name = args.name.unwrap_or_else(host_name);
    let mut config = Config {
        name: name.clone(),
        ..Config::default()
    };
    config.validate()?;
    let passphrase = args
        .passphrase_file
        .as_deref()
        .map(keys::read_passphrase_file)
        .transpose()?;

    let device = identity::Keypair::generate_ed25519();
    let joined = join(&code, &device, &name).await?;
    config.bootstrap = joined
        .grant
        .bootstrap
        .iter()
        .filter_map(|a| Multiaddr::try_from(a.clone()).ok())
        .collect();
    let identity = Identity {
        account: joined.account,
        device,
        certificate: joined.grant.certificate.clone(),
    };
    let store_existed = dir.store().exists();
    let identity = init_with_identity(
        dir,
        config,
        passphrase.as_deref().map(|p| p.as_slice()),
        |dir, _, pass| Ok(keys::create_linked(dir, identity, pass)?),
    )?;
    if let Err(e) = keep_devices(
        dir,
        &joined.grant.devices,
        &joined.grant.account_keys,
        &identity,
    )
    .await
    {
        // Leave nothing half-made.
        for f in dir.init_files() {
            let _ = std::fs::remove_file(f);
        }
        if !store_existed {
            let _ = std::fs::remove_dir_all(dir.store());
        }
        return Err(e);
    }
    println!("account   {} (linked)", identity.account_id());
    println!("device    {} ({name})", identity.peer_id());
    println!("data dir  {}", dir.root().display());
    println!("next      tern node --data-dir {}", dir.root().display());
    Ok(())
}

/// Writes the account's devices and later encryption keys, as the linker
/// sent them, into the store.
async fn keep_devices(
    dir: &DataDir,
    devices: &[tern_protocol::DeviceCertificate],
    account_keys: &[(u32, [u8; 32])],
    identity: &Identity,
) -> anyhow::Result<()> {
    let store = Store::open(&dir.store(), 8 * 1024 * 1024)
        .with_context(|| format!("cannot open the store in {}", dir.root().display()))?;
    let signing_key = keys::device_signing_key(&identity.device)
        .context("the device key is not an Ed25519 key")?;
    let (kept, _) = AccountKeys::load(store.keyspace("account_keys")?, signing_key);
    for (generation, secret) in account_keys {
        kept.keep(
            *generation,
            &AccountEncryptionKey::from_secret_bytes(secret),
        )
        .map_err(anyhow::Error::msg)?;
    }
    let ks = store.keyspace(KEYSPACE)?;
    for certificate in devices {
        let d = StoredDevice {
            certificate: certificate.clone(),
            revoked_at_ms: None,
        };
        ks.insert_soon(certificate.device.as_bytes(), &d.encode())?;
    }
    store.flush().await?;
    Ok(())
}
