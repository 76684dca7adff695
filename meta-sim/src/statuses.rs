//! Status webhooks: each accepted send becomes `sent`, then `delivered` and perhaps
//! `read` (or `sent` then `failed` under a `status_failed` rule), due one status delay
//! apart after the send's response. A scheduler task keeps the due statuses in a heap
//! and, when they fall due, posts them in bodies of up to 50 statuses of one phone
//! number, shaped and escaped as Meta's.
//!
//! Memory is bounded: the handler hands messages over through a bounded channel, and
//! at most `max_pending_statuses` statuses wait in the heap or in a POST. Statuses over
//! either bound are dropped and counted.

use std::cmp::Ordering as CmpOrdering;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use rand::Rng;
use rand::seq::SliceRandom;
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::ids::conversation_id;
use crate::meta_error::describe;
use crate::request::MessageKind;
use crate::settings::{SimNumber, SimSettings, WebhookTarget};
use crate::stats::GlobalCounters;
use crate::webhook::Poster;
use reach_shared::meta_wire::to_meta_json;

/// Most statuses Meta puts in one webhook body, as the simulator batches them.
pub const MAX_STATUSES_PER_BODY: usize = 50;

/// Messages waiting in the channel from the send handler to the scheduler, at most.
const CHANNEL_CAPACITY: usize = 65_536;

/// Minimum time between two flushes, so statuses falling due a few milliseconds apart
/// share a body instead of each making a POST.
const FLUSH_GAP: Duration = Duration::from_millis(10);

/// Link of Meta's error-code reference, carried by every status error.
const ERROR_CODES_HREF: &str = "https://developers.facebook.com/docs/whatsapp/cloud-api/support/error-codes/";

/// An accepted send, handed from the send handler to the scheduler.
#[derive(Debug)]
pub struct AcceptedMessage {
    /// Index of the phone number in [`SimSettings::numbers`].
    pub number: usize,
    pub wamid: String,
    pub recipient_id: String,
    pub biz_opaque_callback_data: Option<String>,
    pub kind: MessageKind,
    /// Error code of the `failed` status that replaces `delivered` and `read`.
    pub failure: Option<u32>,
    /// Whether a delivered message is also read.
    pub read: bool,
    /// When the send's response goes out. The first status is due a status delay later.
    pub responded_at: Instant,
    /// The same moment as Unix seconds, for the status timestamps.
    pub responded_unix: f64,
}

/// The send handler's end of the scheduler.
#[derive(Debug, Clone)]
pub struct StatusQueue {
    sender: mpsc::Sender<AcceptedMessage>,
    counters: Arc<GlobalCounters>,
}

impl StatusQueue {
    /// Hands a message to the scheduler without waiting. When the channel is full, its
    /// statuses are counted as dropped.
    pub fn push(&self, message: AcceptedMessage) {
        if let Err(error) = self.sender.try_send(message) {
            let message = match error {
                mpsc::error::TrySendError::Full(message) | mpsc::error::TrySendError::Closed(message) => message,
            };
            GlobalCounters::add(&self.counters.statuses_dropped, status_kinds(&message).len() as u64);
        }
    }
}

/// Starts the scheduler and returns its queue. The scheduler, and the POSTs it started,
/// stop when `shutdown` fires, and `tracker` lets the caller wait for them.
pub fn start(
    settings: &SimSettings,
    target: &WebhookTarget,
    counters: Arc<GlobalCounters>,
    tracker: &TaskTracker,
    shutdown: CancellationToken,
) -> anyhow::Result<StatusQueue> {
    let (sender, receiver) = mpsc::channel(CHANNEL_CAPACITY.min(settings.max_pending_statuses));
    let poster = Arc::new(Poster::new(settings, target, counters.clone(), shutdown.clone())?);
    let scheduler = Scheduler {
        numbers: settings.numbers.iter().map(WebhookMetadata::of).collect(),
        status_delay: settings.status_delay,
        reorder_ratio: settings.reorder_ratio,
        max_pending: settings.max_pending_statuses,
        counters: counters.clone(),
        poster,
        tracker: tracker.clone(),
        heap: BinaryHeap::new(),
        next_sequence: 0,
    };
    tracker.spawn(scheduler.run(receiver, shutdown));
    Ok(StatusQueue { sender, counters })
}

