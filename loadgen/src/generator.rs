//! Generated WhatsApp webhook traffic of realistic shapes, in Meta's wire form, with
//! the events each body should produce.
//!
//! Inbound bodies carry texts (accents, CJK, emoji), images and documents with media
//! ids, and interactive button and list replies. Status bodies carry batches for
//! several messages. Some batches are out of order, some statuses are `failed` with an
//! `errors` array, and some complete messages from earlier batches. A few bodies carry
//! one entry per WABA. Every wamid is unique within a run, and the run tag in each
//! wamid keeps runs apart.

use std::collections::VecDeque;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use rand::rngs::StdRng;
use rand::seq::{IndexedRandom, SliceRandom};
use rand::{Rng, SeedableRng};

use crate::expect::EventKey;
use crate::meta_body::{
    ButtonReply, Change, Contact, Content, Context, Conversation, Entry, ErrorData, InboundMessage, Interactive, ListReply,
    Media, MessagesValue, Metadata, Notification, Origin, Pricing, Profile, Status, StatusError, Text,
};
use reach_shared::meta_wire::to_meta_json;

/// A business phone number the traffic is addressed to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessNumber {
    pub waba_id: String,
    pub phone_number_id: String,
    /// Digits only, as Meta writes it in `metadata`.
    pub display_phone_number: String,
}

/// Returns the two numbers of the demo org. The fixtures in `fixtures/meta` are
/// addressed to the first.
pub fn demo_numbers() -> Vec<BusinessNumber> {
    vec![
        BusinessNumber {
            waba_id: "100000000000001".into(),
            phone_number_id: "200000000000001".into(),
            display_phone_number: "15550001111".into(),
        },
        BusinessNumber {
            waba_id: "100000000000002".into(),
            phone_number_id: "200000000000002".into(),
            display_phone_number: "15550003333".into(),
        },
    ]
}

/// One generated body and the events the ingress should create from it.
#[derive(Debug, Clone)]
pub struct GeneratedWebhook {
    pub body: Vec<u8>,
    pub events: Vec<EventKey>,
}

/// Share of bodies with one entry per WABA.
const MULTI_ENTRY_SHARE: f64 = 0.05;
/// Share of single-change bodies that carry inbound messages; the rest carry statuses.
const INBOUND_SHARE: f64 = 0.5;
/// Share of status batches written out of order.
const SHUFFLED_BATCH_SHARE: f64 = 0.3;
/// Statuses held back for later batches, per number, before they are flushed faster.
const MAX_HELD_STATUSES: usize = 256;

/// Size in bytes of every `text`-shaped body: the raw body the pgbench baseline
/// (`bench/ingress_baseline.sql`) stores per webhook.
pub const TEXT_BODY_BYTES: usize = 760;

/// The kind of bodies a generator writes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum Shape {
    /// The realistic mix: texts, media, interactive replies, status batches, a few
    /// bodies with two entries.
    #[default]
    Mixed,
    /// One inbound text from one customer to the first number per body, so one event
    /// per webhook, padded to [`TEXT_BODY_BYTES`]. The benchmarks use it.
    Text,
}

/// An endless source of webhooks; take as many as needed.
pub struct Generator {
    rng: StdRng,
    numbers: Vec<BusinessNumber>,
    run_tag: String,
    sequence: u64,
    /// Per number, statuses of earlier messages still to be sent.
    held_statuses: Vec<VecDeque<PlannedStatus>>,
    shape: Shape,
}

/// A status to emit for a message the business sent.
#[derive(Debug, Clone)]
struct PlannedStatus {
    wamid: String,
    recipient: String,
    status: &'static str,
    /// The conversation and pricing category of the message, the same on each status.
    conversation_id: String,
    category: &'static str,
}

impl Generator {
    /// `seed` fixes the shapes and contents; `run_tag` (letters and digits) goes into
    /// every wamid so two runs never share one.
    pub fn new(numbers: Vec<BusinessNumber>, seed: u64, run_tag: &str) -> Self {
        assert!(!numbers.is_empty(), "the generator needs at least one business number");
        let held_statuses = numbers.iter().map(|_| VecDeque::new()).collect();
        Self {
            rng: StdRng::seed_from_u64(seed),
            numbers,
            run_tag: run_tag.to_owned(),
            sequence: 0,
            held_statuses,
            shape: Shape::Mixed,
        }
    }

