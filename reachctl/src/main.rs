//! `reachctl`: the operator command line of Reach Fleet.

use std::path::PathBuf;

use anyhow::Context;
use chrono::{DateTime, Utc};
use clap::{Parser, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};
use reach_shared::audit::{self, AuditEvent};
use reach_shared::{parked, parked_messages};
use reach_shared::provision::ProvisioningFile;
use reach_shared::secrets::SecretSealer;
use reach_shared::settings::{CommonSettings, Env};
use reach_shared::{db, health, telemetry};
use uuid::Uuid;

#[derive(Parser)]
#[command(name = "reachctl", version, about = "Operate a Reach Fleet deployment (reads DATABASE_URL)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Apply every pending database migration.
    Migrate,
    /// Apply a provisioning file: orgs, WABAs, phone numbers, webhook subscriptions.
    /// Applying the same file twice changes nothing.
    Provision {
        /// Path of the provisioning JSON file.
        #[arg(long)]
        file: PathBuf,
    },
    /// Print the health figures of /platform/health as JSON (audited).
    Health {
        #[command(flatten)]
        operator: Operator,
    },
    /// List or replay parked webhook deliveries.
    Parked {
        #[command(subcommand)]
        command: ParkedCommand,
    },
    /// List or replay parked outbound messages (failed after their retries ran out).
    Messages {
        #[command(subcommand)]
        command: MessagesCommand,
    },
    /// Resume sending for a phone number paused after an account-level error.
    PhoneNumbers {
        #[command(subcommand)]
        command: PhoneNumbersCommand,
    },
}

