//! Sealing of stored secrets (WABA access tokens, webhook signing secrets).
//!
//! - `passthrough`: stored as given, prefixed `plain:`. Development only; services warn
//!   at start and refuse it in production.
//! - `local`: AES-256-GCM with a random 96-bit nonce per value, stored as
//!   `v1:{key_id}:{base64(nonce || ciphertext)}`. The first configured key seals; any
//!   configured key unseals, so keys can be rotated by prepending a new one.

use aes_gcm::aead::Aead;
use aes_gcm::{Aes256Gcm, KeyInit, Nonce};
use anyhow::{Context, bail};
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use secrecy::{ExposeSecret, SecretString};

use crate::settings::{Env, Environment};

const PLAIN_PREFIX: &str = "plain:";

#[derive(Clone)]
pub enum SecretSealer {
    Passthrough,
    Local { keys: Vec<(String, Aes256Gcm)> },
}

impl std::fmt::Debug for SecretSealer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            SecretSealer::Passthrough => f.write_str("SecretSealer::Passthrough"),
            SecretSealer::Local { keys } => {
                let ids: Vec<&str> = keys.iter().map(|(id, _)| id.as_str()).collect();
                write!(f, "SecretSealer::Local({ids:?})")
            }
        }
    }
}

impl SecretSealer {
    /// Reads `REACH_SECRETS_MODE` and `REACH_SECRETS_KEYS`. Production refuses
    /// `passthrough`; development accepts it with a warning.
    pub fn from_env(env: &Env, environment: Environment) -> anyhow::Result<Self> {
        let mode = env.string_or("REACH_SECRETS_MODE", "passthrough");
        match mode.as_str() {
            "passthrough" => {
                if environment == Environment::Production {
                    bail!("REACH_SECRETS_MODE=passthrough stores secrets unencrypted and is rejected in production: set REACH_SECRETS_MODE=local and REACH_SECRETS_KEYS");
                }
                tracing::warn!("REACH_SECRETS_MODE=passthrough: secrets are stored unencrypted, use it for development only");
                Ok(SecretSealer::Passthrough)
            }
            "local" => {
                let raw = env
                    .required("REACH_SECRETS_KEYS")
                    .context("REACH_SECRETS_MODE=local needs REACH_SECRETS_KEYS as keyid:base64key,...")?;
                Self::local(&raw)
            }
            other => bail!("invalid REACH_SECRETS_MODE {other:?}: expected passthrough or local"),
        }
    }