    /// Writes bodies of `shape` from now on.
    pub fn with_shape(mut self, shape: Shape) -> Self {
        self.shape = shape;
        self
    }

    /// Generates the next body.
    pub fn next_webhook(&mut self) -> GeneratedWebhook {
        if self.shape == Shape::Text {
            return self.text_webhook();
        }
        let mut events = Vec::new();
        let entry = if self.numbers.len() > 1 && self.rng.random_bool(MULTI_ENTRY_SHARE) {
            let mut picked: Vec<usize> = (0..self.numbers.len()).collect();
            picked.shuffle(&mut self.rng);
            picked.into_iter().take(2).map(|number| self.entry(number, &mut events)).collect()
        } else {
            let number = self.rng.random_range(0..self.numbers.len());
            vec![self.entry(number, &mut events)]
        };
        let body = to_meta_json(&Notification { object: "whatsapp_business_account", entry });
        GeneratedWebhook { body, events }
    }

    /// Builds a body with one inbound text to the first number, its text padded with
    /// ASCII so the body is [`TEXT_BODY_BYTES`] long.
    fn text_webhook(&mut self) -> GeneratedWebhook {
        let customer = self.customer_number();
        let name = (*CONTACT_NAMES.choose(&mut self.rng).expect("non-empty")).to_owned();
        let id = self.wamid(&customer, Direction::Inbound);
        let template = TEXTS.choose(&mut self.rng).expect("non-empty");
        let text = template.replace("{n}", &self.sequence.to_string());
        let build = |text: String| {
            let message = InboundMessage {
                context: None,
                from: customer.clone(),
                id: id.clone(),
                timestamp: unix_now(),
                content: Content::Text { text: Text { body: text } },
            };
            let value = MessagesValue {
                messaging_product: "whatsapp",
                metadata: self.metadata(0),
                contacts: vec![Contact { profile: Profile { name: name.clone() }, wa_id: customer.clone() }],
                messages: vec![message],
                statuses: Vec::new(),
            };
            let entry = Entry { id: self.numbers[0].waba_id.clone(), changes: vec![Change { value, field: "messages" }] };
            to_meta_json(&Notification { object: "whatsapp_business_account", entry: vec![entry] })
        };
        let unpadded = build(text.clone());
        // Each filler character is one ASCII byte in the wire form.
        let missing = TEXT_BODY_BYTES.saturating_sub(unpadded.len());
        let body = if missing == 0 {
            unpadded
        } else {
            let filler: String = TEXT_FILLER.chars().cycle().take(missing).collect();
            build(format!("{text}{filler}"))
        };
        GeneratedWebhook { body, events: vec![EventKey::Received { wamid: id }] }
    }

    fn entry(&mut self, number: usize, events: &mut Vec<EventKey>) -> Entry {
        let value = if self.rng.random_bool(INBOUND_SHARE) {
            self.inbound_value(number, events)
        } else {
            self.status_value(number, events)
        };
        Entry { id: self.numbers[number].waba_id.clone(), changes: vec![Change { value, field: "messages" }] }
    }

    fn metadata(&self, number: usize) -> Metadata {
        let number = &self.numbers[number];
        Metadata {
            display_phone_number: number.display_phone_number.clone(),
            phone_number_id: number.phone_number_id.clone(),
        }
    }

    /// Builds one customer's messages: usually one, sometimes two in a row.
    fn inbound_value(&mut self, number: usize, events: &mut Vec<EventKey>) -> MessagesValue {
        let customer = self.customer_number();
        let name = (*CONTACT_NAMES.choose(&mut self.rng).expect("non-empty")).to_owned();
        let count = if self.rng.random_bool(0.1) { 2 } else { 1 };
        let messages: Vec<InboundMessage> = (0..count).map(|_| self.inbound_message(number, &customer)).collect();
        events.extend(messages.iter().map(|m| EventKey::Received { wamid: m.id.clone() }));
        MessagesValue {
            messaging_product: "whatsapp",
            metadata: self.metadata(number),
            contacts: vec![Contact { profile: Profile { name }, wa_id: customer }],
            messages,
            statuses: Vec::new(),
        }
    }

