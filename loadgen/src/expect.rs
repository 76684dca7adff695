//! Expected callbacks and how received callbacks are matched to them. The ingress gives
//! each event its id, so the loadgen knows an event by what it can predict: the wamid
//! of a received message, or the wamid and type of a status. The few fixture events
//! without a wamid are known by their type alone.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use reach_shared::events::{Event, EventType};
use serde_json::Value;

/// The identity of one event, shared by the webhook that carries it and the callback
/// that reports it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum EventKey {
    /// `message.received`, matched on `data.message.id`.
    Received { wamid: String },
    /// `message.sent`, `delivered`, `read` or `failed`, matched on `data.status.id` and
    /// the type.
    Status { wamid: String, event_type: EventType },
    /// An event the dispatcher emits about a message sent through the API
    /// (`message.accepted`, or `message.failed` before Meta took it), matched on
    /// `data.message_id` and the type.
    Outbound { message_id: String, event_type: EventType },
    /// Any other type, matched on the type alone. Only the fixtures produce these, one
    /// of each type.
    Other { event_type: EventType },
}

impl EventKey {
    pub fn event_type(&self) -> EventType {
        match self {
            EventKey::Received { .. } => EventType::MessageReceived,
            EventKey::Status { event_type, .. } | EventKey::Outbound { event_type, .. } | EventKey::Other { event_type } => *event_type,
        }
    }

    /// Returns the key of a status, or `None` for a status value the ingress ignores.
    pub fn status(wamid: &str, status: &str) -> Option<Self> {
        let event_type = match status {
            "sent" => EventType::MessageSent,
            "delivered" => EventType::MessageDelivered,
            "read" => EventType::MessageRead,
            "failed" => EventType::MessageFailed,
            _ => return None,
        };
        Some(EventKey::Status { wamid: wamid.to_owned(), event_type })
    }

    /// Reads the key from a callback body. Returns `None` when a message or status
    /// callback lacks its wamid.
    pub fn from_callback(event: &Event) -> Option<Self> {
        let wamid_at = |object: &str| event.data.get(object).and_then(|o| o.get("id")).and_then(Value::as_str).map(str::to_owned);
        let message_id = event.data.get("message_id").and_then(Value::as_str).map(str::to_owned);
        if let (Some(message_id), None) = (message_id, event.data.get("status")) {
            return Some(EventKey::Outbound { message_id, event_type: event.event_type });
        }
        match event.event_type {
            EventType::MessageReceived => wamid_at("message").map(|wamid| EventKey::Received { wamid }),
            EventType::MessageSent | EventType::MessageDelivered | EventType::MessageRead | EventType::MessageFailed => {
                wamid_at("status").map(|wamid| EventKey::Status { wamid, event_type: event.event_type })
            }
            event_type => Some(EventKey::Other { event_type }),
        }
    }
}

/// The event types one subscription receives: a list, or every type for `*`.
#[derive(Debug, Clone)]
pub struct EventFilter {
    all: bool,
    types: HashSet<EventType>,
}

impl EventFilter {
    /// Builds the filter from a subscription's `events` list; unknown names match nothing.
    pub fn new(events: &[String]) -> Self {
        Self {
            all: events.iter().any(|e| e == "*"),
            types: events.iter().filter_map(|e| EventType::parse(e)).collect(),
        }
    }

    pub fn matches(&self, event_type: EventType) -> bool {
        self.all || self.types.contains(&event_type)
    }
}

/// One callback as the subscriber recorded it: every receipt of one `webhook-id` at one
/// subscription.
#[derive(Debug, Clone)]
pub struct Receipt {
    pub subscription: usize,
    pub key: EventKey,
    pub count: u64,
    pub first_at: Instant,
}

/// Every event the loadgen expects, with the instant its webhook was first posted.
#[derive(Debug, Default)]
pub struct Expectations {
    events: HashMap<EventKey, Instant>,
}

impl Expectations {
    /// Records an event carried by a webhook posted at `sent_at`. An event seen again
    /// keeps its first instant.
    pub fn add(&mut self, key: EventKey, sent_at: Instant) {
        self.events.entry(key).or_insert(sent_at);
    }

    pub fn contains(&self, key: &EventKey) -> bool {
        self.events.contains_key(key)
    }

    pub fn event_count(&self) -> usize {
        self.events.len()
    }

    /// Counts the expected callbacks: one per event and matching subscription.
    pub fn callback_count(&self, filters: &[EventFilter]) -> usize {
        self.events
            .keys()
            .map(|key| filters.iter().filter(|f| f.matches(key.event_type())).count())
            .sum()
    }

