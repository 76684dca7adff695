//! Signatures at both edges: Meta's `X-Hub-Signature-256` on inbound webhooks, and
//! Standard Webhooks signatures on the callbacks sent to customers.

use std::fmt;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::{KeyInit, Mac};
use secrecy::{ExposeSecret, SecretBox, SecretString};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = hmac::Hmac<Sha256>;

/// The reason an inbound signature was rejected. The variants become the `reason` label of
/// the unauthorized counter, so they stay few.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing X-Hub-Signature-256 header")]
    Missing,
    #[error("malformed X-Hub-Signature-256 header: expected sha256= and 64 hex digits")]
    Malformed,
    #[error("X-Hub-Signature-256 does not match any configured app secret")]
    Mismatch,
}

impl SignatureError {
    pub fn as_label(self) -> &'static str {
        match self {
            SignatureError::Missing => "missing",
            SignatureError::Malformed => "malformed",
            SignatureError::Mismatch => "mismatch",
        }
    }
}

/// Verifies `X-Hub-Signature-256` against every configured Meta app secret.
#[derive(Clone)]
pub struct MetaSignatureVerifier {
    secrets: Vec<SecretString>,
}

impl fmt::Debug for MetaSignatureVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MetaSignatureVerifier").field("secrets", &self.secrets.len()).finish()
    }
}

impl MetaSignatureVerifier {
    pub fn new(secrets: Vec<SecretString>) -> Self {
        Self { secrets }
    }

    /// Checks `header` against the HMAC-SHA256 of the raw `body` under each secret. The
    /// `sha256=` prefix is removed literally (never as a character set, which would
    /// eat hex digits such as `a`), and every comparison runs in constant time.
    pub fn verify(&self, header: Option<&[u8]>, body: &[u8]) -> Result<(), SignatureError> {
        let header = header.ok_or(SignatureError::Missing)?;
        let hex_digest = header.strip_prefix(b"sha256=").ok_or(SignatureError::Malformed)?;
        let mut expected = [0u8; 32];
        if hex_digest.len() != 64 || hex::decode_to_slice(hex_digest, &mut expected).is_err() {
            return Err(SignatureError::Malformed);
        }
        let mut matched = subtle::Choice::from(0);
        for secret in &self.secrets {
            let digest = hmac_sha256(secret.expose_secret().as_bytes(), &[body]);
            matched |= digest.ct_eq(&expected);
        }
        if bool::from(matched) { Ok(()) } else { Err(SignatureError::Mismatch) }
    }
}

/// Computes `sha256=<hex>` over `body`, as Meta does. Used by the simulator, the load
/// generator and tests.
pub fn meta_signature(app_secret: &str, body: &[u8]) -> String {
    format!("sha256={}", hex::encode(hmac_sha256(app_secret.as_bytes(), &[body])))
}

/// A Standard Webhooks signing secret: `whsec_` followed by base64 of the key bytes.
pub struct WebhookSecret {
    key: SecretBox<Vec<u8>>,
}

impl fmt::Debug for WebhookSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WebhookSecret(redacted)")
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebhookSecretError {
    #[error("invalid webhook secret: expected the prefix whsec_")]
    MissingPrefix,
    #[error("invalid webhook secret: the part after whsec_ is not valid base64")]
    InvalidBase64,
    #[error("invalid webhook secret: the key has {0} bytes, expected 24 to 64")]
    InvalidLength(usize),
}

impl WebhookSecret {
    pub const PREFIX: &'static str = "whsec_";

    /// Parses `whsec_<base64>` with a key of 24 to 64 bytes.
    pub fn parse(value: &str) -> Result<Self, WebhookSecretError> {
        let key = Self::decode(value)?;
        if !(24..=64).contains(&key.len()) {
            return Err(WebhookSecretError::InvalidLength(key.len()));
        }
        Ok(Self { key: SecretBox::new(Box::new(key)) })
    }

    /// Parses a secret of any key length. Only for checking published test vectors,
    /// some of which use shorter keys than this service issues.
    pub fn parse_any_length(value: &str) -> Result<Self, WebhookSecretError> {
        Ok(Self { key: SecretBox::new(Box::new(Self::decode(value)?)) })
    }

    fn decode(value: &str) -> Result<Vec<u8>, WebhookSecretError> {
        let encoded = value.strip_prefix(Self::PREFIX).ok_or(WebhookSecretError::MissingPrefix)?;
        BASE64.decode(encoded).map_err(|_| WebhookSecretError::InvalidBase64)
    }

    /// Generates a new secret with a 32-byte random key; returns its `whsec_` form.
    pub fn generate() -> SecretString {
        let mut key = [0u8; 32];
        rand::fill(&mut key);
        format!("{}{}", Self::PREFIX, BASE64.encode(key)).into()
    }

