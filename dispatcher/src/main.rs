//! `reach-dispatcher`: consumes the send shards and sends through the Graph API at each
//! phone number's rate. See the library crate for the layout.

use reach_dispatcher::DispatcherSettings;
use reach_shared::settings::Env;
use reach_shared::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logs("reach-dispatcher");
    let settings = DispatcherSettings::from_env(&Env::process())?;
    let shutdown = shutdown::on_signal();
    let dispatcher = reach_dispatcher::start(settings, shutdown).await?;
    dispatcher.wait().await;
    Ok(())
}
