//! Group commit: bodies that arrive together share a transaction, and one body the
//! database rejects must not fail the others.

use futures::future::join_all;
use reqwest::StatusCode;

use crate::harness::{FIXTURE_PHONE, FIXTURE_WABA, TestIngress, notification, text_entry};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rejected_body_spares_batch_neighbours() {
    let ingress = TestIngress::start().await;
    ingress.provision_fixture_org().await;

    // A trigger in this test's own database rejects one event, so Postgres fails every
    // transaction that carries it.
    sqlx::query(
        "CREATE FUNCTION reject_poison() RETURNS trigger LANGUAGE plpgsql AS $$
         BEGIN
             IF NEW.dedup_key = 'message:wamid.poison' THEN
                 RAISE EXCEPTION 'poison event rejected by the test';
             END IF;
             RETURN NEW;
         END $$",
    )
    .execute(&ingress.pool)
    .await
    .expect("create the rejecting function");
    sqlx::query("CREATE TRIGGER reject_poison BEFORE INSERT ON events FOR EACH ROW EXECUTE FUNCTION reject_poison()")
        .execute(&ingress.pool)
        .await
        .expect("create the rejecting trigger");
    let rejected = notification(vec![text_entry(FIXTURE_WABA, FIXTURE_PHONE, "wamid.poison", "rejected")]);
    let good: Vec<Vec<u8>> = (0..19)
        .map(|n| notification(vec![text_entry(FIXTURE_WABA, FIXTURE_PHONE, &format!("wamid.good.{n}"), "good")]))
        .collect();

    let mut bodies = good.clone();
    bodies.insert(good.len() / 2, rejected.clone());
    let replies = join_all(bodies.iter().map(|body| ingress.post_signed(body))).await;
    for (body, reply) in bodies.iter().zip(&replies) {
        if *body == rejected {
            continue;
        }
        let reply_text = String::from_utf8_lossy(&reply.body);
        assert_eq!(reply.status, StatusCode::OK, "a good body sent with the rejected one; reply {reply_text}");
        assert_eq!(reply.outcome(), "accepted", "a good body sent with the rejected one");
    }

    let stored_good = ingress.count("SELECT count(*) FROM events WHERE dedup_key LIKE 'message:wamid.good.%'").await;
    assert_eq!(stored_good, 19, "every good body makes its event");
    ingress.assert_outbox_matches_events().await;
    ingress.finish().await;
}