    fn inbound_message(&mut self, number: usize, customer: &str) -> InboundMessage {
        let id = self.wamid(customer, Direction::Inbound);
        let serial = self.sequence;
        let mut context = None;
        let content = match self.rng.random_range(0..100) {
            0..55 => {
                let template = TEXTS.choose(&mut self.rng).expect("non-empty");
                Content::Text { text: Text { body: template.replace("{n}", &serial.to_string()) } }
            }
            55..67 => Content::Image {
                image: Media {
                    caption: IMAGE_CAPTIONS.choose(&mut self.rng).expect("non-empty").map(str::to_owned),
                    filename: None,
                    mime_type: "image/jpeg",
                    sha256: self.media_sha256(),
                    id: self.media_id(),
                },
            },
            67..75 => Content::Document {
                document: Media {
                    caption: None,
                    filename: Some(DOCUMENT_NAMES.choose(&mut self.rng).expect("non-empty").replace("{n}", &serial.to_string())),
                    mime_type: "application/pdf",
                    sha256: self.media_sha256(),
                    id: self.media_id(),
                },
            },
            75..88 => {
                context = Some(self.reply_context(number, customer));
                let (id, title) = *BUTTONS.choose(&mut self.rng).expect("non-empty");
                Content::Interactive { interactive: Interactive::ButtonReply { button_reply: ButtonReply { id, title } } }
            }
            _ => {
                context = Some(self.reply_context(number, customer));
                let (id, title, description) = *LIST_ROWS.choose(&mut self.rng).expect("non-empty");
                Content::Interactive { interactive: Interactive::ListReply { list_reply: ListReply { id, title, description } } }
            }
        };
        InboundMessage { context, from: customer.to_owned(), id, timestamp: unix_now(), content }
    }

    /// Builds the context of an interactive reply: the business message it replies to.
    fn reply_context(&mut self, number: usize, customer: &str) -> Context {
        Context { from: self.numbers[number].display_phone_number.clone(), id: self.wamid(customer, Direction::Outbound) }
    }

    /// Builds a batch of statuses: held statuses of earlier messages first, then new
    /// messages. Each new message gets a planned lifecycle, whose first statuses go in
    /// this batch and the rest are held for later ones.
    fn status_value(&mut self, number: usize, events: &mut Vec<EventKey>) -> MessagesValue {
        let mut batch: Vec<PlannedStatus> = Vec::new();
        let held_now = if self.held_statuses[number].len() > MAX_HELD_STATUSES { 8 } else { self.rng.random_range(0..=3) };
        for _ in 0..held_now {
            match self.held_statuses[number].pop_front() {
                Some(status) => batch.push(status),
                None => break,
            }
        }

        let new_messages = self.rng.random_range(1..=3);
        for _ in 0..new_messages {
            let recipient = self.customer_number();
            let wamid = self.wamid(&recipient, Direction::Outbound);
            let conversation_id = hex::encode(self.rng.random::<[u8; 16]>());
            let category = *CATEGORIES.choose(&mut self.rng).expect("non-empty");
            let lifecycle = *LIFECYCLES.choose(&mut self.rng).expect("non-empty");
            let sent_now = self.rng.random_range(1..=lifecycle.len());
            let mut planned = lifecycle.iter().map(|status| PlannedStatus {
                wamid: wamid.clone(),
                recipient: recipient.clone(),
                status,
                conversation_id: conversation_id.clone(),
                category,
            });
            batch.extend(planned.by_ref().take(sent_now));
            let mut later: Vec<PlannedStatus> = planned.collect();
            // A later batch may report `read` before `delivered`.
            if later.len() > 1 && self.rng.random_bool(0.3) {
                later.reverse();
            }
            self.held_statuses[number].extend(later);
        }
        if self.rng.random_bool(SHUFFLED_BATCH_SHARE) {
            batch.shuffle(&mut self.rng);
        }

        let statuses: Vec<Status> = batch.into_iter().map(|planned| self.status(planned)).collect();
        events.extend(statuses.iter().filter_map(|s| EventKey::status(&s.id, s.status)));
        MessagesValue {
            messaging_product: "whatsapp",
            metadata: self.metadata(number),
            contacts: Vec::new(),
            messages: Vec::new(),
            statuses,
        }
    }