/// Lists the statuses a message gets, in their true order.
fn status_kinds(message: &AcceptedMessage) -> &'static [StatusKind] {
    match (message.failure, message.read) {
        (Some(_), _) => &[StatusKind::Sent, StatusKind::Failed],
        (None, true) => &[StatusKind::Sent, StatusKind::Delivered, StatusKind::Read],
        (None, false) => &[StatusKind::Sent, StatusKind::Delivered],
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StatusKind {
    Sent,
    Delivered,
    Read,
    Failed,
}

/// The webhook envelope fields of one phone number.
#[derive(Debug)]
struct WebhookMetadata {
    phone_number_id: String,
    waba_id: String,
    /// Digits only, as Meta writes it in `metadata`.
    display_phone_number: String,
}

impl WebhookMetadata {
    fn of(number: &SimNumber) -> Self {
        Self {
            phone_number_id: number.phone_number_id.clone(),
            waba_id: number.waba_id.clone(),
            display_phone_number: number.display_phone_number.chars().filter(char::is_ascii_digit).collect(),
        }
    }
}

/// Fields shared by every status of one message.
#[derive(Debug)]
struct MessageInfo {
    number: usize,
    wamid: String,
    recipient_id: String,
    biz_opaque_callback_data: Option<String>,
    kind: MessageKind,
    failure: Option<u32>,
    conversation_id: String,
}

#[derive(Debug)]
struct PendingStatus {
    due: Instant,
    /// Tie-breaker between equal due times, in scheduling order.
    sequence: u64,
    kind: StatusKind,
    /// Unix seconds written in the status, always in the true order of the statuses.
    timestamp: i64,
    message: Arc<MessageInfo>,
}

// Reversed, so the max-heap `BinaryHeap` pops the earliest due status first.
impl Ord for PendingStatus {
    fn cmp(&self, other: &Self) -> CmpOrdering {
        (other.due, other.sequence).cmp(&(self.due, self.sequence))
    }
}

impl PartialOrd for PendingStatus {
    fn partial_cmp(&self, other: &Self) -> Option<CmpOrdering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for PendingStatus {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other) == CmpOrdering::Equal
    }
}

impl Eq for PendingStatus {}

struct Scheduler {
    numbers: Vec<WebhookMetadata>,
    status_delay: Duration,
    reorder_ratio: f64,
    max_pending: usize,
    counters: Arc<GlobalCounters>,
    poster: Arc<Poster>,
    tracker: TaskTracker,
    heap: BinaryHeap<PendingStatus>,
    next_sequence: u64,
}

