use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use crate::harness::*;

/// Sends `count` texts at once, each to its own recipient, and returns the replies.
async fn burst(sim: &TestSim, count: usize, first_recipient: u64) -> Vec<Reply> {
    let url = sim.url(&format!("/v21.0/{PHONE}/messages"));
    let mut sends = JoinSet::new();
    for i in 0..count as u64 {
        let request = sim.client.post(&url).bearer_auth(TOKEN).json(&text_body(&(first_recipient + i).to_string()));
        sends.spawn(async move { read(request.send().await.expect("simulator responds")).await });
    }
    sends.join_all().await
}

#[tokio::test]
async fn mps_caps_a_burst() {
    let mut settings = settings();
    settings.numbers[0].mps = 20;
    let sim = TestSim::start(settings).await;

    let started = Instant::now();
    let replies = burst(&sim, 60, 15550100000).await;
    let elapsed = started.elapsed();
    assert!(elapsed < Duration::from_millis(900), "the burst took {elapsed:?}, too long to fall in one window");
    let accepted = replies.iter().filter(|reply| reply.status == 200).count();
    let limited: Vec<_> = replies.iter().filter(|reply| reply.error_code() == Some(130429)).collect();
    assert_eq!(accepted, 20);
    assert_eq!(limited.len(), 40);
    for reply in &limited {
        assert_eq!(reply.status, 400);
        assert_eq!(reply.json["error"]["message"], "(#130429) Rate limit hit");
        assert_eq!(reply.json["error"]["type"], "OAuthException");
    }

    let stats = sim.stats().await;
    let phone = &stats.phone_numbers[PHONE];
    assert_eq!(phone.mps, 20);
    assert_eq!(phone.accepted, 20);
    assert_eq!(phone.rejected_rate_limit, 40);
    assert_eq!(phone.peak_one_second, 20);

    // The window slides: a second after the first burst there is room again, and the
    // rejected sends took none of it.
    tokio::time::sleep(Duration::from_millis(1050).saturating_sub(started.elapsed())).await;
    let replies = burst(&sim, 25, 15550200000).await;
    assert_eq!(replies.iter().filter(|reply| reply.status == 200).count(), 20);
    let stats = sim.stats().await;
    assert_eq!(stats.phone_numbers[PHONE].accepted, 40);
    assert_eq!(stats.phone_numbers[PHONE].peak_one_second, 20);
    assert_eq!(stats.phone_numbers[OTHER_PHONE].rejected_rate_limit, 0);
    sim.stop().await;
}

#[tokio::test]
async fn pair_rate_rejects_then_allows() {
    let mut settings = settings();
    settings.pair_interval = Duration::from_millis(300);
    let sim = TestSim::start(settings).await;

    let first = sim.send_text(RECIPIENT).await;
    assert_eq!(first.status, 200);
    let started = Instant::now();
    let second = sim.send_text(RECIPIENT).await;
    assert!(started.elapsed() < Duration::from_millis(300), "the second send was too slow to test the interval");
    assert_eq!(second.status, 400);
    assert_eq!(second.error_code(), Some(131056));
    let other_recipient = sim.send_text("15550003333").await;
    assert_eq!(other_recipient.status, 200);
    let other_number = sim.send(OTHER_PHONE, OTHER_TOKEN, &text_body(RECIPIENT)).await;
    assert_eq!(other_number.status, 200);

    tokio::time::sleep(Duration::from_millis(350)).await;
    let after_interval = sim.send_text(RECIPIENT).await;
    assert_eq!(after_interval.status, 200, "{}", after_interval.text);

    let stats = sim.stats().await;
    assert_eq!(stats.phone_numbers[PHONE].rejected_pair_rate, 1);
    assert_eq!(stats.phone_numbers[PHONE].accepted, 3);
    sim.stop().await;
}

#[tokio::test]
async fn error_rate_one_fails_every_send() {
    let mut settings = settings();
    settings.error_rate = 1.0;
    settings.numbers[0].mps = 1;
    let sim = TestSim::start(settings).await;
    for i in 0..3 {
        let reply = sim.send_text(&format!("1555000{i}")).await;
        assert_eq!(reply.status, 500);
        assert_eq!(reply.error_code(), Some(131000));
        assert_eq!(reply.json["error"]["message"], "(#131000) Something went wrong");
    }
    let stats = sim.stats().await;
    // With mps 1, a fault that took window room would turn the next fault into 130429.
    assert_eq!(stats.phone_numbers[PHONE].random_faults, 3);
    assert_eq!(stats.phone_numbers[PHONE].rejected_rate_limit, 0);
    assert_eq!(stats.phone_numbers[PHONE].accepted, 0);
    sim.stop().await;
}
