//! Exactly once toward Meta: a dispatcher killed after Meta took its sends must not
//! send them again when the jobs are redelivered.

use std::time::Duration;

use crate::harness::{Fleet, Options, number};

const PHONE: &str = "150000000000001";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_dispatcher_does_not_resend() {
    // A slow Graph API: sends are in flight when the dispatcher is killed.
    let fleet = Fleet::start(Options {
        numbers: vec![number(PHONE, 80)],
        latency_ms: (1500, 2000),
        start_dispatcher: false,
        dispatcher_env: vec![("REACH_DISPATCHER_UNCERTAIN_GRACE_MS", "3000".to_owned())],
        ..Options::default()
    })
    .await;
    let ids = fleet.queue_many(PHONE, 40, 15_550_600_000).await;

    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_reach-dispatcher"))
        .env_clear()
        .envs(fleet.dispatcher_env())
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("failed to start reach-dispatcher");
    // Wait until the simulator has taken every send, then kill before the responses.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let accepted = fleet.sim_stats().await.phone_numbers[PHONE].accepted;
        if accepted == 40 {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the simulator took only {accepted} sends");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    child.start_kill().expect("kill");
    let _ = child.wait().await;
    let stored = fleet.count("SELECT count(*) FROM outbound_messages WHERE wamid IS NOT NULL").await;
    assert!(stored < 40, "the kill came too late to test anything: {stored} wamids were stored");

    // Status webhooks carry each message id back; the new dispatcher finds the wamids.
    let mut fleet = fleet;
    fleet.start_dispatcher().await;
    fleet.wait_for_count("SELECT count(*) FROM outbound_messages WHERE wamid IS NOT NULL", 40).await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let stats = fleet.sim_stats().await;
    assert_eq!(stats.phone_numbers[PHONE].accepted, 40, "no message was sent twice");
    for id in ids {
        assert!(fleet.state(id).await.wamid.is_some());
    }
    fleet.finish().await;
}