impl Scheduler {
    async fn run(mut self, mut receiver: mpsc::Receiver<AcceptedMessage>, shutdown: CancellationToken) {
        let mut last_flush = Instant::now();
        loop {
            let next_due = self.heap.peek().map(|status| status.due.max(last_flush + FLUSH_GAP));
            // A disabled branch's future is still built, so it needs some instant.
            let wake_at = next_due.unwrap_or_else(|| Instant::now() + Duration::from_secs(3600));
            tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                // Before receiving, so a steady stream of sends cannot starve the flush.
                () = tokio::time::sleep_until(wake_at.into()), if next_due.is_some() => {
                    last_flush = Instant::now();
                    if !self.flush_due(last_flush, &shutdown).await {
                        break;
                    }
                }
                received = receiver.recv() => {
                    let Some(message) = received else { break };
                    self.schedule(message);
                    while let Ok(message) = receiver.try_recv() {
                        self.schedule(message);
                    }
                }
            }
        }
        let abandoned = self.heap.len();
        self.counters.statuses_pending.fetch_sub(abandoned, Ordering::Relaxed);
        tracing::info!(abandoned_statuses = abandoned, "status scheduler stopped");
    }

    /// Puts a message's statuses in the heap, or counts them as dropped when the pending
    /// bound is reached.
    fn schedule(&mut self, message: AcceptedMessage) {
        let kinds = status_kinds(&message);
        let pending = self.counters.statuses_pending.load(Ordering::Relaxed);
        if pending + kinds.len() > self.max_pending {
            GlobalCounters::add(&self.counters.statuses_dropped, kinds.len() as u64);
            return;
        }
        self.counters.statuses_pending.fetch_add(kinds.len(), Ordering::Relaxed);

        // Slot k (from 1) is due k status delays after the response. A reordered message
        // assigns its statuses to shuffled slots, but timestamps keep the true order.
        let mut slots: Vec<(Instant, u64)> = (1..=kinds.len() as u32)
            .map(|k| {
                self.next_sequence += 1;
                (message.responded_at + self.status_delay * k, self.next_sequence)
            })
            .collect();
        let mut rng = rand::rng();
        if rng.random_bool(self.reorder_ratio) {
            slots.shuffle(&mut rng);
        }

        let day = (message.responded_unix / 86_400.0) as i64;
        let number = &self.numbers[message.number];
        let info = Arc::new(MessageInfo {
            conversation_id: conversation_id(&number.phone_number_id, &message.recipient_id, day),
            number: message.number,
            wamid: message.wamid,
            recipient_id: message.recipient_id,
            biz_opaque_callback_data: message.biz_opaque_callback_data,
            kind: message.kind,
            failure: message.failure,
        });
        for (k, (kind, (due, sequence))) in kinds.iter().zip(slots).enumerate() {
            let offset = self.status_delay.as_secs_f64() * (k + 1) as f64;
            self.heap.push(PendingStatus {
                due,
                sequence,
                kind: *kind,
                timestamp: (message.responded_unix + offset) as i64,
                message: info.clone(),
            });
        }
    }

    /// Posts every status due by `now`, grouped by phone number, up to 50 a body.
    /// Returns false when shutdown fired while waiting for a free POST slot.
    async fn flush_due(&mut self, now: Instant, shutdown: &CancellationToken) -> bool {
        let mut by_number: HashMap<usize, Vec<PendingStatus>> = HashMap::new();
        while self.heap.peek().is_some_and(|status| status.due <= now) {
            let Some(status) = self.heap.pop() else { break };
            by_number.entry(status.message.number).or_default().push(status);
        }
        let mut bodies = Vec::new();
        for (number, statuses) in &by_number {
            for batch in statuses.chunks(MAX_STATUSES_PER_BODY) {
                bodies.push((build_body(&self.numbers[*number], batch), batch.len()));
            }
        }
        drop(by_number);

        let mut unposted: usize = bodies.iter().map(|(_, statuses)| statuses).sum();
        for (body, statuses) in bodies {
            let Some(permit) = self.poster.acquire_slot(shutdown).await else {
                self.counters.statuses_pending.fetch_sub(unposted, Ordering::Relaxed);
                return false;
            };
            unposted -= statuses;
            let poster = self.poster.clone();
            self.tracker.spawn(poster.deliver(body.into(), statuses, permit));
        }
        true
    }
}

/// Serialises a webhook body holding `batch`, which belongs to one phone number.
fn build_body(number: &WebhookMetadata, batch: &[PendingStatus]) -> Vec<u8> {
    let statuses = batch.iter().map(StatusItem::of).collect();
    let notification = Notification {
        object: "whatsapp_business_account",
        entry: [Entry {
            id: &number.waba_id,
            changes: [Change {
                value: ChangeValue {
                    messaging_product: "whatsapp",
                    metadata: Metadata {
                        display_phone_number: &number.display_phone_number,
                        phone_number_id: &number.phone_number_id,
                    },
                    statuses,
                },
                field: "messages",
            }],
        }],
    };
    to_meta_json(&notification)
}

#[derive(Serialize)]
struct Notification<'a> {
    object: &'static str,
    entry: [Entry<'a>; 1],
}

#[derive(Serialize)]
struct Entry<'a> {
    id: &'a str,
    changes: [Change<'a>; 1],
}

#[derive(Serialize)]
struct Change<'a> {
    value: ChangeValue<'a>,
    field: &'static str,
}

#[derive(Serialize)]
struct ChangeValue<'a> {
    messaging_product: &'static str,
    metadata: Metadata<'a>,
    statuses: Vec<StatusItem<'a>>,
}

#[derive(Serialize)]
struct Metadata<'a> {
    display_phone_number: &'a str,
    phone_number_id: &'a str,
}

#[derive(Serialize)]
struct StatusItem<'a> {
    id: &'a str,
    status: &'static str,
    timestamp: String,
    recipient_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    biz_opaque_callback_data: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    conversation: Option<Conversation<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pricing: Option<Pricing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    errors: Option<[StatusError; 1]>,
}

#[derive(Serialize)]
struct Conversation<'a> {
    id: &'a str,
    expiration_timestamp: String,
    origin: Origin,
}

#[derive(Serialize)]
struct Origin {
    #[serde(rename = "type")]
    origin_type: &'static str,
}

#[derive(Serialize)]
struct Pricing {
    billable: bool,
    pricing_model: &'static str,
    #[serde(rename = "type")]
    pricing_type: &'static str,
    category: &'static str,
}

#[derive(Serialize)]
struct StatusError {
    code: u32,
    title: &'static str,
    message: &'static str,
    error_data: ErrorData,
    href: &'static str,
}