    /// Matches the receipts against the expectations.
    pub fn tally(&self, filters: &[EventFilter], receipts: &[Receipt]) -> Tally {
        let mut tally = Tally { expected_callbacks: self.callback_count(filters), ..Tally::default() };

        // The first webhook-id seen for an (event, subscription) pair is the expected
        // callback. Another webhook-id for the same pair means a second event for one
        // fact, which is unexpected.
        let mut first_receipt: HashMap<(usize, &EventKey), Instant> = HashMap::new();
        for receipt in receipts {
            tally.duplicates += receipt.count.saturating_sub(1);
            let expected = self.events.contains_key(&receipt.key)
                && filters.get(receipt.subscription).is_some_and(|f| f.matches(receipt.key.event_type()));
            if !expected {
                tally.unexpected += 1;
                continue;
            }
            match first_receipt.entry((receipt.subscription, &receipt.key)) {
                std::collections::hash_map::Entry::Vacant(slot) => {
                    slot.insert(receipt.first_at);
                }
                std::collections::hash_map::Entry::Occupied(mut slot) => {
                    tally.unexpected += 1;
                    if receipt.first_at < *slot.get() {
                        slot.insert(receipt.first_at);
                    }
                }
            }
        }
        tally.delivered = first_receipt.len();
        tally.lost = tally.expected_callbacks.saturating_sub(tally.delivered);
        tally.by_subscription = filters
            .iter()
            .enumerate()
            .map(|(index, filter)| SubscriptionTally {
                expected: self.events.keys().filter(|key| filter.matches(key.event_type())).count(),
                delivered: first_receipt.keys().filter(|(subscription, _)| *subscription == index).count(),
            })
            .collect();

        tally.callback_latencies = first_receipt
            .iter()
            .filter_map(|((_, key), received_at)| self.events.get(*key).map(|sent_at| received_at.saturating_duration_since(*sent_at)))
            .collect();

        // Latency of an event: from its webhook's POST to its first callback anywhere.
        let mut first_by_event: HashMap<&EventKey, Instant> = HashMap::new();
        for ((_, key), at) in &first_receipt {
            first_by_event.entry(key).and_modify(|first| *first = (*first).min(*at)).or_insert(*at);
        }
        tally.latencies = first_by_event
            .iter()
            .filter_map(|(key, received_at)| self.events.get(*key).map(|sent_at| received_at.saturating_duration_since(*sent_at)))
            .collect();
        tally
    }
}

/// The result of matching receipts to expectations.
#[derive(Debug, Default)]
pub struct Tally {
    pub expected_callbacks: usize,
    /// Distinct expected callbacks received at least once.
    pub delivered: usize,
    /// Expected callbacks never received.
    pub lost: usize,
    /// Receipts beyond the first of each (subscription, webhook-id).
    pub duplicates: u64,
    /// Distinct callbacks that match no expectation: an event not sent, a type the
    /// subscription does not list, or a second event id for one expected callback.
    pub unexpected: u64,
    /// Per delivered event, from the POST of its webhook to its first callback.
    pub latencies: Vec<Duration>,
    /// Per delivered callback (event and subscription), from the POST of its webhook
    /// to its first receipt.
    pub callback_latencies: Vec<Duration>,
    /// Expected and delivered callbacks of each subscription, in filter order.
    pub by_subscription: Vec<SubscriptionTally>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SubscriptionTally {
    pub expected: usize,
    pub delivered: usize,
}

#[cfg(test)]
mod tests {
    use chrono::Utc;
    use serde_json::json;
    use uuid::Uuid;

    use super::*;

    fn event(event_type: EventType, data: Value) -> Event {
        Event { id: Uuid::now_v7(), event_type, created_at: Utc::now(), org_id: Uuid::new_v4(), data }
    }

    fn filters() -> Vec<EventFilter> {
        vec![
            EventFilter::new(&["*".to_owned()]),
            EventFilter::new(&["message.received".to_owned(), "message.delivered".to_owned(), "message.read".to_owned()]),
        ]
    }

    fn receipt(subscription: usize, key: &EventKey, count: u64, first_at: Instant) -> Receipt {
        Receipt { subscription, key: key.clone(), count, first_at }
    }

