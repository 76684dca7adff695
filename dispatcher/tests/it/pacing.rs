//! The per-number limit at the Graph API: the simulator counts accepted sends in every
//! sliding one-second window and returns 130429 over the number's MPS.

use std::time::Duration;

use crate::harness::{Fleet, Options, number};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_never_exceed_mps() {
    let numbers = vec![number("120000000000001", 20), number("120000000000002", 50), number("120000000000003", 50)];
    // The pacer's own unit tests check the limit strictly at send time. Here the sends
    // cross a debug-build test process that also runs the ingress and the simulator on
    // two cores, and its scheduling can bunch arrivals by tens of milliseconds. So the
    // simulator allows two sends per second above the provisioned MPS.
    const ARRIVAL_JITTER_SENDS: u32 = 2;
    let fleet = Fleet::start(Options { numbers: numbers.clone(), latency_ms: (20, 60), sim_mps_extra: ARRIVAL_JITTER_SENDS, ..Options::default() }).await;
    // Three seconds of work per number, queued at once: the first second is the test.
    for (index, n) in numbers.iter().enumerate() {
        fleet.queue_many(&n.phone_number_id, (n.mps * 3) as usize, 15_550_300_000 + index as u64 * 10_000).await;
    }
    let total: u32 = numbers.iter().map(|n| n.mps * 3).sum();
    fleet.wait_for_count("SELECT count(*) FROM outbound_messages WHERE state_rank >= 1", i64::from(total)).await;

    let stats = fleet.sim_stats().await;
    for n in &numbers {
        let seen = &stats.phone_numbers[&n.phone_number_id];
        assert_eq!(seen.rejected_rate_limit, 0, "{}: 130429 answers", n.phone_number_id);
        assert!(
            seen.peak_one_second <= u64::from(n.mps + ARRIVAL_JITTER_SENDS),
            "{}: {} sends in one second at MPS {}",
            n.phone_number_id,
            seen.peak_one_second,
            n.mps
        );
        assert_eq!(seen.accepted, u64::from(n.mps * 3), "{}: each message once", n.phone_number_id);
        let rate = seen.mean_rate.expect("many sends");
        assert!(rate >= f64::from(n.mps) * 0.9, "{}: mean rate {rate:.1} at MPS {}", n.phone_number_id, n.mps);
    }
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rate_changes_at_run_time() {
    let phone = "130000000000001";
    // A long lane keeps every job in memory, so the new rate shows at once.
    let fleet = Fleet::start(Options {
        numbers: vec![number(phone, 20)],
        sim_mps: Some(80),
        dispatcher_env: vec![("REACH_DISPATCHER_LANE_SECONDS", "60".to_owned())],
        ..Options::default()
    })
    .await;
    fleet.queue_many(phone, 200, 15_550_400_000).await;
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let before: i64 = fleet.count("SELECT count(*) FROM outbound_messages WHERE state_rank >= 1").await;
    assert!((30..=60).contains(&before), "{before} sent in 2.5 s at 20 MPS");

    // Meta's throughput upgrade, as the ingress applies it.
    sqlx::query("UPDATE phone_numbers SET mps = 80, updated_at = now() WHERE phone_number_id = $1").bind(phone).execute(&fleet.pool).await.unwrap();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let switched: i64 = fleet.count("SELECT count(*) FROM outbound_messages WHERE state_rank >= 1").await;
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let after: i64 = fleet.count("SELECT count(*) FROM outbound_messages WHERE state_rank >= 1").await;
    let rate = after - switched;
    assert!(rate >= 50, "only {rate} sends in the second after the upgrade to 80 MPS");
    let stats = fleet.sim_stats().await;
    assert!(stats.phone_numbers[phone].peak_one_second <= 80, "peak {}", stats.phone_numbers[phone].peak_one_second);
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handover_keeps_number_under_mps() {
    let phone = "130000000000002";
    const ARRIVAL_JITTER_SENDS: u32 = 2;
    let mut fleet = Fleet::start(Options { numbers: vec![number(phone, 50)], sim_mps_extra: ARRIVAL_JITTER_SENDS, ..Options::default() }).await;
    // A second dispatcher subscribes after the first, as the standby on every shard.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let settings = reach_dispatcher::DispatcherSettings::from_env(&reach_shared::settings::Env::from_pairs(fleet.dispatcher_env())).unwrap();
    let standby_shutdown = tokio_util::sync::CancellationToken::new();
    let standby = reach_dispatcher::start(settings, standby_shutdown.clone()).await.unwrap();

    fleet.queue_many(phone, 200, 15_550_700_000).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let before: i64 = fleet.count("SELECT count(*) FROM outbound_messages WHERE state_rank >= 1").await;
    assert!(before > 20, "the first dispatcher was sending: {before}");
    fleet.stop_dispatcher().await;

    fleet.wait_for_count("SELECT count(*) FROM outbound_messages WHERE state_rank >= 1", 200).await;
    let stats = fleet.sim_stats().await;
    let seen = &stats.phone_numbers[phone];
    assert_eq!(seen.accepted, 200, "every message once, across the handover");
    assert_eq!(seen.rejected_rate_limit, 0, "130429 answers across the handover");
    assert!(seen.peak_one_second <= u64::from(50 + ARRIVAL_JITTER_SENDS), "peak {}", seen.peak_one_second);

    standby_shutdown.cancel();
    standby.wait().await;
    fleet.finish().await;
}
