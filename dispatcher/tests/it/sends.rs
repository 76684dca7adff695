//! The happy path: API to Graph API to statuses, with events on the way.

use std::time::Duration;

use crate::harness::{Fleet, Options};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_reach_read_once() {
    let fleet = Fleet::start(Options::default()).await;
    let phone = "110000000000001";
    let mut ids = Vec::new();
    for n in 0..20 {
        ids.push(fleet.send_text(phone, &format!("+1555020{n:04}")).await);
    }
    // The simulator reorders and duplicates some statuses; every message still ends read.
    fleet.wait_for_count("SELECT count(*) FROM outbound_messages WHERE state = 'read'", 20).await;
    for id in &ids {
        let row = fleet.state(*id).await;
        assert!(row.wamid.as_deref().is_some_and(|w| w.starts_with("wamid.")), "message {id} has its wamid");
        assert_eq!(row.attempt_count, 1, "one attempt per message");
    }
    let stats = fleet.sim_stats().await;
    assert_eq!(stats.phone_numbers[phone].accepted, 20, "Meta received each message exactly once");
    assert_eq!(stats.phone_numbers[phone].rejected_rate_limit, 0);

    let accepted = fleet.count("SELECT count(*) FROM events WHERE type = 'message.accepted'").await;
    assert_eq!(accepted, 20, "one message.accepted per message");
    let with_wamid = fleet
        .count("SELECT count(*) FROM events e JOIN outbound_messages m ON m.id = (e.data->>'message_id')::uuid WHERE e.type = 'message.accepted' AND e.data->>'wamid' = m.wamid")
        .await;
    assert_eq!(with_wamid, 20, "message.accepted carries the wamid");
    fleet.wait_for_count("SELECT count(*) FROM outbox WHERE topic = 'event' AND state = 'pending'", 0).await;
    tokio::time::sleep(Duration::from_millis(10)).await;
    fleet.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn template_message_sent() {
    let fleet = Fleet::start(Options::default()).await;
    let body = serde_json::json!({
        "phone_number_id": "110000000000001", "to": "15550201111", "type": "template",
        "template": {"name": "order_update", "language": {"code": "en_US"}, "components": [{"type": "body", "parameters": [{"type": "text", "text": "42"}]}]}
    });
    let response = fleet.client.post(&fleet.api_url).header("authorization", fleet.bearer()).json(&body).send().await.unwrap();
    assert_eq!(response.status(), reqwest::StatusCode::ACCEPTED);
    let id: uuid::Uuid = response.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().parse().unwrap();
    fleet.wait_for_count(&format!("SELECT count(*) FROM outbound_messages WHERE id = '{id}' AND state_rank >= 1"), 1).await;
    assert!(fleet.state(id).await.wamid.is_some());
    fleet.finish().await;
}
