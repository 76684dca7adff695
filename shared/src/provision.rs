//! Applying a provisioning file: orgs, their WABAs and phone numbers, and webhook
//! subscriptions with their signing secrets. Applying the same file twice changes
//! nothing: rows are only written when a value differs. A phone number's quality rating
//! is taken from the file only when the number is created; after that Meta's quality
//! updates own it.

use anyhow::{Context, bail};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use sqlx::{PgPool, Postgres, Row, Transaction};
use uuid::Uuid;

use crate::events::EventType;
use crate::secrets::SecretSealer;
use crate::signing::WebhookSecret;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProvisioningFile {
    pub orgs: Vec<OrgSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OrgSpec {
    pub id: Uuid,
    pub slug: String,
    pub name: String,
    #[serde(default)]
    pub wabas: Vec<WabaSpec>,
    #[serde(default)]
    pub subscriptions: Vec<SubscriptionSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WabaSpec {
    pub waba_id: String,
    pub access_token: SecretString,
    #[serde(default)]
    pub phone_numbers: Vec<PhoneNumberSpec>,
}

impl std::fmt::Debug for WabaSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WabaSpec").field("waba_id", &self.waba_id).field("phone_numbers", &self.phone_numbers).finish()
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PhoneNumberSpec {
    pub phone_number_id: String,
    pub display_phone_number: String,
    #[serde(default = "default_mps")]
    pub mps: i32,
    #[serde(default = "default_quality")]
    pub quality_rating: String,
}

fn default_mps() -> i32 {
    80
}

fn default_quality() -> String {
    "UNKNOWN".to_owned()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SubscriptionSpec {
    pub id: Uuid,
    pub url: String,
    pub events: Vec<String>,
    pub secret: SecretString,
}

impl std::fmt::Debug for SubscriptionSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubscriptionSpec").field("id", &self.id).field("url", &self.url).field("events", &self.events).finish()
    }
}

/// Rows written by one application of a file; all zero when nothing changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct ProvisionReport {
    pub orgs: u64,
    pub wabas: u64,
    pub phone_numbers: u64,
    pub subscriptions: u64,
    pub secrets: u64,
}

impl ProvisioningFile {
    pub fn parse(json: &str) -> anyhow::Result<Self> {
        let file: Self = serde_json::from_str(json).context("invalid provisioning file")?;
        file.validate()?;
        Ok(file)
    }

    fn validate(&self) -> anyhow::Result<()> {
        for org in &self.orgs {
            for number in org.wabas.iter().flat_map(|w| &w.phone_numbers) {
                if number.mps <= 0 {
                    bail!("phone number {}: mps must be positive, got {}", number.phone_number_id, number.mps);
                }
                if !["GREEN", "YELLOW", "RED", "UNKNOWN"].contains(&number.quality_rating.as_str()) {
                    bail!(
                        "phone number {}: quality_rating {:?} is not GREEN, YELLOW, RED or UNKNOWN",
                        number.phone_number_id,
                        number.quality_rating
                    );
                }
            }
            for subscription in &org.subscriptions {
                let url = subscription.url.as_str();
                if !(url.starts_with("http://") || url.starts_with("https://")) {
                    bail!("subscription {}: url must start with http:// or https://", subscription.id);
                }
                if subscription.events.is_empty() {
                    bail!("subscription {}: events is empty; list event types or \"*\"", subscription.id);
                }
                for event in &subscription.events {
                    if event != "*" && EventType::parse(event).is_none() {
                        bail!("subscription {}: unknown event type {event:?}", subscription.id);
                    }
                }
                WebhookSecret::parse(subscription.secret.expose_secret())
                    .with_context(|| format!("subscription {}: invalid secret", subscription.id))?;
            }
        }
        Ok(())
    }

