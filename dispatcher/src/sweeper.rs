//! The sweeper: queues again the messages whose wait is over (retries, pair-rate holds,
//! ended pauses, overflowed backlogs). Each message gets a new `dispatch_seq` and a job
//! through the outbox, in one transaction; any job of the old number becomes stale.
//! Several dispatchers sweep safely side by side (`FOR UPDATE SKIP LOCKED`).

use std::time::Duration;

use reach_shared::outbox::OutboxWaker;
use reach_shared::sends::{self, SendJob};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

/// Messages queued again per transaction.
const SWEEP_BATCH: i64 = 1000;

pub async fn run(pool: PgPool, shards: u16, interval: Duration, waker: OutboxWaker, shutdown: CancellationToken) {
    loop {
        match sweep_once(&pool, shards).await {
            Ok(count) if count > 0 => {
                waker.wake();
                metrics::counter!("reach_dispatcher_requeued_total").increment(count as u64);
                if count as i64 == SWEEP_BATCH {
                    continue;
                }
            }
            Ok(_) => {}
            Err(error) => tracing::warn!(%error, "failed to queue due messages again"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

/// Queues one batch of due messages again; returns how many.
pub async fn sweep_once(pool: &PgPool, shards: u16) -> Result<usize, sqlx::Error> {
    let mut tx = pool.begin().await?;
    let rows = sqlx::query(
        "WITH due AS (
             SELECT m.id FROM outbound_messages m
             JOIN phone_numbers p ON p.phone_number_id = m.phone_number_id
             WHERE m.state = 'queued' AND m.next_attempt_at IS NOT NULL AND m.next_attempt_at <= now()
               AND (p.sending_paused_until IS NULL OR p.sending_paused_until <= now())
             ORDER BY m.next_attempt_at
             LIMIT $1
             FOR UPDATE OF m SKIP LOCKED)
         UPDATE outbound_messages AS m SET next_attempt_at = NULL, dispatch_seq = m.dispatch_seq + 1, updated_at = now()
         FROM due WHERE m.id = due.id
         RETURNING m.id, m.org_id, m.phone_number_id, m.dispatch_seq",
    )
    .bind(SWEEP_BATCH)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        tx.commit().await?;
        return Ok(0);
    }
    let jobs: Vec<SendJob> = rows
        .iter()
        .map(SendJob::from_row)
        .collect();
    sends::enqueue_jobs(&mut tx, &jobs, shards).await?;
    tx.commit().await?;
    Ok(jobs.len())
}
