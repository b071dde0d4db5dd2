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
