//! `tern secret ...` and `tern logout`: clients of the node's secret-chat
//! routes (contract: CLI.md).

use std::{io::Write, path::PathBuf};

use anyhow::{Context, bail};
use clap::{Args, Subcommand, ValueEnum};
use serde_json::Value;
use tern_protocol::secret::{Fingerprint, KeyPicture};

use super::{
    HistoryItem, KeyInfo, SecretInfo,
    api::{
        CountResponse, ForwardRequest, MessagesRequest, SendRequest, SendResponse, StartRequest,
        TimerRequest,
    },
};
use crate::{client::ApiClient, data_dir::DataDir};

#[derive(Subcommand, Debug)]
pub enum SecretCommand {
    /// Ask another device for a secret chat (ACCOUNT id or TICKET).
    Start {
        peer: String,
        #[arg(long)]
        json: bool,
    },
    /// Accept a secret chat request.
    Accept { id: String },
    /// Decline a secret chat request ("secret chat cancelled" on both).
    Decline { id: String },
    /// Close a secret chat on both devices.
    Close { id: String },
    /// List this device's secret chats.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Show the key visualisation to compare with the other person.
    Key(KeyArgs),
    /// Send a message.
    Send {
        id: String,
        text: String,
        #[arg(long)]
        json: bool,
    },
    /// Show the messages (marks them read: self-destruct timers start).
    History {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Set the self-destruct timer for messages sent from now on: 10s, 5m, 1d, 1w or off.
    Timer { id: String, duration: String },
    /// Delete messages on both devices.
    Delete {
        id: String,
        #[arg(required = true)]
        messages: Vec<String>,
    },
    /// Clear the history on both devices.
    Clear { id: String },
    /// Forwarding secret messages is not allowed; this says so.
    Forward {
        id: String,
        message: String,
        /// The chat to forward to.
        #[arg(long)]
        to: String,
    },
}

#[derive(Clone, Copy, Debug, Default, ValueEnum)]
pub enum KeyFormat {
    /// The picture drawn in the terminal, the emoji line and the short code.
    #[default]
    Picture,
    Emoji,
    Hex,
    Png,
    Svg,
    /// The 5-emoji short code, for reading aloud in a call.
    Short,
}

#[derive(Args, Debug)]
pub struct KeyArgs {
    pub id: String,
    #[arg(long, value_enum, default_value_t)]
    pub format: KeyFormat,
    /// Write to this file instead of standard output.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

fn path(id: &str, tail: &str) -> anyhow::Result<String> {
    // Ids are hex; anything else cannot name a chat and must not reach the URL.
    if id.is_empty() || !id.bytes().all(|b| b.is_ascii_hexdigit()) {
        bail!("{id:?} is not a secret chat id; see `tern secret list`");
    }
    Ok(format!("/v1/secret/{id}/{tail}"))
}

fn print_info(c: &SecretInfo) {
    let peer = c.peer.as_deref().unwrap_or(&c.peer_device);
    let name = if c.peer_name.is_empty() {
        String::new()
    } else {
        format!(" ({})", c.peer_name)
    };
    println!("{}  {:9}  {peer}{name}", c.secret_id, c.state);
}

pub async fn run(dir: &DataDir, cmd: SecretCommand) -> anyhow::Result<()> {
    let client = ApiClient::new(dir)?;
    match cmd {
        SecretCommand::Start { peer, json } => {
            let c: Value = client.post("/v1/secret", &StartRequest { peer }).await?;
            if json {
                println!("{c}");
            } else {
                let c: SecretInfo = serde_json::from_value(c)?;
                println!("{}", c.secret_id);
                eprintln!("waiting for the other device to accept");
            }
        }
        SecretCommand::Accept { id } => {
            let c: SecretInfo = client.post(&path(&id, "accept")?, &()).await?;
            if c.state == "active" {
                println!("secret chat {} is active", c.secret_id);
            } else if c.state == "pending" {
                println!(
                    "accepted; secret chat {} becomes active when the other device is reachable",
                    c.secret_id
                );
            } else {
                println!("secret chat {} is {}", c.secret_id, c.state);
            }
        }
        SecretCommand::Decline { id } => {
            let c: SecretInfo = client.post(&path(&id, "decline")?, &()).await?;
            println!("secret chat {} cancelled", c.secret_id);
        }
        SecretCommand::Close { id } => {
            let c: SecretInfo = client.post(&path(&id, "close")?, &()).await?;
            println!("secret chat {} is {}", c.secret_id, c.state);
        }
        SecretCommand::List { json } => {
            let all: Value = client.get("/v1/secret").await?;
            if json {
                println!("{all}");
            } else {
                let all: Vec<SecretInfo> = serde_json::from_value(all)?;
                if all.is_empty() {
                    println!("no secret chats");
                }
                for c in &all {
                    print_info(c);
                }
            }
        }
        SecretCommand::Key(args) => key(&client, args).await?,
        SecretCommand::Send { id, text, json } => {
            let r: Value = client
                .post(&path(&id, "messages")?, &SendRequest { text })
                .await?;
            if json {
                println!("{r}");
            } else {
                let r: SendResponse = serde_json::from_value(r)?;
                println!("{}", r.message_id);
            }
        }
        SecretCommand::History { id, json } => {
            let items: Value = client.get(&path(&id, "messages")?).await?;
            if json {
                println!("{items}");
            } else {
                let items: Vec<HistoryItem> = serde_json::from_value(items)?;
                for m in items {
                    let who = if m.from_me { "me  " } else { "them" };
                    let timer = m
                        .expires_at
                        .map(|t| format!("  (self-destructs {t})"))
                        .unwrap_or_default();
                    println!("{}  {who}  {}{timer}", m.id, m.text);
                }
            }
        }
        SecretCommand::Timer { id, duration } => {
            let c: SecretInfo = client
                .post(&path(&id, "timer")?, &TimerRequest { timer: duration })
                .await?;
            match c.timer_ms {
                Some(ms) => {
                    println!("messages sent from now on self-destruct {ms} ms after they are read")
                }
                None => println!("self-destruct timer off"),
            }
        }
        SecretCommand::Delete { id, messages } => {
            let r: CountResponse = client
                .post(&path(&id, "delete")?, &MessagesRequest { messages })
                .await?;
            println!("deleted {} message(s) on both devices", r.count);
        }
        SecretCommand::Clear { id } => {
            let r: CountResponse = client.post(&path(&id, "clear")?, &()).await?;
            println!("cleared {} message(s) on both devices", r.count);
        }
        SecretCommand::Forward { id, message, to } => {
            let _: CountResponse = client
                .post(&path(&id, "forward")?, &ForwardRequest { message, to })
                .await?;
        }
    }
    Ok(())
}

async fn key(client: &ApiClient, args: KeyArgs) -> anyhow::Result<()> {
    let k: KeyInfo = client.get(&path(&args.id, "key")?).await?;
    let bytes: [u8; 32] = data_encoding::HEXLOWER
        .decode(k.hex.replace(' ', "").as_bytes())
        .ok()
        .and_then(|b| b.try_into().ok())
        .context("the node sent a malformed fingerprint")?;
    let fp = Fingerprint::from_bytes(bytes);
    let picture = KeyPicture::new(&fp);
    let short = match (&k.short_code, k.short_code_failed) {
        (_, true) => "TAMPERED: the short-code exchange failed; do not trust this chat".to_owned(),
        (Some(s), _) => s.clone(),
        (None, _) => "(not yet exchanged)".to_owned(),
    };
    let out: Vec<u8> = match args.format {
        KeyFormat::Picture => format!(
            "{}\n{}\n\nshort code: {short}\n",
            picture.terminal(),
            fp.emoji_line()
        )
        .into_bytes(),
        KeyFormat::Emoji => format!("{}\n", fp.emoji_line()).into_bytes(),
        KeyFormat::Hex => format!("{}\n", fp.hex()).into_bytes(),
        KeyFormat::Short => format!("{short}\n").into_bytes(),
        KeyFormat::Svg => picture.svg().into_bytes(),
        KeyFormat::Png => picture.png(16),
    };
    match args.out {
        Some(file) => std::fs::write(&file, &out)
            .with_context(|| format!("cannot write {}", file.display()))?,
        None => std::io::stdout().write_all(&out)?,
    }
    Ok(())
}

pub async fn logout(dir: &DataDir) -> anyhow::Result<()> {
    let r: CountResponse = ApiClient::new(dir)?.post("/v1/logout", &()).await?;
    println!(
        "logged out: {} secret chat(s) closed and erased from this device",
        r.count
    );
    Ok(())
}
