//! `reach-dispatcher`: will send WhatsApp messages through the Graph API at each phone
//! number's messages-per-second limit. For now it serves its operations listener and
//! declares the send shard queues, so deployments and dashboards can include it.

use reach_shared::amqp::Topology;
use reach_shared::ops::{self, Readiness};
use reach_shared::settings::{CommonSettings, Env};
use reach_shared::{amqp, shutdown, telemetry};

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    telemetry::init_logs("reach-dispatcher");
    let env = Env::process();
    let common = CommonSettings::from_env(&env, "127.0.0.1:9102")?;
    let send_shards: u16 = env.parse_or("REACH_SEND_SHARDS", 8)?;
    let shutdown = shutdown::on_signal();
    let readiness = Readiness::default();
    let metrics = telemetry::metrics_handle("reach-dispatcher");
    let metrics_addr = ops::serve(common.metrics_addr, metrics, readiness.clone(), shutdown.clone()).await?;

    let connection = amqp::connect(&common.amqp_url, "reach-dispatcher").await?;
    let channel = connection.create_channel().await?;
    Topology::new(&common.amqp_prefix, send_shards).declare(&channel).await?;
    readiness.set_broker_up(true);
    readiness.set_database_up(true);
    // TODO: consume the send shards and call the Graph API; until then this process
    // only keeps the topology declared and reports readiness.
    tracing::warn!(%metrics_addr, "dispatcher started without send consumers: outbound sends are not implemented yet");
    shutdown.cancelled().await;
    let _ = connection.close(200, "shutdown".into()).await;
    Ok(())
}