    fn status(&mut self, planned: PlannedStatus) -> Status {
        let timestamp = unix_now();
        let billed = matches!(planned.status, "sent" | "delivered");
        let category = planned.category;
        let conversation = billed.then(|| Conversation {
            id: planned.conversation_id,
            expiration_timestamp: (planned.status == "sent").then(|| (chrono::Utc::now().timestamp() + 86_400).to_string()),
            origin: Origin { kind: category },
        });
        let pricing = billed.then_some(Pricing { billable: true, pricing_model: "PMP", kind: "regular", category });
        let errors = (planned.status == "failed").then(|| {
            let (code, title, details) = *SEND_ERRORS.choose(&mut self.rng).expect("non-empty");
            vec![StatusError {
                code,
                title,
                message: title,
                error_data: ErrorData { details },
                href: "https://developers.facebook.com/documentation/business-messaging/whatsapp/support/error-codes",
            }]
        });
        Status { id: planned.wamid, status: planned.status, timestamp, recipient_id: planned.recipient, conversation, pricing, errors }
    }

    /// Returns a random customer's WhatsApp number in the 555 range.
    fn customer_number(&mut self) -> String {
        format!("1555{:07}", self.rng.random_range(0..10_000_000))
    }

    /// Builds a wamid the way Meta's look: base64 of the counterpart's number, a
    /// direction byte and a unique tag (the run tag and a sequence number).
    fn wamid(&mut self, counterpart: &str, direction: Direction) -> String {
        self.sequence += 1;
        let tag = format!("{}{:012X}", self.run_tag, self.sequence);
        let mut raw = vec![0x1c, 0x18, counterpart.len() as u8];
        raw.extend_from_slice(counterpart.as_bytes());
        raw.extend_from_slice(&[0x15, 0x02, 0x00, direction as u8, 0x18, tag.len() as u8]);
        raw.extend_from_slice(tag.as_bytes());
        raw.push(0x00);
        format!("wamid.{}", BASE64.encode(raw))
    }

    fn media_id(&mut self) -> String {
        self.rng.random_range(1_000_000_000_000_000u64..10_000_000_000_000_000).to_string()
    }

    fn media_sha256(&mut self) -> String {
        BASE64.encode(self.rng.random::<[u8; 32]>())
    }
}

impl Iterator for Generator {
    type Item = GeneratedWebhook;

    fn next(&mut self) -> Option<GeneratedWebhook> {
        Some(self.next_webhook())
    }
}

/// The direction byte inside a wamid.
#[derive(Clone, Copy)]
enum Direction {
    Outbound = 0x11,
    Inbound = 0x12,
}

fn unix_now() -> String {
    chrono::Utc::now().timestamp().to_string()
}

/// Status sequences a sent message goes through.
const LIFECYCLES: &[&[&str]] = &[
    &["sent", "delivered", "read"],
    &["sent", "delivered", "read"],
    &["sent", "delivered", "read"],
    &["sent", "delivered"],
    &["sent", "delivered"],
    &["sent"],
    &["sent", "failed"],
    &["failed"],
];

/// Pricing categories of business-initiated conversations.
const CATEGORIES: &[&str] = &["utility", "marketing", "service", "authentication"];

const CONTACT_NAMES: &[&str] = &[
    "Zoë Tester",
    "José Álvarez",
    "Ana Luíza Conceição",
    "山田 太郎",
    "김민준",
    "Ayşe Yılmaz",
    "Nguyễn Văn An",
    "Søren Kjærgård",
    "Renée Dubois",
    "Дмитрий Орлов",
    "محمد علي",
    "Chloé 🌸",
    "Sam",
];

/// Message texts; `{n}` becomes a sequence number.
const TEXTS: &[&str] = &[
    "Olá! Qual o preço do café? ☕",
    "¿Dónde está mi pedido #{n}? 📦",
    "ご注文ありがとうございます！明日届きますか？",
    "这个多少钱？我想买两个。",
    "Merci beaucoup, à demain 👋",
    "Grüße aus Köln – Lieferung an Straße 5/7 bitte",
    "Can I change order {n} to size M/L? 🙏",
    "訂單 {n} 已收到 ✅",
    "Привет! Когда будет доставка?",
    "🎉🎉🎉",
    "Preço: R$ 12,50 — ok? https://example.com/p/{n}",
    "Is 50% off still valid? <promo> @store",
    "Tak for hjælpen 😊 vi ses på søndag",
    "İyi günler, siparişim nerede?",
    "ok",
];

