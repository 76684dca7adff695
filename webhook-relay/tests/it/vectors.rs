//! The published Standard Webhooks signature vectors.

use reach_shared::signing::{WebhookSecret, verify_signature_header};
use serde_json::Value;

#[test]
fn standard_webhooks_vectors() {
    let path = format!("{}/../fixtures/standard-webhooks/vectors.json", env!("CARGO_MANIFEST_DIR"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("failed to read {path}: {error}"));
    let file: Value = serde_json::from_str(&text).expect("the vectors file is JSON");
    let vectors = file["vectors"].as_array().expect("a vectors array");
    assert!(!vectors.is_empty(), "the vectors file lists vectors");

    for (index, vector) in vectors.iter().enumerate() {
        let secret = WebhookSecret::parse_any_length(vector["secret"].as_str().expect("secret")).expect("a valid secret");
        let id = vector["msg_id"].as_str().expect("msg_id");
        let timestamp = vector["timestamp"].as_i64().expect("timestamp");
        let expected = vector["expected"].as_str().expect("expected");
        let body: Vec<u8> = match (vector["payload"].as_str(), vector.get("payload_repeat")) {
            (Some(payload), _) => payload.as_bytes().to_vec(),
            (None, Some(repeat)) => {
                let text = repeat["char"].as_str().expect("char");
                let count = repeat["count"].as_u64().expect("count") as usize;
                text.repeat(count).into_bytes()
            }
            (None, None) => panic!("vector {index} has neither payload nor payload_repeat"),
        };

        assert_eq!(secret.sign(id, timestamp, &body), expected, "vector {index}: signature");
        assert!(verify_signature_header(&secret, id, timestamp, &body, expected), "vector {index}: verifies");
        let rotated = format!("v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {expected}");
        assert!(verify_signature_header(&secret, id, timestamp, &body, &rotated), "vector {index}: verifies as the second entry");

        let mut tampered = body.clone();
        let last = tampered.len() - 1;
        tampered[last] ^= 0x01;
        assert!(!verify_signature_header(&secret, id, timestamp, &tampered, expected), "vector {index}: a tampered body is rejected");
        assert!(!verify_signature_header(&secret, id, timestamp + 1, &body, expected), "vector {index}: another timestamp is rejected");
        assert!(!verify_signature_header(&secret, &format!("{id}x"), timestamp, &body, expected), "vector {index}: another id is rejected");
        let unversioned = expected.trim_start_matches("v1,");
        assert!(!verify_signature_header(&secret, id, timestamp, &body, unversioned), "vector {index}: an entry without v1, is rejected");
    }
}