    /// Applies the file in one transaction.
    pub async fn apply(&self, pool: &PgPool, sealer: &SecretSealer) -> anyhow::Result<ProvisionReport> {
        let mut report = ProvisionReport::default();
        let mut tx = pool.begin().await?;
        for org in &self.orgs {
            report.orgs += sqlx::query(
                "INSERT INTO orgs (id, slug, name) VALUES ($1, $2, $3)
                 ON CONFLICT (id) DO UPDATE SET slug = EXCLUDED.slug, name = EXCLUDED.name, updated_at = now()
                 WHERE (orgs.slug, orgs.name) IS DISTINCT FROM (EXCLUDED.slug, EXCLUDED.name)",
            )
            .bind(org.id)
            .bind(&org.slug)
            .bind(&org.name)
            .execute(&mut *tx)
            .await
            .with_context(|| format!("failed to write org {}", org.slug))?
            .rows_affected();
            for waba in &org.wabas {
                report.wabas += apply_waba(&mut tx, org.id, waba, sealer).await?;
                for number in &waba.phone_numbers {
                    report.phone_numbers += apply_phone_number(&mut tx, org.id, &waba.waba_id, number).await?;
                }
            }
            for subscription in &org.subscriptions {
                let (subscriptions, secrets) = apply_subscription(&mut tx, org.id, subscription, sealer).await?;
                report.subscriptions += subscriptions;
                report.secrets += secrets;
            }
            if !org.subscriptions.is_empty() {
                crate::db::notify_subscriptions_changed(&mut tx, org.id).await?;
            }
        }
        tx.commit().await?;
        Ok(report)
    }
}

async fn apply_waba(tx: &mut Transaction<'_, Postgres>, org_id: Uuid, waba: &WabaSpec, sealer: &SecretSealer) -> anyhow::Result<u64> {
    let existing = sqlx::query("SELECT org_id, access_token_sealed FROM wabas WHERE waba_id = $1")
        .bind(&waba.waba_id)
        .fetch_optional(&mut **tx)
        .await?;
    if let Some(row) = &existing {
        let owner: Uuid = row.get("org_id");
        if owner != org_id {
            bail!("WABA {} already belongs to another org", waba.waba_id);
        }
        let stored = sealer.unseal(row.get("access_token_sealed"))?;
        if stored.expose_secret() == waba.access_token.expose_secret() {
            return Ok(0);
        }
    }
    let sealed = sealer.seal(&waba.access_token)?;
    let written = sqlx::query(
        "INSERT INTO wabas (waba_id, org_id, access_token_sealed) VALUES ($1, $2, $3)
         ON CONFLICT (waba_id) DO UPDATE SET access_token_sealed = EXCLUDED.access_token_sealed, updated_at = now()",
    )
    .bind(&waba.waba_id)
    .bind(org_id)
    .bind(sealed)
    .execute(&mut **tx)
    .await?;
    Ok(written.rows_affected())
}

async fn apply_phone_number(tx: &mut Transaction<'_, Postgres>, org_id: Uuid, waba_id: &str, number: &PhoneNumberSpec) -> anyhow::Result<u64> {
    let digits: String = number.display_phone_number.chars().filter(char::is_ascii_digit).collect();
    let written = sqlx::query(
        "INSERT INTO phone_numbers (phone_number_id, org_id, waba_id, display_phone_number, display_digits, mps, quality_rating)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT (phone_number_id) DO UPDATE SET
             waba_id = EXCLUDED.waba_id,
             display_phone_number = EXCLUDED.display_phone_number,
             display_digits = EXCLUDED.display_digits,
             mps = EXCLUDED.mps,
             updated_at = now()
         WHERE phone_numbers.org_id = EXCLUDED.org_id
           AND (phone_numbers.waba_id, phone_numbers.display_phone_number, phone_numbers.mps)
               IS DISTINCT FROM (EXCLUDED.waba_id, EXCLUDED.display_phone_number, EXCLUDED.mps)
         RETURNING org_id",
    )
    .bind(&number.phone_number_id)
    .bind(org_id)
    .bind(waba_id)
    .bind(&number.display_phone_number)
    .bind(digits)
    .bind(number.mps)
    .bind(&number.quality_rating)
    .fetch_optional(&mut **tx)
    .await?;
    if written.is_none() {
        let owner: Option<Uuid> = sqlx::query_scalar("SELECT org_id FROM phone_numbers WHERE phone_number_id = $1")
            .bind(&number.phone_number_id)
            .fetch_optional(&mut **tx)
            .await?;
        if owner != Some(org_id) {
            bail!("phone number {} already belongs to another org", number.phone_number_id);
        }
    }
    Ok(u64::from(written.is_some()))
}

