//! The 4 MiB body limit, announced by `Content-Length` or found while streaming.

use bytes::Bytes;
use http_body_util::{BodyExt, Full, StreamBody};
use reach_shared::signing::meta_signature;
use reqwest::StatusCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::harness::{APP_SECRET, DEADLINE, TestIngress};

const LIMIT: usize = reach_ingress::settings::DEFAULT_BODY_LIMIT_BYTES;

/// Builds a valid notification without entries, padded with spaces to `size` bytes.
fn padded_notification(size: usize) -> Vec<u8> {
    let mut body = br#"{"object":"whatsapp_business_account","entry":[]}"#.to_vec();
    body.resize(size, b' ');
    body
}

/// Builds a body that reqwest sends with `Transfer-Encoding: chunked`, because it is a
/// stream of 64 KiB frames whose total size is unknown in advance.
async fn chunked_body(content: &[u8]) -> reqwest::Body {
    let mut frames = Vec::new();
    for chunk in content.chunks(64 * 1024) {
        // `Full` yields its bytes as one data frame, so this builds the frames without
        // naming the `http_body` crate, which is not a dependency of this package.
        let frame = Full::new(Bytes::copy_from_slice(chunk)).frame().await.expect("a non-empty body yields a frame");
        frames.push(frame);
    }
    reqwest::Body::wrap(StreamBody::new(futures::stream::iter(frames)))
}

/// Sends a POST head announcing `Content-Length: {length}` and no body byte, and
/// returns the status line of the response. reqwest cannot be used here: it keeps
/// writing the body after the 413, and the ingress closes the connection without
/// reading it, so reqwest reports a broken pipe instead of the response.
async fn status_line_for_announced_length(ingress: &TestIngress, length: usize, signature: &str) -> String {
    let mut stream = TcpStream::connect(ingress.addr).await.expect("connect to the ingress");
    let head = format!(
        "POST /webhooks/whatsapp HTTP/1.1\r\nhost: {}\r\ncontent-type: application/json\r\ncontent-length: {length}\r\nx-hub-signature-256: {signature}\r\n\r\n",
        ingress.addr
    );
    stream.write_all(head.as_bytes()).await.expect("write the request head");

    let mut response = Vec::new();
    let read = tokio::time::timeout(DEADLINE, async {
        let mut buffer = [0u8; 1024];
        while !response.windows(2).any(|w| w == b"\r\n") {
            let n = stream.read(&mut buffer).await.expect("read the response");
            if n == 0 {
                break;
            }
            response.extend_from_slice(&buffer[..n]);
        }
    })
    .await;
    assert!(read.is_ok(), "no response within {DEADLINE:?} to a head announcing {length} bytes");
    let response = String::from_utf8_lossy(&response).into_owned();
    response.lines().next().unwrap_or_default().to_owned()
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

/// The ingress returns 413 from `Content-Length` alone, before any body byte arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_body_with_length() {
    let ingress = TestIngress::start().await;

    let body = padded_notification(LIMIT + 1);
    let signature = meta_signature(APP_SECRET, &body);
    let status_line = status_line_for_announced_length(&ingress, body.len(), &signature).await;
    assert!(status_line.starts_with("HTTP/1.1 413 "), "a head announcing one byte over the limit, got {status_line:?}");
    assert_eq!(ingress.count("SELECT count(*) FROM inbound_webhooks").await, 0, "nothing is stored");

    ingress.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn oversized_chunked_body() {
    let ingress = TestIngress::start().await;

    // One byte over: the ingress has read the whole body by the time it returns 413, so
    // reqwest finishes writing and reads the response. With a body far over the limit
    // reqwest gets a broken pipe instead, as in the `Content-Length` case.
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