/// Appended to `text`-shaped messages until the body has its size.
const TEXT_FILLER: &str = " and one more thing about the order, please call me back when you can.";

const IMAGE_CAPTIONS: &[Option<&str>] = &[Some("Foto do recibo 📷"), Some("写真です"), Some("Before/after"), None, None];

const DOCUMENT_NAMES: &[&str] = &["Orçamento nº {n}.pdf", "請求書_{n}.pdf", "Invoice 2026/{n}.pdf", "Résumé {n}.pdf"];

const BUTTONS: &[(&str, &str)] = &[("confirm", "Sim, confirmar ✅"), ("cancel", "Cancelar ❌"), ("reschedule", "Remarcar 📅"), ("yes", "はい")];

const LIST_ROWS: &[(&str, &str, &str)] = &[
    ("size_m", "Tamanho M", "Médio — 40/42"),
    ("pickup", "Retirar na loja", "Rua São João, 100"),
    ("deliver", "配送", "明日お届け"),
    ("agent", "Falar com atendente 🙋", "Seg–Sex 9h/18h"),
];

/// Graph API send errors as they appear in a `failed` status: code, title, details.
const SEND_ERRORS: &[(i64, &str, &str)] = &[
    (131026, "Message undeliverable", "Message Undeliverable."),
    (131047, "Re-engagement message", "Message failed to send because more than 24 hours have passed since the customer last replied to this number."),
    (131049, "This message was not delivered to maintain healthy ecosystem engagement.", "In order to maintain a healthy ecosystem engagement, the message failed to be delivered."),
    (131000, "Something went wrong", "Message failed to send due to an unknown error."),
];

#[cfg(test)]
mod tests {
    use std::collections::HashSet;

    use serde_json::Value;

    use super::*;
    use crate::fixtures::expected_events;

    fn generate(count: usize, seed: u64) -> Vec<GeneratedWebhook> {
        Generator::new(demo_numbers(), seed, "T3ST0001").take(count).collect()
    }

    #[test]
    fn events_match_bodies() {
        for webhook in generate(2_000, 1) {
            let from_body = expected_events(&webhook.body).unwrap();
            assert_eq!(from_body, webhook.events, "{}", String::from_utf8_lossy(&webhook.body));
        }
    }

    #[test]
    fn bodies_are_meta_escaped_ascii() {
        for webhook in generate(500, 2) {
            assert!(webhook.body.is_ascii());
            assert!(!webhook.body.windows(2).any(|w| w[1] == b'/' && w[0] != b'\\'), "unescaped slash");
            let parsed: Value = serde_json::from_slice(&webhook.body).unwrap();
            assert_eq!(parsed["object"], "whatsapp_business_account");
        }
    }

    #[test]
    fn wamids_and_status_facts_unique() {
        let mut inbound = HashSet::new();
        let mut statuses = HashSet::new();
        for webhook in generate(5_000, 3) {
            for event in webhook.events {
                match &event {
                    EventKey::Received { wamid } => assert!(inbound.insert(wamid.clone()), "{wamid} repeated"),
                    EventKey::Status { .. } => assert!(statuses.insert(event.clone()), "{event:?} repeated"),
                    EventKey::Other { .. } | EventKey::Outbound { .. } => panic!("the generator writes no other events"),
                }
            }
        }
        let outbound: HashSet<&str> = statuses
            .iter()
            .map(|key| match key {
                EventKey::Status { wamid, .. } => wamid.as_str(),
                _ => unreachable!(),
            })
            .collect();
        assert!(outbound.iter().all(|wamid| !inbound.contains(*wamid)));
    }

