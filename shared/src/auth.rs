//! Verification of the identity provider's tokens: JWTs with `sub`, `email`, `exp`, and
//! either `org_id` (a customer's org) or `platform_admin: true`. HS256 with a shared
//! secret is the development default; production can verify RS256 or ES256 with the
//! provider's public key instead.

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use uuid::Uuid;

use crate::settings::{Env, Environment};

/// Claims this service reads; others are ignored.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct Claims {
    pub sub: String,
    #[serde(default)]
    pub email: Option<String>,
    pub exp: u64,
    #[serde(default)]
    pub org_id: Option<Uuid>,
    #[serde(default)]
    pub platform_admin: bool,
}

/// The reason a request was not authenticated. The message is safe to return to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("missing bearer token: send Authorization: Bearer <token>")]
    MissingToken,
    #[error("invalid token: {0}")]
    InvalidToken(String),
    #[error("token verification is not configured: set REACH_HUB_JWT_SECRET or REACH_HUB_JWT_PUBLIC_KEY")]
    NotConfigured,
}

/// Verifies bearer tokens with the configured key.
#[derive(Clone)]
pub struct TokenVerifier {
    key: Option<(DecodingKey, Validation)>,
}

impl std::fmt::Debug for TokenVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenVerifier").field("configured", &self.key.is_some()).finish()
    }
}

impl TokenVerifier {
    /// Reads `REACH_HUB_JWT_PUBLIC_KEY` (PEM; RS256 or ES256 by its type) or else
    /// `REACH_HUB_JWT_SECRET` (HS256). Without either, production refuses to start and
    /// development rejects every token.
    pub fn from_env(env: &Env, environment: Environment) -> anyhow::Result<Self> {
        if let Some(pem) = env.get("REACH_HUB_JWT_PUBLIC_KEY") {
            let pem = pem.replace("\\n", "\n");
            let (key, algorithm) = match DecodingKey::from_ec_pem(pem.as_bytes()) {
                Ok(key) => (key, Algorithm::ES256),
                Err(_) => {
                    let key = DecodingKey::from_rsa_pem(pem.as_bytes())
                        .map_err(|e| anyhow::anyhow!("invalid REACH_HUB_JWT_PUBLIC_KEY: expected an EC or RSA public key in PEM: {e}"))?;
                    (key, Algorithm::RS256)
                }
            };
            return Ok(Self { key: Some((key, validation(algorithm))) });
        }
        match env.get("REACH_HUB_JWT_SECRET") {
            Some(secret) if environment == Environment::Production && secret.len() < 32 => {
                anyhow::bail!("REACH_HUB_JWT_SECRET is too short for production: use at least 32 random bytes")
            }
            Some(secret) => Ok(Self::hs256(&SecretString::from(secret))?),
            None if environment == Environment::Production => {
                anyhow::bail!("REACH_HUB_JWT_SECRET or REACH_HUB_JWT_PUBLIC_KEY is required in production")
            }
            None => {
                tracing::warn!("REACH_HUB_JWT_SECRET is not set: every token is rejected");
                Ok(Self { key: None })
            }
        }
    }

    pub fn hs256(secret: &SecretString) -> anyhow::Result<Self> {
        let key = DecodingKey::from_secret(secret.expose_secret().as_bytes())?;
        Ok(Self { key: Some((key, validation(Algorithm::HS256))) })
    }

    /// Verifies the value of an `Authorization` header.
    pub fn verify_header(&self, authorization: Option<&str>) -> Result<Claims, AuthError> {
        // The scheme name is case-insensitive (RFC 9110, section 11.1).
        let token = authorization
            .and_then(|value| value.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim())
            .filter(|token| !token.is_empty())
            .ok_or(AuthError::MissingToken)?;
        let (key, validation) = self.key.as_ref().ok_or(AuthError::NotConfigured)?;
        jsonwebtoken::decode::<Claims>(token, key, validation).map(|data| data.claims).map_err(|error| {
            // The caller learns only the kind of failure; parser details stay in the log.
            tracing::info!(%error, "rejected a bearer token");
            let kind = match error.kind() {
                jsonwebtoken::errors::ErrorKind::ExpiredSignature => "expired",
                jsonwebtoken::errors::ErrorKind::InvalidSignature => "signature does not verify",
                _ => "malformed or not signed with the configured key",
            };
            AuthError::InvalidToken(kind.to_owned())
        })
    }
}

/// Builds the checks every token must pass: the algorithm, `exp` and `nbf`, each with
/// jsonwebtoken's default leeway of 60 seconds for clock skew.
fn validation(algorithm: Algorithm) -> Validation {
    let mut validation = Validation::new(algorithm);
    validation.validate_nbf = true;
    validation
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{EncodingKey, Header};

    fn token(secret: &str, claims: serde_json::Value) -> String {
        jsonwebtoken::encode(&Header::new(Algorithm::HS256), &claims, &EncodingKey::from_secret(secret.as_bytes()).unwrap()).unwrap()
    }

    fn in_an_hour() -> u64 {
        (chrono::Utc::now().timestamp() + 3600) as u64
    }

    #[test]
    fn valid_admin_token_accepted() {
        let verifier = TokenVerifier::hs256(&"s3cret".to_owned().into()).unwrap();
        let header = format!("Bearer {}", token("s3cret", serde_json::json!({"sub": "u1", "email": "a@b.c", "exp": in_an_hour(), "platform_admin": true})));
        let claims = verifier.verify_header(Some(&header)).unwrap();
        assert!(claims.platform_admin);
        assert_eq!(claims.email.as_deref(), Some("a@b.c"));
    }

    #[test]
    fn bad_tokens_rejected() {
        let verifier = TokenVerifier::hs256(&"s3cret".to_owned().into()).unwrap();
        assert_eq!(verifier.verify_header(None), Err(AuthError::MissingToken));
        let lowercase = format!("bearer {}", token("s3cret", serde_json::json!({"sub": "u1", "exp": in_an_hour()})));
        assert!(verifier.verify_header(Some(&lowercase)).is_ok(), "the scheme is case-insensitive");
        assert_eq!(verifier.verify_header(Some("Basic abc")), Err(AuthError::MissingToken));
        let wrong_key = format!("Bearer {}", token("other", serde_json::json!({"sub": "u1", "exp": in_an_hour()})));
        assert!(matches!(verifier.verify_header(Some(&wrong_key)), Err(AuthError::InvalidToken(_))));
        let not_yet = format!("Bearer {}", token("s3cret", serde_json::json!({"sub": "u1", "exp": in_an_hour() + 3600, "nbf": in_an_hour()})));
        assert!(matches!(verifier.verify_header(Some(&not_yet)), Err(AuthError::InvalidToken(_))), "a token before its nbf is rejected");
        let expired = format!("Bearer {}", token("s3cret", serde_json::json!({"sub": "u1", "exp": 1_000_000})));
        assert!(matches!(verifier.verify_header(Some(&expired)), Err(AuthError::InvalidToken(_))));
        let unconfigured = TokenVerifier { key: None };
        let good = format!("Bearer {}", token("s3cret", serde_json::json!({"sub": "u1", "exp": in_an_hour()})));
        assert_eq!(unconfigured.verify_header(Some(&good)), Err(AuthError::NotConfigured));
    }
}
