//! Outbound sends: the job that travels on the send shards, the shard a phone number
//! maps to, the states of an outbound message, and queueing a message (again) through
//! the outbox.
//!
//! A job only names the message; the dispatcher reads the request from
//! `outbound_messages` when it claims the job, so a queue never contains a message body
//! and a stale job cannot send an old version of a message.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use sqlx::{Postgres, Transaction};
use uuid::Uuid;

use crate::amqp::Topic;
use crate::outbox::{self, OutboxMessage};

/// The body of a message on a send shard queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SendJob {
    pub message_id: Uuid,
    pub org_id: Uuid,
    pub phone_number_id: String,
    /// `outbound_messages.dispatch_seq` when the job was queued. A job whose number is
    /// lower than the row's is stale: the message was queued again since.
    pub seq: i32,
}

impl SendJob {
    /// Reads the job of an `outbound_messages` row returning `id`, `org_id`,
    /// `phone_number_id` and `dispatch_seq`.
    pub fn from_row(row: &sqlx::postgres::PgRow) -> Self {
        use sqlx::Row;

        Self { message_id: row.get("id"), org_id: row.get("org_id"), phone_number_id: row.get("phone_number_id"), seq: row.get("dispatch_seq") }
    }

    pub fn to_body(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect("a send job always serialises")
    }
}

/// The shard queue of a phone number: the first eight bytes of SHA-256 of its id,
/// modulo the shard count. Stable across processes, builds and platforms, so every
/// publisher routes a number to the same queue.
///
/// NOTE: changing the shard count moves numbers to other queues; jobs already queued
/// on the old shard can then be sent by another dispatcher at the same time, so drain
/// the send queues before changing `REACH_SEND_SHARDS`.
pub fn shard_of(phone_number_id: &str, shards: u16) -> u16 {
    let digest = Sha256::digest(phone_number_id.as_bytes());
    let prefix = u64::from_be_bytes(digest[..8].try_into().expect("SHA-256 has 32 bytes"));
    (prefix % u64::from(shards.max(1))) as u16
}

/// The state of an outbound message. States only move forward in rank order; failed
/// is terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageState {
    /// Waiting in a send queue or for a retry.
    Queued = 0,
    /// The Graph API took the send and returned a wamid.
    Accepted = 1,
    Sent = 2,
    Delivered = 3,
    Read = 4,
    Failed = 5,
}

impl MessageState {
    pub const ALL: [MessageState; 6] =
        [MessageState::Queued, MessageState::Accepted, MessageState::Sent, MessageState::Delivered, MessageState::Read, MessageState::Failed];

    pub fn as_str(self) -> &'static str {
        match self {
            MessageState::Queued => "queued",
            MessageState::Accepted => "accepted",
            MessageState::Sent => "sent",
            MessageState::Delivered => "delivered",
            MessageState::Read => "read",
            MessageState::Failed => "failed",
        }
    }

    /// Returns the `state_rank` column value.
    pub fn rank(self) -> i16 {
        self as i16
    }

    pub fn parse(value: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == value)
    }
}

/// Writes a send job for each message to the outbox, in the caller's transaction. The
/// `seqs` must be the messages' current `dispatch_seq`.
pub async fn enqueue_jobs(tx: &mut Transaction<'_, Postgres>, jobs: &[SendJob], shards: u16) -> Result<(), sqlx::Error> {
    let messages: Vec<OutboxMessage> = jobs
        .iter()
        .map(|job| OutboxMessage {
            org_id: Some(job.org_id),
            topic: Topic::Send,
            routing_key: shard_of(&job.phone_number_id, shards).to_string(),
            message_id: Uuid::now_v7(),
            payload: job.to_body(),
        })
        .collect();
    outbox::enqueue(tx, &messages).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shard_is_stable_and_in_range() {
        // Fixed values: a change here would move live numbers to other queues.
        assert_eq!(shard_of("1098765432101", 8), shard_of("1098765432101", 8));
        for shards in [1u16, 2, 8, 64] {
            for id in ["1", "1098765432101", "200000000000001"] {
                assert!(shard_of(id, shards) < shards);
            }
        }
        assert_eq!(shard_of("anything", 0), 0, "zero shards is treated as one");
    }

    #[test]
    fn shards_spread_numbers() {
        let mut counts = [0u32; 8];
        for n in 0..8000 {
            counts[shard_of(&format!("10987654{n:05}"), 8) as usize] += 1;
        }
        for count in counts {
            assert!((800..1200).contains(&count), "uneven spread: {counts:?}");
        }
    }

    #[test]
    fn state_ranks_follow_lifecycle() {
        assert!(MessageState::Queued < MessageState::Accepted);
        assert!(MessageState::Read < MessageState::Failed);
        assert_eq!(MessageState::parse("delivered"), Some(MessageState::Delivered));
        assert_eq!(MessageState::Read.rank(), 4);
    }
}
