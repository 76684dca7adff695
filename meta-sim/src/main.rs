//! `reach-meta-sim`: serves the simulated WhatsApp Cloud API send endpoint until
//! SIGTERM or Ctrl-C.

use clap::Parser;
use reach_meta_sim::SimArgs;
use reach_shared::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = SimArgs::parse();
    telemetry::init_logs("reach-meta-sim");
    let settings = args.into_settings()?;
    let sim = reach_meta_sim::start(settings, shutdown::on_signal()).await?;
    sim.wait().await;
    Ok(())
}