    /// Builds a `local` sealer from `keyid:base64key,...` with 32-byte keys.
    pub fn local(spec: &str) -> anyhow::Result<Self> {
        let mut keys = Vec::new();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            let (id, encoded) = entry
                .split_once(':')
                .with_context(|| "invalid REACH_SECRETS_KEYS entry: expected keyid:base64key".to_owned())?;
            if id.is_empty() || id.contains(':') {
                bail!("invalid REACH_SECRETS_KEYS key id {id:?}: expected a non-empty id without ':'");
            }
            let key = BASE64
                .decode(encoded)
                .with_context(|| format!("invalid REACH_SECRETS_KEYS key {id}: not base64"))?;
            if key.len() != 32 {
                bail!("invalid REACH_SECRETS_KEYS key {id}: {} bytes, AES-256 needs 32", key.len());
            }
            let cipher = Aes256Gcm::new_from_slice(&key).expect("32-byte key");
            keys.push((id.to_owned(), cipher));
        }
        if keys.is_empty() {
            bail!("REACH_SECRETS_KEYS is empty: give at least one keyid:base64key");
        }
        Ok(SecretSealer::Local { keys })
    }

    pub fn seal(&self, plain: &SecretString) -> anyhow::Result<String> {
        match self {
            SecretSealer::Passthrough => Ok(format!("{PLAIN_PREFIX}{}", plain.expose_secret())),
            SecretSealer::Local { keys } => {
                let (id, cipher) = &keys[0];
                let mut nonce_bytes = [0u8; 12];
                rand::fill(&mut nonce_bytes);
                let nonce = Nonce::from(nonce_bytes);
                let ciphertext = cipher
                    .encrypt(&nonce, plain.expose_secret().as_bytes())
                    .map_err(|_| anyhow::anyhow!("failed to encrypt a secret"))?;
                let mut sealed = nonce_bytes.to_vec();
                sealed.extend_from_slice(&ciphertext);
                Ok(format!("v1:{id}:{}", BASE64.encode(sealed)))
            }
        }
    }

    pub fn unseal(&self, sealed: &str) -> anyhow::Result<SecretString> {
        if let Some(plain) = sealed.strip_prefix(PLAIN_PREFIX) {
            return match self {
                SecretSealer::Passthrough => Ok(plain.to_owned().into()),
                SecretSealer::Local { .. } => {
                    bail!("found a secret stored in passthrough mode while REACH_SECRETS_MODE=local; re-provision it")
                }
            };
        }
        let SecretSealer::Local { keys } = self else {
            bail!("found an encrypted secret while REACH_SECRETS_MODE=passthrough; set REACH_SECRETS_MODE=local");
        };
        let mut parts = sealed.splitn(3, ':');
        let (Some("v1"), Some(id), Some(encoded)) = (parts.next(), parts.next(), parts.next()) else {
            bail!("invalid sealed secret: expected v1:keyid:data");
        };
        let (_, cipher) = keys
            .iter()
            .find(|(key_id, _)| key_id == id)
            .with_context(|| format!("sealed secret uses key {id:?}, which is not in REACH_SECRETS_KEYS"))?;
        let data = BASE64.decode(encoded).context("invalid sealed secret: not base64")?;
        if data.len() < 12 {
            bail!("invalid sealed secret: too short");
        }
        let (nonce, ciphertext) = data.split_at(12);
        let nonce = Nonce::try_from(nonce).expect("12-byte nonce");
        let plain = cipher
            .decrypt(&nonce, ciphertext)
            .map_err(|_| anyhow::anyhow!("failed to decrypt a secret with key {id:?}: wrong key or tampered data"))?;
        let plain = String::from_utf8(plain).context("decrypted secret is not UTF-8")?;
        Ok(plain.into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(byte: u8) -> String {
        BASE64.encode([byte; 32])
    }

    #[test]
    fn local_round_trip_and_rotation() {
        let old = SecretSealer::local(&format!("k1:{}", key(1))).unwrap();
        let sealed = old.seal(&"whsec_abc".to_owned().into()).unwrap();
        assert!(sealed.starts_with("v1:k1:"));
        assert!(!sealed.contains("whsec_abc"));
        let rotated = SecretSealer::local(&format!("k2:{},k1:{}", key(2), key(1))).unwrap();
        assert_eq!(rotated.unseal(&sealed).unwrap().expose_secret(), "whsec_abc");
        let resealed = rotated.seal(&"x".to_owned().into()).unwrap();
        assert!(resealed.starts_with("v1:k2:"));
        assert!(old.unseal(&resealed).is_err(), "a key not configured cannot unseal");
    }

    #[test]
    fn local_rejects_tampering_and_bad_keys() {
        let sealer = SecretSealer::local(&format!("k1:{}", key(1))).unwrap();
        let sealed = sealer.seal(&"secret".to_owned().into()).unwrap();
        let mut tampered = sealed.clone();
        tampered.pop();
        tampered.push(if sealed.ends_with('A') { 'B' } else { 'A' });
        assert!(sealer.unseal(&tampered).is_err());
        assert!(SecretSealer::local("k1:short").is_err());
        assert!(SecretSealer::local("").is_err());
    }

    #[test]
    fn passthrough_refused_in_production() {
        let env = Env::from_pairs([("REACH_SECRETS_MODE", "passthrough")]);
        assert!(SecretSealer::from_env(&env, Environment::Production).is_err());
        assert!(SecretSealer::from_env(&env, Environment::Development).is_ok());
    }
}