    #[test]
    fn mix_covers_every_shape() {
        let webhooks = generate(3_000, 4);
        let bodies: Vec<Value> = webhooks.iter().map(|w| serde_json::from_slice(&w.body).unwrap()).collect();
        let messages: Vec<&Value> = bodies
            .iter()
            .flat_map(|b| b["entry"].as_array().unwrap())
            .flat_map(|e| e["changes"][0]["value"]["messages"].as_array().into_iter().flatten())
            .collect();
        for kind in ["text", "image", "document", "interactive"] {
            assert!(messages.iter().any(|m| m["type"] == kind), "no {kind} message");
        }
        for kind in ["button_reply", "list_reply"] {
            assert!(messages.iter().any(|m| m["interactive"]["type"] == kind), "no {kind}");
        }
        assert!(messages.iter().any(|m| m["image"]["id"].is_string()));
        assert!(messages.iter().any(|m| m["text"]["body"].as_str().is_some_and(|t| t.chars().any(|c| c as u32 > 0xFFFF))), "no emoji");

        let statuses: Vec<&Value> = bodies
            .iter()
            .flat_map(|b| b["entry"].as_array().unwrap())
            .flat_map(|e| e["changes"][0]["value"]["statuses"].as_array().into_iter().flatten())
            .collect();
        assert!(statuses.iter().any(|s| s["status"] == "failed" && s["errors"][0]["code"].is_i64()));
        for kind in ["sent", "delivered", "read"] {
            assert!(statuses.iter().any(|s| s["status"] == kind), "no {kind} status");
        }
        assert!(bodies.iter().any(|b| b["entry"].as_array().unwrap().len() == 2), "no multi-entry body");
        let wabas: HashSet<&str> = bodies.iter().flat_map(|b| b["entry"].as_array().unwrap()).map(|e| e["id"].as_str().unwrap()).collect();
        assert_eq!(wabas.len(), 2);
    }

    #[test]
    fn some_batches_out_of_order() {
        let rank = |status: &str| ["sent", "delivered", "read"].iter().position(|s| *s == status);
        let mut out_of_order = 0;
        for webhook in generate(2_000, 5) {
            let mut last_rank = std::collections::HashMap::new();
            for event in &webhook.events {
                if let EventKey::Status { wamid, event_type } = event
                    && let Some(rank) = rank(event_type.as_str().trim_start_matches("message."))
                {
                    if last_rank.get(wamid).is_some_and(|previous| *previous > rank) {
                        out_of_order += 1;
                    }
                    last_rank.insert(wamid.clone(), rank);
                }
            }
        }
        assert!(out_of_order > 10, "only {out_of_order} out-of-order statuses");
    }

    #[test]
    fn text_shape_one_event_fixed_size() {
        let webhooks: Vec<GeneratedWebhook> =
            Generator::new(demo_numbers(), 6, "T3ST0002").with_shape(Shape::Text).take(500).collect();
        let mut wamids = HashSet::new();
        for webhook in webhooks {
            assert_eq!(webhook.body.len(), TEXT_BODY_BYTES, "{}", String::from_utf8_lossy(&webhook.body));
            assert_eq!(expected_events(&webhook.body).unwrap(), webhook.events);
            let [EventKey::Received { wamid }] = webhook.events.as_slice() else { panic!("{:?}", webhook.events) };
            assert!(wamids.insert(wamid.clone()));
            let parsed: Value = serde_json::from_slice(&webhook.body).unwrap();
            assert_eq!(parsed["entry"][0]["changes"][0]["value"]["metadata"]["phone_number_id"], "200000000000001");
            assert_eq!(parsed["entry"][0]["changes"][0]["value"]["messages"][0]["type"], "text");
        }
    }

    #[test]
    fn same_seed_same_shapes() {
        let first: Vec<Vec<u8>> = generate(50, 9).into_iter().map(|w| w.body).collect();
        let second: Vec<Vec<u8>> = generate(50, 9).into_iter().map(|w| w.body).collect();
        let strip = |body: &Vec<u8>| {
            let mut value: Value = serde_json::from_slice(body).unwrap();
            strip_timestamps(&mut value);
            value
        };
        assert_eq!(first.iter().map(strip).collect::<Vec<_>>(), second.iter().map(strip).collect::<Vec<_>>());
    }

    fn strip_timestamps(value: &mut Value) {
        match value {
            Value::Object(map) => {
                map.remove("timestamp");
                map.remove("expiration_timestamp");
                map.values_mut().for_each(strip_timestamps);
            }
            Value::Array(items) => items.iter_mut().for_each(strip_timestamps),
            _ => {}
        }
    }
}