/// Writes a subscription and makes its secret the active one. A secret not seen before
/// is a rotation: the previous secrets keep signing for 24 hours.
async fn apply_subscription(
    tx: &mut Transaction<'_, Postgres>,
    org_id: Uuid,
    subscription: &SubscriptionSpec,
    sealer: &SecretSealer,
) -> anyhow::Result<(u64, u64)> {
    let mut events = subscription.events.clone();
    events.sort();
    events.dedup();
    let written = sqlx::query(
        "INSERT INTO webhook_subscriptions (id, org_id, url, event_types) VALUES ($1, $2, $3, $4)
         ON CONFLICT (id) DO UPDATE SET url = EXCLUDED.url, event_types = EXCLUDED.event_types, updated_at = now()
         WHERE webhook_subscriptions.org_id = EXCLUDED.org_id
           AND (webhook_subscriptions.url, webhook_subscriptions.event_types)
               IS DISTINCT FROM (EXCLUDED.url, EXCLUDED.event_types)
         RETURNING org_id",
    )
    .bind(subscription.id)
    .bind(org_id)
    .bind(&subscription.url)
    .bind(&events)
    .fetch_optional(&mut **tx)
    .await?;
    if written.is_none() {
        let owner: Option<Uuid> = sqlx::query_scalar("SELECT org_id FROM webhook_subscriptions WHERE id = $1")
            .bind(subscription.id)
            .fetch_optional(&mut **tx)
            .await?;
        if owner != Some(org_id) {
            bail!("subscription {} already belongs to another org", subscription.id);
        }
    }

    let hash = Sha256::digest(subscription.secret.expose_secret().as_bytes()).to_vec();
    let known: Option<(i64, bool)> = sqlx::query_as(
        "SELECT id, expires_at IS NOT NULL FROM webhook_subscription_secrets WHERE subscription_id = $1 AND secret_sha256 = $2",
    )
    .bind(subscription.id)
    .bind(&hash)
    .fetch_optional(&mut **tx)
    .await?;
    let mut secrets = 0;
    if let Some((id, true)) = known {
        // Going back to a secret being rotated out: it signs for good again, and the
        // others are rotated out in its place.
        sqlx::query(
            "UPDATE webhook_subscription_secrets SET expires_at = now() + interval '24 hours'
             WHERE subscription_id = $1 AND expires_at IS NULL",
        )
        .bind(subscription.id)
        .execute(&mut **tx)
        .await?;
        sqlx::query("UPDATE webhook_subscription_secrets SET expires_at = NULL WHERE id = $1").bind(id).execute(&mut **tx).await?;
        secrets = 1;
    }
    if known.is_none() {
        sqlx::query(
            "UPDATE webhook_subscription_secrets SET expires_at = now() + interval '24 hours'
             WHERE subscription_id = $1 AND expires_at IS NULL",
        )
        .bind(subscription.id)
        .execute(&mut **tx)
        .await?;
        sqlx::query(
            "INSERT INTO webhook_subscription_secrets (org_id, subscription_id, secret_sealed, secret_sha256)
             VALUES ($1, $2, $3, $4)",
        )
        .bind(org_id)
        .bind(subscription.id)
        .bind(sealer.seal(&subscription.secret)?)
        .bind(&hash)
        .execute(&mut **tx)
        .await?;
        secrets = 1;
    }
    Ok((u64::from(written.is_some()), secrets))
}
