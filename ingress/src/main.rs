//! `reach-ingress`: Meta webhook endpoint and outbox publisher.

use reach_ingress::IngressSettings;
use reach_shared::settings::Env;
use reach_shared::{shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logs("reach-ingress");
    let settings = IngressSettings::from_env(&Env::process())?;
    let ingress = reach_ingress::start(settings, shutdown::on_signal()).await?;
    ingress.wait().await;
    Ok(())
}
