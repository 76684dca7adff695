//! The WhatsApp Cloud API webhook bodies the generator writes: a `messages` change with
//! inbound messages or statuses. Fields are declared in the order Meta sends them, so
//! the serialised bodies read like Meta's.

use serde::Serialize;

#[derive(Debug, Serialize)]
pub struct Notification {
    pub object: &'static str,
    pub entry: Vec<Entry>,
}

/// One WABA's part of a notification.
#[derive(Debug, Serialize)]
pub struct Entry {
    /// The WABA id.
    pub id: String,
    pub changes: Vec<Change>,
}

#[derive(Debug, Serialize)]
pub struct Change {
    pub value: MessagesValue,
    pub field: &'static str,
}

/// The value of a `messages` change: inbound messages with their senders, or statuses
/// of messages the business sent.
#[derive(Debug, Serialize)]
pub struct MessagesValue {
    pub messaging_product: &'static str,
    pub metadata: Metadata,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub contacts: Vec<Contact>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub messages: Vec<InboundMessage>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub statuses: Vec<Status>,
}

#[derive(Debug, Serialize)]
pub struct Metadata {
    pub display_phone_number: String,
    pub phone_number_id: String,
}

#[derive(Debug, Serialize)]
pub struct Contact {
    pub profile: Profile,
    pub wa_id: String,
}

#[derive(Debug, Serialize)]
pub struct Profile {
    pub name: String,
}

#[derive(Debug, Serialize)]
pub struct InboundMessage {
    /// The business message a reply refers to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub context: Option<Context>,
    pub from: String,
    pub id: String,
    /// Unix seconds, as a string like Meta's.
    pub timestamp: String,
    #[serde(flatten)]
    pub content: Content,
}

#[derive(Debug, Serialize)]
pub struct Context {
    pub from: String,
    pub id: String,
}

/// `type` and the object named after it.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Content {
    Text { text: Text },
    Image { image: Media },
    Document { document: Media },
    Interactive { interactive: Interactive },
}

#[derive(Debug, Serialize)]
pub struct Text {
    pub body: String,
}

#[derive(Debug, Serialize)]
pub struct Media {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub caption: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
    pub mime_type: &'static str,
    /// Base64 of the file's SHA-256.
    pub sha256: String,
    /// The media id to download the file with.
    pub id: String,
}

#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Interactive {
    ButtonReply { button_reply: ButtonReply },
    ListReply { list_reply: ListReply },
}

#[derive(Debug, Serialize)]
pub struct ButtonReply {
    pub id: &'static str,
    pub title: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ListReply {
    pub id: &'static str,
    pub title: &'static str,
    pub description: &'static str,
}

/// A status of a message the business sent.
#[derive(Debug, Serialize)]
pub struct Status {
    pub id: String,
    pub status: &'static str,
    pub timestamp: String,
    pub recipient_id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation: Option<Conversation>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pricing: Option<Pricing>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub errors: Option<Vec<StatusError>>,
}

#[derive(Debug, Serialize)]
pub struct Conversation {
    pub id: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expiration_timestamp: Option<String>,
    pub origin: Origin,
}

#[derive(Debug, Serialize)]
pub struct Origin {
    #[serde(rename = "type")]
    pub kind: &'static str,
}

#[derive(Debug, Serialize)]
pub struct Pricing {
    pub billable: bool,
    pub pricing_model: &'static str,
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub category: &'static str,
}

#[derive(Debug, Serialize)]
pub struct StatusError {
    pub code: i64,
    pub title: &'static str,
    pub message: &'static str,
    pub error_data: ErrorData,
    pub href: &'static str,
}

#[derive(Debug, Serialize)]
pub struct ErrorData {
    pub details: &'static str,
}