#[derive(Subcommand)]
enum MessagesCommand {
    /// List parked messages as JSON lines, oldest first.
    Parked {
        #[command(flatten)]
        selection: MessageSelectionArgs,
        /// Maximum number of messages listed.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Queue parked messages again with a fresh attempt count.
    Replay {
        #[command(flatten)]
        selection: MessageSelectionArgs,
        /// Reason for the replay, recorded in the audit log. Required.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        operator: Operator,
        /// Send shard queues of the deployment (REACH_SEND_SHARDS).
        #[arg(long, env = "REACH_SEND_SHARDS", default_value_t = 8)]
        send_shards: u16,
    },
}

#[derive(clap::Args)]
struct MessageSelectionArgs {
    /// Message id; repeat for several.
    #[arg(long = "id")]
    ids: Vec<Uuid>,
    /// Only messages of this org.
    #[arg(long = "org")]
    org_id: Option<Uuid>,
    /// Only messages from this phone number id.
    #[arg(long = "phone-number")]
    phone_number_id: Option<String>,
    /// Parked at or after this time (RFC 3339).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Parked before this time (RFC 3339).
    #[arg(long)]
    until: Option<DateTime<Utc>>,
}

impl From<MessageSelectionArgs> for parked_messages::Selection {
    fn from(args: MessageSelectionArgs) -> Self {
        Self { ids: args.ids, org_id: args.org_id, phone_number_id: args.phone_number_id, since: args.since, until: args.until }
    }
}

#[derive(Subcommand)]
enum PhoneNumbersCommand {
    /// End a sending pause now; the number's waiting messages are queued again.
    Resume {
        /// The phone number id.
        phone_number_id: String,
        /// Reason for resuming, recorded in the audit log. Required.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        operator: Operator,
    },
}

#[derive(clap::Args)]
struct Operator {
    /// Name of the operator running the command, recorded in the audit log.
    #[arg(long, env = "REACH_OPERATOR")]
    actor: String,
}

#[derive(Subcommand)]
enum ParkedCommand {
    /// List parked deliveries as JSON lines, oldest first.
    List {
        #[command(flatten)]
        selection: SelectionArgs,
        /// Maximum number of deliveries listed.
        #[arg(long, default_value_t = 100)]
        limit: i64,
    },
    /// Put parked deliveries back to pending with a fresh retry schedule.
    Replay {
        #[command(flatten)]
        selection: SelectionArgs,
        /// Reason for the replay, recorded in the audit log. Required.
        #[arg(long)]
        reason: String,
        #[command(flatten)]
        operator: Operator,
    },
}

#[derive(clap::Args)]
struct SelectionArgs {
    /// Delivery id; repeat for several.
    #[arg(long = "id")]
    ids: Vec<i64>,
    /// Only deliveries of this org.
    #[arg(long = "org")]
    org_id: Option<Uuid>,
    /// Only deliveries of this subscription.
    #[arg(long = "subscription")]
    subscription_id: Option<Uuid>,
    /// Parked at or after this time (RFC 3339, for example 2026-12-04T10:00:00Z).
    #[arg(long)]
    since: Option<DateTime<Utc>>,
    /// Parked before this time (RFC 3339).
    #[arg(long)]
    until: Option<DateTime<Utc>>,
}

impl From<SelectionArgs> for parked::Selection {
    fn from(args: SelectionArgs) -> Self {
        Self { ids: args.ids, org_id: args.org_id, subscription_id: args.subscription_id, since: args.since, until: args.until }
    }
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
        Command::Health { operator } => {
            let figures = health::report(&pool).await?;
            let event = AuditEvent {
                actor_user_id: Some(operator.actor),
                action: "PlatformHealth.Show".to_owned(),
                target_type: Some("platform".to_owned()),
                target_id: Some("health".to_owned()),
                user_agent: Some(concat!("reachctl/", env!("CARGO_PKG_VERSION")).to_owned()),
                status_code: 200,
                ..AuditEvent::default()
            };
            audit::record(&pool, &event).await.context("failed to write the audit event")?;
            report(&serde_json::to_value(figures)?);
        }
        Command::Parked { command: ParkedCommand::List { selection, limit } } => {
            for delivery in parked::list(&pool, &selection.into(), limit).await? {
                report(&serde_json::to_value(delivery)?);
            }
        }
        Command::Parked { command: ParkedCommand::Replay { selection, reason, operator } } => {
            let bar = if std::io::IsTerminal::is_terminal(&std::io::stderr()) { ProgressBar::new(0) } else { ProgressBar::hidden() };
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {pos}/{len} deliveries replayed ({per_sec}, {eta} left)")
                    .expect("the progress template is valid"),
            );
            let requester = parked::Requester {
                user_id: operator.actor,
                user_agent: Some(concat!("reachctl/", env!("CARGO_PKG_VERSION")).to_owned()),
                ..parked::Requester::default()
            };
            let replayed = parked::replay(&pool, &selection.into(), &reason, &requester, |progress| match progress {
                parked::Progress::Total(total) => bar.set_length(total),
                parked::Progress::Replayed(done) => bar.set_position(done),
            })
            .await?;
            bar.finish();
            report(&serde_json::to_value(replayed)?);
        }
        Command::Messages { command: MessagesCommand::Parked { selection, limit } } => {
            for message in parked_messages::list(&pool, &selection.into(), limit).await? {
                report(&serde_json::to_value(message)?);
            }
        }
        Command::Messages { command: MessagesCommand::Replay { selection, reason, operator, send_shards } } => {
            let replayed = parked_messages::replay(&pool, &selection.into(), &reason, &operator.actor, send_shards).await?;
            report(&serde_json::json!({"replayed": replayed}));
        }
        Command::PhoneNumbers { command: PhoneNumbersCommand::Resume { phone_number_id, reason, operator } } => {
            let resumed = parked_messages::resume_phone_number(&pool, &phone_number_id, &reason, &operator.actor).await?;
            report(&serde_json::json!({"phone_number_id": phone_number_id, "resumed": resumed}));
        }
    }
    Ok(())
}

/// Prints one JSON line on stdout, for scripts.
#[allow(clippy::print_stdout)]
fn report(value: &serde_json::Value) {
    println!("{value}");
}
