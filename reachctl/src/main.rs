//! `reachctl`: the operator command line of Reach Fleet.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use reach_shared::provision::ProvisioningFile;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::{CommonSettings, Env};
use reach_shared::{db, telemetry};

#[derive(Parser)]
#[command(name = "reachctl", version, about = "Operate a Reach Fleet deployment")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply every pending database migration (reads DATABASE_URL).
    Migrate,
    /// Apply a provisioning file: orgs, WABAs, phone numbers, webhook subscriptions.
    /// Applying the same file twice changes nothing.
    Provision {
        /// Path of the provisioning JSON file.
        #[arg(long)]
        file: PathBuf,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logs("reachctl");
    let cli = Cli::parse();
    let env = Env::process();
    let common = CommonSettings::from_env(&env, "127.0.0.1:0")?;
    let pool = db::connect(&common.database_url, 2).await?;
    match cli.command {
        Command::Migrate => {
            db::migrate(&pool).await?;
            report(&serde_json::json!({"migrated": true}));
        }
        Command::Provision { file } => {
            let text = std::fs::read_to_string(&file).with_context(|| format!("failed to read {}", file.display()))?;
            let provisioning = ProvisioningFile::parse(&text)?;
            let sealer = SecretSealer::from_env(&env, common.environment)?;
            let written = provisioning.apply(&pool, &sealer).await?;
            report(&serde_json::json!({"provisioned": written}));
        }
    }
    Ok(())
}

/// Prints the command's result as one JSON line on stdout, for scripts.
#[allow(clippy::print_stdout)]
fn report(value: &serde_json::Value) {
    println!("{value}");
}
