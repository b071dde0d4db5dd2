//! `tern host ...`: whom this node stores cloud chats for.

use clap::Subcommand;
use serde_json::Value;

use super::{api::AccountRequest, hosting::HostStatus};
use crate::{client::ApiClient, data_dir::DataDir};

#[derive(Subcommand, Debug)]
pub enum HostCommand {
    /// Store cloud chats for this account.
    Allow { account: String },
    /// Never store cloud chats for this account (also in open mode).
    Deny { account: String },
    /// Show the mode, the quota and the lists.
    List {
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(dir: &DataDir, cmd: HostCommand) -> anyhow::Result<()> {
    let client = ApiClient::new(dir)?;
    match cmd {
        HostCommand::Allow { account } => {
            let _: HostStatus = client
                .post(
                    "/v1/host/allow",
                    &AccountRequest {
                        account: account.clone(),
                    },
                )
                .await?;
            println!("this node now stores cloud chats for {account}");
        }
        HostCommand::Deny { account } => {
            let _: HostStatus = client
                .post(
                    "/v1/host/deny",
                    &AccountRequest {
                        account: account.clone(),
                    },
                )
                .await?;
            println!("this node no longer stores cloud chats for {account}");
        }
        HostCommand::List { json } => {
            let s: Value = client.get("/v1/host").await?;
            if json {
                println!("{s}");
                return Ok(());
            }
            let s: HostStatus = serde_json::from_value(s)?;
            println!("mode     {}", s.mode);
            println!("quota    {} MiB", s.quota_bytes / (1024 * 1024));
            for a in &s.allowed {
                println!("allowed  {a}");
            }
            for a in &s.denied {
                println!("denied   {a}");
            }
        }
    }
    Ok(())
}

// ------------------------------------------------------------ tern chat

use super::{
    ChatInfo, MessageView, ReplicaView, SendReceipt,
    api::{
        ClearRequest, CountResponse, DeleteRequest, EditRequest, NewChatRequest, SendRequest,
        StorageRequest,
    },
};

#[derive(Subcommand, Debug)]
pub enum ChatCommand {
    /// Start a cloud chat with one or more accounts (ids or tickets).
    New {
        #[arg(long, required = true, num_args = 1.., value_name = "ACCOUNT|TICKET")]
        with: Vec<String>,
        #[arg(long)]
        title: Option<String>,
        /// Storage peers (peer ids or multiaddrs ending in /p2p/PEER),
        /// comma-separated [default: the members' chosen storage peers]
        #[arg(long, value_delimiter = ',', value_name = "PEER,...")]
        storage: Option<Vec<String>>,
        /// How many storage peers must have a message on disk before it is
        /// `stored` [default: a majority]
        #[arg(long)]
        quorum: Option<u8>,
        #[arg(long)]
        json: bool,
    },
    /// This account's cloud chats.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Send a message; waits (up to 5 s) for the write quorum.
    Send {
        chat: String,
        text: String,
        #[arg(long, value_name = "MSG")]
        reply_to: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Show the messages, oldest first.
    History {
        chat: String,
        /// Only the last N.
        #[arg(long)]
        limit: Option<usize>,
        #[arg(long)]
        json: bool,
    },
    /// Change the text of a message you wrote.
    Edit {
        chat: String,
        message: String,
        text: String,
    },
    /// Delete messages: on this device, or with --for-everyone from every
    /// device and storage peer.
    Delete {
        chat: String,
        #[arg(required = true)]
        messages: Vec<String>,
        #[arg(long)]
        for_everyone: bool,
    },
    /// Delete every message: on this device, or with --for-everyone
    /// everywhere.
    Clear {
        chat: String,
        #[arg(long)]
        for_everyone: bool,
    },
    /// Mark everything shown as read (the senders see two checks).
    Read { chat: String },
    /// Each storage peer of the chat: entries, in sync, reachable.
    Replicas {
        chat: String,
        #[arg(long)]
        json: bool,
    },
    /// Change the chat's storage peers and write quorum.
    Storage {
        chat: String,
        #[arg(long, required = true, value_delimiter = ',', value_name = "PEER,...")]
        set: Vec<String>,
        #[arg(long)]
        quorum: Option<u8>,
    },
}

fn print_receipt(r: &SendReceipt) {
    println!("{}  {}", r.message_id, r.status);
    if r.status == "sending" {
        eprintln!(
            "quorum not reached ({} of {} storage peers have it, {} needed); it will be sent again when they return",
            r.acknowledged, r.storage_peers, r.quorum
        );
        for p in &r.problems {
            eprintln!("  {p}");
        }
    }
}

fn print_info(c: &ChatInfo) {
    println!(
        "{}  {}  {} messages  members {}  storage {} (quorum {})",
        c.chat_id,
        c.title.as_deref().unwrap_or("(untitled)"),
        c.messages,
        c.members.len(),
        c.storage.len(),
        c.quorum
    );
}

pub async fn run_chat(dir: &DataDir, cmd: ChatCommand) -> anyhow::Result<()> {
    let client = ApiClient::new(dir)?;
    let enc = |s: &str| -> anyhow::Result<String> {
        if s.is_empty() || !s.bytes().all(|b| b.is_ascii_alphanumeric()) {
            anyhow::bail!("{s:?} is not an id (letters and digits only)");
        }
        Ok(s.to_owned())
    };
    match cmd {
        ChatCommand::New {
            with,
            title,
            storage,
            quorum,
            json,
        } => {
            let c: Value = client
                .post(
                    "/v1/chats",
                    &NewChatRequest {
                        with,
                        title,
                        storage,
                        quorum,
                    },
                )
                .await?;
            if json {
                println!("{c}");
            } else {
                print_info(&serde_json::from_value(c)?);
            }
        }
        ChatCommand::List { json } => {
            let v: Value = client.get("/v1/chats").await?;
            if json {
                println!("{v}");
            } else {
                let chats: Vec<ChatInfo> = serde_json::from_value(v)?;
                if chats.is_empty() {
                    println!("no cloud chats yet; start one with `tern chat new --with ACCOUNT`");
                }
                chats.iter().for_each(print_info);
            }
        }
        ChatCommand::Send {
            chat,
            text,
            reply_to,
            json,
        } => {
            let path = format!("/v1/chats/{}/messages", enc(&chat)?);
            let r: Value = client
                .post(
                    &path,
                    &SendRequest {
                        text,
                        reply_to,
                        wait_ms: None,
                    },
                )
                .await?;
            if json {
                println!("{r}");
            } else {
                print_receipt(&serde_json::from_value(r)?);
            }
        }
        ChatCommand::History { chat, limit, json } => {
            let mut path = format!("/v1/chats/{}/messages", enc(&chat)?);
            if let Some(n) = limit {
                path.push_str(&format!("?limit={n}"));
            }
            let v: Value = client.get(&path).await?;
            if json {
                println!("{v}");
            } else {
                let messages: Vec<MessageView> = serde_json::from_value(v)?;
                for m in messages {
                    let checks = match m.status.as_str() {
                        "read" => "✓✓",
                        "stored" => "✓ ",
                        _ => "… ",
                    };
                    let who = if m.from_me { "me" } else { &m.author[..10] };
                    let edited = if m.edited { " (edited)" } else { "" };
                    println!("{} {checks} {who:>10}: {}{edited}", &m.id[..12], m.text);
                }
            }
        }
        ChatCommand::Edit {
            chat,
            message,
            text,
        } => {
            let path = format!("/v1/chats/{}/messages/{}/edit", enc(&chat)?, enc(&message)?);
            let r: SendReceipt = client.post(&path, &EditRequest { text }).await?;
            print_receipt(&r);
        }
        ChatCommand::Delete {
            chat,
            messages,
            for_everyone,
        } => {
            let path = format!("/v1/chats/{}/delete", enc(&chat)?);
            let r: CountResponse = client
                .post(
                    &path,
                    &DeleteRequest {
                        messages,
                        for_everyone,
                    },
                )
                .await?;
            let scope = if for_everyone {
                "for everyone"
            } else {
                "on this device"
            };
            println!("deleted {} message(s) {scope}", r.count);
        }
        ChatCommand::Clear { chat, for_everyone } => {
            let path = format!("/v1/chats/{}/clear", enc(&chat)?);
            let r: CountResponse = client.post(&path, &ClearRequest { for_everyone }).await?;
            let scope = if for_everyone {
                "for everyone"
            } else {
                "on this device"
            };
            println!("cleared {} message(s) {scope}", r.count);
        }
        ChatCommand::Read { chat } => {
            let path = format!("/v1/chats/{}/read", enc(&chat)?);
            let r: Option<SendReceipt> = client.post(&path, &serde_json::json!({})).await?;
            match r {
                Some(r) => print_receipt(&r),
                None => println!("nothing new to mark read"),
            }
        }
        ChatCommand::Replicas { chat, json } => {
            let path = format!("/v1/chats/{}/replicas", enc(&chat)?);
            let v: Value = client.get(&path).await?;
            if json {
                println!("{v}");
            } else {
                let views: Vec<ReplicaView> = serde_json::from_value(v)?;
                for r in views {
                    println!(
                        "{}  {:>7} entries  {}  {}{}",
                        r.peer_id,
                        r.entries,
                        if r.in_sync { "in sync" } else { "behind " },
                        if r.reachable {
                            "reachable"
                        } else {
                            "unreachable"
                        },
                        if r.this_node { "  (this node)" } else { "" }
                    );
                    if let Some(e) = r.error {
                        println!("    {e}");
                    }
                }
            }
        }
        ChatCommand::Storage { chat, set, quorum } => {
            let path = format!("/v1/chats/{}/storage", enc(&chat)?);
            let c: ChatInfo = client
                .post(&path, &StorageRequest { peers: set, quorum })
                .await?;
            print_info(&c);
        }
    }
    Ok(())
}
