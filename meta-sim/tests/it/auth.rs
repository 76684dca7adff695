use crate::harness::*;

#[tokio::test]
async fn wrong_or_missing_token_is_190() {
    let sim = TestSim::start(settings()).await;

    let wrong = sim.send(PHONE, "not-the-token", &text_body(RECIPIENT)).await;
    assert_eq!(wrong.status, 401);
    assert_eq!(wrong.error_code(), Some(190));
    assert_eq!(wrong.json["error"]["type"], "OAuthException");
    assert!(wrong.json["error"]["fbtrace_id"].as_str().unwrap().starts_with('A'));

    let other_numbers_token = sim.send(PHONE, OTHER_TOKEN, &text_body(RECIPIENT)).await;
    assert_eq!(other_numbers_token.status, 401);
    assert_eq!(other_numbers_token.error_code(), Some(190));

    let missing = sim.send_raw(PHONE, None, serde_json::to_vec(&text_body(RECIPIENT)).unwrap()).await;
    assert_eq!(missing.status, 401);
    assert_eq!(missing.error_code(), Some(190));

    let stats = sim.stats().await;
    assert_eq!(stats.phone_numbers[PHONE].auth_failures, 3);
    assert_eq!(stats.phone_numbers[PHONE].accepted, 0);
    sim.stop().await;
}

#[tokio::test]
async fn token_checked_before_body() {
    let sim = TestSim::start(settings()).await;
    let reply = sim.send_raw(PHONE, Some("wrong"), b"not json".to_vec()).await;
    assert_eq!(reply.status, 401);
    assert_eq!(reply.error_code(), Some(190));
    sim.stop().await;
}

#[tokio::test]
async fn unknown_number_is_100() {
    let sim = TestSim::start(settings()).await;

    let reply = sim.send("999999999999999", TOKEN, &text_body(RECIPIENT)).await;
    assert_eq!(reply.status, 400);
    assert_eq!(reply.error_code(), Some(100));
    assert_eq!(reply.json["error"]["type"], "GraphMethodException");
    assert_eq!(reply.json["error"]["error_subcode"], 33);
    let message = reply.json["error"]["message"].as_str().unwrap();
    assert!(message.contains("Object with ID '999999999999999' does not exist"), "{message}");

    let unknown_token = sim.send("999999999999999", "nobody's token", &text_body(RECIPIENT)).await;
    assert_eq!(unknown_token.status, 401);
    assert_eq!(unknown_token.error_code(), Some(190));

    assert_eq!(sim.stats().await.unknown_number_requests, 2);
    sim.stop().await;
}
