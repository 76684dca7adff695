//! The operator audit log, `platform.audit_events`. The table is append-only: a trigger
//! rejects UPDATE, DELETE and TRUNCATE. Every operator request and every state-changing
//! operator command writes one row.

use sqlx::PgExecutor;
use uuid::Uuid;

/// One audited operator action.
#[derive(Debug, Clone, Default)]
pub struct AuditEvent {
    pub actor_user_id: Option<String>,
    pub actor_email: Option<String>,
    /// `Controller.Method`-style name, for example `PlatformHealth.Show`.
    pub action: String,
    pub target_type: Option<String>,
    pub target_id: Option<String>,
    pub target_org_id: Option<Uuid>,
    pub ip: Option<String>,
    pub user_agent: Option<String>,
    pub status_code: i32,
    pub reason: Option<String>,
}

/// Appends the event; pass a transaction to make it part of the change it describes.
pub async fn record<'e>(executor: impl PgExecutor<'e>, event: &AuditEvent) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO platform.audit_events
             (actor_user_id, actor_email, action, target_type, target_id, target_org_id, ip, user_agent, status_code, reason)
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)",
    )
    .bind(&event.actor_user_id)
    .bind(&event.actor_email)
    .bind(&event.action)
    .bind(&event.target_type)
    .bind(&event.target_id)
    .bind(event.target_org_id)
    .bind(&event.ip)
    .bind(&event.user_agent)
    .bind(event.status_code)
    .bind(&event.reason)
    .execute(executor)
    .await?;
    Ok(())
}
