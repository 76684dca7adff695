//! Message and conversation ids in Meta's formats.

use std::sync::atomic::{AtomicU64, Ordering};

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha2::{Digest, Sha256};

/// Issues wamids shaped like Meta's: `wamid.` and the standard base64 of a small
/// Thrift-style record holding the recipient's digits and an 18-character hex message
/// id (about 60 characters for an 11-digit number). The message id is a random prefix
/// drawn at start followed by a counter, so ids are unique within one simulator run and
/// almost surely across runs.
#[derive(Debug)]
pub struct WamidIssuer {
    prefix: u32,
    counter: AtomicU64,
}

impl WamidIssuer {
    pub fn new() -> Self {
        Self { prefix: rand::random(), counter: AtomicU64::new(0) }
    }

    /// Issues the next wamid for a message to `recipient_digits` (at most 255 digits).
    pub fn issue(&self, recipient_digits: &str) -> String {
        let sequence = self.counter.fetch_add(1, Ordering::Relaxed) & 0xFF_FFFF_FFFF;
        let message_id = format!("{:08X}{:010X}", self.prefix, sequence);
        let digits = &recipient_digits.as_bytes()[..recipient_digits.len().min(255)];

        let mut record = Vec::with_capacity(64);
        record.extend_from_slice(&[0x1c, 0x18, digits.len() as u8]);
        record.extend_from_slice(digits);
        record.extend_from_slice(&[0x15, 0x02, 0x00, 0x11, 0x18, 0x12]);
        record.extend_from_slice(message_id.as_bytes());
        record.push(0x00);

        let mut wamid = String::with_capacity(6 + record.len().div_ceil(3) * 4);
        wamid.push_str("wamid.");
        BASE64.encode_string(&record, &mut wamid);
        wamid
    }
}

impl Default for WamidIssuer {
    fn default() -> Self {
        Self::new()
    }
}

/// Derives the conversation id of a business number and a recipient on a given UTC day (days
/// since the Unix epoch): 32 hex digits, the same for every message of that day, as a
/// 24-hour conversation window keeps one id.
pub fn conversation_id(phone_number_id: &str, recipient_digits: &str, day: i64) -> String {
    let mut hasher = Sha256::new();
    hasher.update(phone_number_id.as_bytes());
    hasher.update(b"/");
    hasher.update(recipient_digits.as_bytes());
    hasher.update(day.to_be_bytes());
    hex::encode(&hasher.finalize()[..16])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wamid_decodes_to_recipient_and_message_id() {
        let issuer = WamidIssuer::new();
        let first = issuer.issue("15550002222");
        let second = issuer.issue("15550002222");
        assert_ne!(first, second);
        assert!(first.starts_with("wamid.HBgLMTU1NTAwMDIyMjIVAgARGB"), "{first}");
        assert!((55..=65).contains(&first.len()), "{} characters", first.len());
        let record = BASE64.decode(&first["wamid.".len()..]).unwrap();
        assert_eq!(&record[3..14], b"15550002222");
        assert_eq!(record.len(), 3 + 11 + 6 + 18 + 1);
    }
}