    #[test]
    fn key_read_from_callback_bodies() {
        let received = event(EventType::MessageReceived, json!({"message": {"id": "wamid.A", "type": "text"}}));
        assert_eq!(EventKey::from_callback(&received), Some(EventKey::Received { wamid: "wamid.A".into() }));

        let read = event(EventType::MessageRead, json!({"status": {"id": "wamid.B", "status": "read"}}));
        assert_eq!(
            EventKey::from_callback(&read),
            Some(EventKey::Status { wamid: "wamid.B".into(), event_type: EventType::MessageRead })
        );

        let template = event(EventType::TemplateStatusUpdated, json!({"waba_id": "1"}));
        assert_eq!(
            EventKey::from_callback(&template),
            Some(EventKey::Other { event_type: EventType::TemplateStatusUpdated })
        );

        let without_wamid = event(EventType::MessageSent, json!({"status": {}}));
        assert_eq!(EventKey::from_callback(&without_wamid), None);
    }

    #[test]
    fn status_key_ignores_unknown_statuses() {
        assert_eq!(EventKey::status("w", "deleted"), None);
        assert_eq!(EventKey::status("w", "failed").unwrap().event_type(), EventType::MessageFailed);
    }

    #[test]
    fn filter_star_and_list() {
        let [all, messages] = <[EventFilter; 2]>::try_from(filters()).unwrap();
        assert!(all.matches(EventType::AccountUpdated));
        assert!(messages.matches(EventType::MessageRead));
        assert!(!messages.matches(EventType::MessageSent));
        assert!(!messages.matches(EventType::PhoneNumberQualityUpdated));
    }

    #[test]
    fn callbacks_counted_per_matching_subscription() {
        let now = Instant::now();
        let mut expectations = Expectations::default();
        expectations.add(EventKey::Received { wamid: "a".into() }, now);
        expectations.add(EventKey::status("b", "sent").unwrap(), now);
        expectations.add(EventKey::status("b", "read").unwrap(), now);
        expectations.add(EventKey::Other { event_type: EventType::TemplateStatusUpdated }, now);
        // received and read go to both subscriptions, sent and the template only to `*`.
        assert_eq!(expectations.callback_count(&filters()), 6);
        assert_eq!(expectations.event_count(), 4);
    }

    #[test]
    fn tally_counts_delivered_lost_duplicates_unexpected() {
        let sent_at = Instant::now();
        let received = EventKey::Received { wamid: "a".into() };
        let sent = EventKey::status("b", "sent").unwrap();
        let read = EventKey::status("b", "read").unwrap();
        let mut expectations = Expectations::default();
        for key in [&received, &sent, &read] {
            expectations.add(key.clone(), sent_at);
        }
        let at = |ms| sent_at + Duration::from_millis(ms);

        let receipts = vec![
            receipt(0, &received, 1, at(30)),
            receipt(1, &received, 3, at(10)),
            receipt(0, &sent, 1, at(50)),
            // `sent` is not in the second subscription's list.
            receipt(1, &sent, 1, at(55)),
            // Never expected at all.
            receipt(0, &EventKey::Received { wamid: "zzz".into() }, 1, at(5)),
            // A second event id for the same fact.
            receipt(0, &sent, 1, at(70)),
        ];
        let tally = expectations.tally(&filters(), &receipts);

        assert_eq!(tally.expected_callbacks, 5);
        assert_eq!(tally.delivered, 3);
        assert_eq!(tally.lost, 2);
        assert_eq!(tally.duplicates, 2);
        assert_eq!(tally.unexpected, 3);
        let mut latencies = tally.latencies.clone();
        latencies.sort();
        assert_eq!(latencies, vec![Duration::from_millis(10), Duration::from_millis(50)]);
        let mut per_callback = tally.callback_latencies.clone();
        per_callback.sort();
        assert_eq!(per_callback, [10, 30, 50].map(Duration::from_millis));
        assert_eq!(
            tally.by_subscription,
            [SubscriptionTally { expected: 3, delivered: 2 }, SubscriptionTally { expected: 2, delivered: 1 }]
        );
    }

    #[test]
    fn expectation_keeps_first_send_instant() {
        let first = Instant::now();
        let key = EventKey::Received { wamid: "a".into() };
        let mut expectations = Expectations::default();
        expectations.add(key.clone(), first);
        expectations.add(key.clone(), first + Duration::from_secs(1));
        let tally = expectations.tally(&filters(), &[receipt(0, &key, 1, first + Duration::from_millis(20))]);
        assert_eq!(tally.latencies, vec![Duration::from_millis(20)]);
    }
}