#[derive(Serialize)]
struct ErrorData {
    details: &'static str,
}

impl<'a> StatusItem<'a> {
    fn of(status: &'a PendingStatus) -> Self {
        let message = &*status.message;
        // A template opens a utility conversation and is billed, while a free-form reply
        // inside the customer service window is free.
        let (category, billable, pricing_type) = match message.kind {
            MessageKind::Template => ("utility", true, "regular"),
            MessageKind::FreeForm => ("service", false, "free_customer_service"),
        };
        let pricing = Pricing { billable, pricing_model: "PMP", pricing_type, category };
        let mut item = StatusItem {
            id: &message.wamid,
            status: "sent",
            timestamp: status.timestamp.to_string(),
            recipient_id: &message.recipient_id,
            biz_opaque_callback_data: message.biz_opaque_callback_data.as_deref(),
            conversation: None,
            pricing: None,
            errors: None,
        };
        match status.kind {
            StatusKind::Sent => {
                item.conversation = Some(Conversation {
                    id: &message.conversation_id,
                    expiration_timestamp: (status.timestamp + 86_400).to_string(),
                    origin: Origin { origin_type: category },
                });
                item.pricing = Some(pricing);
            }
            StatusKind::Delivered => {
                item.status = "delivered";
                item.pricing = Some(pricing);
            }
            StatusKind::Read => item.status = "read",
            StatusKind::Failed => {
                let code = message.failure.unwrap_or(131026);
                let description = describe(code);
                item.status = "failed";
                item.errors = Some([StatusError {
                    code,
                    title: description.title,
                    message: description.title,
                    error_data: ErrorData { details: description.details },
                    href: ERROR_CODES_HREF,
                }]);
            }
        }
        item
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pending(kind: StatusKind, timestamp: i64, failure: Option<u32>) -> PendingStatus {
        PendingStatus {
            due: Instant::now(),
            sequence: 0,
            kind,
            timestamp,
            message: Arc::new(MessageInfo {
                number: 0,
                wamid: "wamid.X".to_owned(),
                recipient_id: "15550002222".to_owned(),
                biz_opaque_callback_data: Some("order/7 é".to_owned()),
                kind: MessageKind::Template,
                failure,
                conversation_id: "c0ffee".to_owned(),
            }),
        }
    }

    #[test]
    fn body_has_meta_shape() {
        let number = WebhookMetadata {
            phone_number_id: "200000000000001".to_owned(),
            waba_id: "100000000000001".to_owned(),
            display_phone_number: "15550001111".to_owned(),
        };
        let batch =
            [pending(StatusKind::Sent, 1767225601, None), pending(StatusKind::Failed, 1767225602, Some(131026))];
        let body = build_body(&number, &batch);
        let text = String::from_utf8(body.clone()).unwrap();
        assert!(text.contains(r#""biz_opaque_callback_data":"order\/7 \u00e9""#), "{text}");

        let value: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(value["object"], "whatsapp_business_account");
        assert_eq!(value["entry"][0]["id"], "100000000000001");
        let change = &value["entry"][0]["changes"][0];
        assert_eq!(change["field"], "messages");
        assert_eq!(change["value"]["metadata"]["display_phone_number"], "15550001111");
        let sent = &change["value"]["statuses"][0];
        assert_eq!(sent["status"], "sent");
        assert_eq!(sent["timestamp"], "1767225601");
        assert_eq!(sent["conversation"]["expiration_timestamp"], "1767312001");
        assert_eq!(sent["pricing"]["category"], "utility");
        let failed = &change["value"]["statuses"][1];
        assert_eq!(failed["status"], "failed");
        assert_eq!(failed["errors"][0]["code"], 131026);
        assert_eq!(failed["errors"][0]["title"], "Message undeliverable");
        assert_eq!(failed["biz_opaque_callback_data"], "order/7 é");
    }

    #[test]
    fn heap_pops_earliest_first() {
        let now = Instant::now();
        let mut heap = BinaryHeap::new();
        for (offset, sequence) in [(30, 1), (10, 2), (10, 3), (20, 4)] {
            let mut status = pending(StatusKind::Sent, 0, None);
            status.due = now + Duration::from_millis(offset);
            status.sequence = sequence;
            heap.push(status);
        }
        let order: Vec<u64> = std::iter::from_fn(|| heap.pop().map(|status| status.sequence)).collect();
        assert_eq!(order, [2, 3, 4, 1]);
    }
}
