//! The 4 MiB body limit, announced by `Content-Length` or found while streaming.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use reach_shared::signing::meta_signature;
use reqwest::StatusCode;

use crate::harness::{APP_SECRET, TestIngress};

const LIMIT: usize = reach_ingress::settings::DEFAULT_BODY_LIMIT_BYTES;

/// A valid notification without entries, padded with spaces to `size` bytes.
fn padded_notification(size: usize) -> Vec<u8> {
    let mut body = br#"{"object":"whatsapp_business_account","entry":[]}"#.to_vec();
    body.resize(size, b' ');
    body
}

/// A body that reqwest sends with `Transfer-Encoding: chunked`: a stream of 64 KiB
/// frames whose total size is not known in advance.
async fn chunked_body(content: &[u8]) -> reqwest::Body {
    let mut frames = Vec::new();
    for chunk in content.chunks(64 * 1024) {
        // `Full` yields its bytes as one data frame; this builds the frames without
        // naming the `http_body` crate, which is no dependency of this package.
        let frame = Full::new(Bytes::copy_from_slice(chunk)).frame().await.expect("a non-empty body yields a frame");
        frames.push(frame);
    }
    reqwest::Body::wrap(StreamBody::new(futures::stream::iter(frames)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn body_at_limit_accepted() {
    let ingress = TestIngress::start().await;

    let body = padded_notification(LIMIT);
    let reply = ingress.post_signed(&body).await;
    assert_eq!(reply.status, StatusCode::OK, "a signed body of exactly {LIMIT} bytes");
    let stored = ingress.inbound_webhooks().await;
    assert_eq!(stored.len(), 1, "the body is stored");
    assert_eq!(stored[0].body.len(), LIMIT, "the whole body is stored");

    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_with_length() {
    let ingress = TestIngress::start().await;

    let body = padded_notification(LIMIT + 1);
    let signature = meta_signature(APP_SECRET, &body);
    let reply = ingress.post(body, Some(&signature)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "a signed body one byte over the limit, with Content-Length");
    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 0, "nothing is stored");

    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_chunked_body() {
    let ingress = TestIngress::start().await;

    let body = padded_notification(LIMIT + 1);
    let signature = meta_signature(APP_SECRET, &body);
    let reply = ingress.post(chunked_body(&body).await, Some(&signature)).await;
    assert_eq!(reply.status, StatusCode::PAYLOAD_TOO_LARGE, "a signed chunked body one byte over the limit");
    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 0, "nothing is stored");

    // The same streaming path accepts a body within the limit, so the 413 above comes
    // from the size and not from chunked encoding.
    let small = padded_notification(200 * 1024);
    let signature = meta_signature(APP_SECRET, &small);
    let reply = ingress.post(chunked_body(&small).await, Some(&signature)).await;
    assert_eq!(reply.status, StatusCode::OK, "a signed chunked body within the limit");

    ingress.finish().await;
}
