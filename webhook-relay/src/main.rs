//! `reach-webhook-relay`: delivers signed callbacks to customer subscriptions.

use reach_shared::settings::Env;
use reach_shared::{shutdown, telemetry};
use reach_webhook_relay::RelaySettings;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logs("reach-webhook-relay");
    let settings = RelaySettings::from_env(&Env::process())?;
    let relay = reach_webhook_relay::start(settings, shutdown::on_signal()).await?;
    relay.wait().await;
    Ok(())
}