    /// Signs `{id}.{timestamp}.{body}` and returns `v1,<base64>`.
    pub fn sign(&self, id: &str, timestamp: i64, body: &[u8]) -> String {
        let timestamp = timestamp.to_string();
        let digest = hmac_sha256(
            self.key.expose_secret(),
            &[id.as_bytes(), b".", timestamp.as_bytes(), b".", body],
        );
        format!("v1,{}", BASE64.encode(digest))
    }
}

/// Builds the `webhook-signature` header value: one `v1,` signature per secret,
/// separated by spaces.
pub fn signature_header(secrets: &[WebhookSecret], id: &str, timestamp: i64, body: &[u8]) -> String {
    secrets
        .iter()
        .map(|secret| secret.sign(id, timestamp, body))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Verifies a `webhook-signature` header as a customer would: any `v1,` entry that
/// matches, compared in constant time. The timestamp tolerance is the caller's business.
pub fn verify_signature_header(secret: &WebhookSecret, id: &str, timestamp: i64, body: &[u8], header: &str) -> bool {
    let expected = secret.sign(id, timestamp, body);
    header
        .split(' ')
        .filter(|entry| entry.starts_with("v1,"))
        .any(|entry| bool::from(entry.as_bytes().ct_eq(expected.as_bytes())))
}

fn hmac_sha256(key: &[u8], parts: &[&[u8]]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    for part in parts {
        mac.update(part);
    }
    mac.finalize().into_bytes().into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_known_answer() {
        assert_eq!(
            hex::encode(hmac_sha256(b"secret", &[b"test"])),
            "0329a06b62cd16b33eb6792be8c60b158d89a2ee3a876fce9a881ebb488c0914"
        );
    }

    #[test]
    fn meta_signature_prefix_stripped_literally() {
        // Find a body whose digest begins with characters of "sha256=" (a, 2, 5, 6), the
        // case a character-set strip gets wrong.
        let secret = "prefix-secret";
        let body = (0..10_000)
            .map(|i| format!("{{\"n\":{i}}}"))
            .find(|body| {
                let signature = meta_signature(secret, body.as_bytes());
                signature["sha256=".len()..].starts_with(['a', '2', '5', '6'])
            })
            .expect("some body among 10,000 has such a digest");
        let verifier = MetaSignatureVerifier::new(vec![secret.to_owned().into()]);
        let header = meta_signature(secret, body.as_bytes());
        assert_eq!(verifier.verify(Some(header.as_bytes()), body.as_bytes()), Ok(()));
    }

    #[test]
    fn meta_signature_rejects_bad_headers() {
        let verifier = MetaSignatureVerifier::new(vec!["s".to_owned().into()]);
        let body = b"{}";
        let good = meta_signature("s", body);
        assert_eq!(verifier.verify(None, body), Err(SignatureError::Missing));
        assert_eq!(verifier.verify(Some(&good.as_bytes()[7..]), body), Err(SignatureError::Malformed));
        assert_eq!(verifier.verify(Some(b"sha256=zz"), body), Err(SignatureError::Malformed));
        assert_eq!(verifier.verify(Some(b"sha1=abcd"), body), Err(SignatureError::Malformed));
        let upper = good.to_uppercase().replacen("SHA256=", "sha256=", 1);
        assert_eq!(verifier.verify(Some(upper.as_bytes()), body), Ok(()), "hex digits are case-insensitive");
        let wrong = meta_signature("other", body);
        assert_eq!(verifier.verify(Some(wrong.as_bytes()), body), Err(SignatureError::Mismatch));
    }

    #[test]
    fn webhook_secret_length_bounds() {
        let short = format!("whsec_{}", BASE64.encode([7u8; 23]));
        assert_eq!(WebhookSecret::parse(&short).unwrap_err(), WebhookSecretError::InvalidLength(23));
        let long = format!("whsec_{}", BASE64.encode([7u8; 65]));
        assert_eq!(WebhookSecret::parse(&long).unwrap_err(), WebhookSecretError::InvalidLength(65));
        assert!(WebhookSecret::parse(&format!("whsec_{}", BASE64.encode([7u8; 24]))).is_ok());
        assert!(WebhookSecret::parse(&format!("whsec_{}", BASE64.encode([7u8; 64]))).is_ok());
        assert_eq!(WebhookSecret::parse("abc").unwrap_err(), WebhookSecretError::MissingPrefix);
        assert_eq!(WebhookSecret::parse("whsec_!!!").unwrap_err(), WebhookSecretError::InvalidBase64);
        let generated = WebhookSecret::generate();
        assert!(WebhookSecret::parse(generated.expose_secret()).is_ok());
    }

    #[test]
    fn signature_header_lists_each_secret() {
        let first = WebhookSecret::parse(WebhookSecret::generate().expose_secret()).unwrap();
        let second = WebhookSecret::parse(WebhookSecret::generate().expose_secret()).unwrap();
        let header = signature_header(&[first, second], "msg_1", 1_700_000_000, b"{}");
        let entries: Vec<&str> = header.split(' ').collect();
        assert_eq!(entries.len(), 2);
        assert!(entries.iter().all(|e| e.starts_with("v1,")));
        assert_ne!(entries[0], entries[1]);
    }
}
