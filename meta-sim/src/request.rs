//! The body of a send, parsed and checked as the Cloud API checks it. Errors name the
//! field, with code 100 for a missing, mistyped or unsupported parameter and 131009 for
//! a value that is not valid.

use serde::Deserialize;
use serde::de::IgnoredAny;

use crate::meta_error::MetaError;

/// Maximum length of a text body, in characters.
pub const MAX_TEXT_CHARS: usize = 4096;
/// Maximum length of `biz_opaque_callback_data`, in characters.
pub const MAX_CALLBACK_DATA_CHARS: usize = 512;
/// Maximum digits of a recipient (E.164).
pub const MAX_RECIPIENT_DIGITS: usize = 15;

/// Message types the endpoint accepts. Only `text` and `template` have their content
/// checked. For the others, the object named by `type` must be present.
const MESSAGE_TYPES: &[&str] = &[
    "text",
    "template",
    "image",
    "audio",
    "document",
    "video",
    "sticker",
    "location",
    "contacts",
    "interactive",
    "reaction",
];

/// A valid send.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SendRequest {
    /// `to` as given, echoed in `contacts[].input`.
    pub to: String,
    /// The digits of `to`: the recipient's `wa_id`.
    pub to_digits: String,
    pub kind: MessageKind,
    /// Echoed in every status of the message.
    pub biz_opaque_callback_data: Option<String>,
}

/// What the message is, which decides its pricing category.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MessageKind {
    Template,
    /// Any free-form message (text, media, interactive, ...).
    FreeForm,
}

#[derive(Deserialize)]
struct RawSend {
    messaging_product: Option<String>,
    recipient_type: Option<String>,
    to: Option<String>,
    #[serde(rename = "type")]
    message_type: Option<String>,
    text: Option<RawText>,
    template: Option<RawTemplate>,
    biz_opaque_callback_data: Option<String>,
    image: Option<IgnoredAny>,
    audio: Option<IgnoredAny>,
    document: Option<IgnoredAny>,
    video: Option<IgnoredAny>,
    sticker: Option<IgnoredAny>,
    location: Option<IgnoredAny>,
    contacts: Option<IgnoredAny>,
    interactive: Option<IgnoredAny>,
    reaction: Option<IgnoredAny>,
}

#[derive(Deserialize)]
struct RawText {
    body: Option<String>,
}

#[derive(Deserialize)]
struct RawTemplate {
    name: Option<String>,
    language: Option<RawLanguage>,
}

#[derive(Deserialize)]
struct RawLanguage {
    code: Option<String>,
}

impl SendRequest {
    /// Parses and validates a send body.
    pub fn parse(body: &[u8]) -> Result<Self, MetaError> {
        let raw: RawSend = serde_json::from_slice(body)
            .map_err(|error| MetaError::invalid_parameter(format!("Invalid request body: {error}")))?;

        match raw.messaging_product.as_deref() {
            None => return Err(MetaError::missing_parameter("messaging_product")),
            Some("whatsapp") => {}
            Some(other) => {
                return Err(MetaError::invalid_parameter(format!(
                    "Param messaging_product must be one of {{WHATSAPP}} - got \"{other}\"."
                )));
            }
        }
        if let Some(recipient_type) = raw.recipient_type.as_deref()
            && recipient_type != "individual"
        {
            return Err(MetaError::invalid_parameter(format!(
                "Param recipient_type must be one of {{INDIVIDUAL}} - got \"{recipient_type}\"."
            )));
        }

        let to = raw.to.ok_or_else(|| MetaError::missing_parameter("to"))?;
        let to_digits: String = to.chars().filter(char::is_ascii_digit).collect();
        if to_digits.is_empty() || to_digits.len() > MAX_RECIPIENT_DIGITS {
            return Err(MetaError::invalid_value(format!(
                "Param to must be a phone number of 1 to {MAX_RECIPIENT_DIGITS} digits - got \"{to}\"."
            )));
        }

        let message_type = raw.message_type.ok_or_else(|| MetaError::missing_parameter("type"))?;
        let kind = match message_type.as_str() {
            "text" => {
                check_text(raw.text)?;
                MessageKind::FreeForm
            }
            "template" => {
                check_template(raw.template)?;
                MessageKind::Template
            }
            other if MESSAGE_TYPES.contains(&other) => {
                let content_present = match other {
                    "image" => raw.image.is_some(),
                    "audio" => raw.audio.is_some(),
                    "document" => raw.document.is_some(),
                    "video" => raw.video.is_some(),
                    "sticker" => raw.sticker.is_some(),
                    "location" => raw.location.is_some(),
                    "contacts" => raw.contacts.is_some(),
                    "interactive" => raw.interactive.is_some(),
                    _ => raw.reaction.is_some(),
                };
                if !content_present {
                    return Err(MetaError::missing_parameter(other));
                }
                MessageKind::FreeForm
            }
            other => {
                return Err(MetaError::invalid_parameter(format!(
                    "Param type must be one of {{{}}} - got \"{other}\".",
                    MESSAGE_TYPES.join(", ").to_uppercase()
                )));
            }
        };

        if let Some(data) = &raw.biz_opaque_callback_data
            && data.chars().count() > MAX_CALLBACK_DATA_CHARS
        {
            return Err(MetaError::invalid_value(format!(
                "Param biz_opaque_callback_data must be at most {MAX_CALLBACK_DATA_CHARS} characters long."
            )));
        }

        Ok(SendRequest { to, to_digits, kind, biz_opaque_callback_data: raw.biz_opaque_callback_data })
    }
}

fn check_text(text: Option<RawText>) -> Result<(), MetaError> {
    let text = text.ok_or_else(|| MetaError::missing_parameter("text"))?;
    let body = text.body.ok_or_else(|| MetaError::missing_parameter("text['body']"))?;
    let length = body.chars().count();
    if length == 0 {
        return Err(MetaError::invalid_parameter("Param text['body'] must be at least 1 character long.".to_owned()));
    }
    if length > MAX_TEXT_CHARS {
        return Err(MetaError::invalid_parameter(format!(
            "Param text['body'] must be at most {MAX_TEXT_CHARS} characters long."
        )));
    }
    Ok(())
}

fn check_template(template: Option<RawTemplate>) -> Result<(), MetaError> {
    let template = template.ok_or_else(|| MetaError::missing_parameter("template"))?;
    if template.name.as_deref().is_none_or(str::is_empty) {
        return Err(MetaError::missing_parameter("template['name']"));
    }
    let language = template.language.ok_or_else(|| MetaError::missing_parameter("template['language']"))?;
    if language.code.as_deref().is_none_or(str::is_empty) {
        return Err(MetaError::missing_parameter("template['language']['code']"));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta_error::{CODE_INVALID_PARAMETER, CODE_INVALID_VALUE};

    #[test]
    fn parse_accepts_text_and_template() {
        let text = SendRequest::parse(
            br#"{"messaging_product":"whatsapp","recipient_type":"individual","to":"+1 555 000 2222","type":"text","text":{"body":"hi"},"biz_opaque_callback_data":"order-7"}"#,
        )
        .unwrap();
        assert_eq!(text.to_digits, "15550002222");
        assert_eq!(text.kind, MessageKind::FreeForm);
        assert_eq!(text.biz_opaque_callback_data.as_deref(), Some("order-7"));

        let template = SendRequest::parse(
            br#"{"messaging_product":"whatsapp","to":"15550002222","type":"template","template":{"name":"hello_world","language":{"code":"en_US"}}}"#,
        )
        .unwrap();
        assert_eq!(template.kind, MessageKind::Template);
    }

    #[test]
    fn parse_rejects_naming_field() {
        let long_body = "é".repeat(MAX_TEXT_CHARS + 1);
        let long_text =
            format!(r#"{{"messaging_product":"whatsapp","to":"1","type":"text","text":{{"body":"{long_body}"}}}}"#);
        let exact_text = format!(
            r#"{{"messaging_product":"whatsapp","to":"1","type":"text","text":{{"body":"{}"}}}}"#,
            "é".repeat(MAX_TEXT_CHARS)
        );
        assert!(SendRequest::parse(exact_text.as_bytes()).is_ok());

        let cases: &[(&str, u32, &str)] = &[
            ("not json", CODE_INVALID_PARAMETER, "Invalid request body"),
            (
                r#"{"to":"1","type":"text","text":{"body":"x"}}"#,
                CODE_INVALID_PARAMETER,
                "messaging_product is required",
            ),
            (
                r#"{"messaging_product":"sms","to":"1","type":"text","text":{"body":"x"}}"#,
                CODE_INVALID_PARAMETER,
                "messaging_product must be one of",
            ),
            (
                r#"{"messaging_product":"whatsapp","type":"text","text":{"body":"x"}}"#,
                CODE_INVALID_PARAMETER,
                "parameter to is required",
            ),
            (
                r#"{"messaging_product":"whatsapp","to":"abc","type":"text","text":{"body":"x"}}"#,
                CODE_INVALID_VALUE,
                "Param to must be",
            ),
            (
                r#"{"messaging_product":"whatsapp","to":"1","text":{"body":"x"}}"#,
                CODE_INVALID_PARAMETER,
                "parameter type is required",
            ),
            (
                r#"{"messaging_product":"whatsapp","to":"1","type":"fax"}"#,
                CODE_INVALID_PARAMETER,
                "Param type must be one of",
            ),
            (
                r#"{"messaging_product":"whatsapp","to":"1","type":"text","text":{"body":""}}"#,
                CODE_INVALID_PARAMETER,
                "at least 1 character",
            ),
            (&long_text, CODE_INVALID_PARAMETER, "at most 4096 characters"),
            (
                r#"{"messaging_product":"whatsapp","to":"1","type":"text"}"#,
                CODE_INVALID_PARAMETER,
                "parameter text is required",
            ),
            (
                r#"{"messaging_product":"whatsapp","to":"1","type":"template","template":{"name":"t"}}"#,
                CODE_INVALID_PARAMETER,
                "template['language']",
            ),
            (
                r#"{"messaging_product":"whatsapp","to":"1","type":"image"}"#,
                CODE_INVALID_PARAMETER,
                "parameter image is required",
            ),
            (
                r#"{"messaging_product":"whatsapp","recipient_type":"group","to":"1","type":"text","text":{"body":"x"}}"#,
                CODE_INVALID_PARAMETER,
                "recipient_type",
            ),
            (
                r#"{"messaging_product":"whatsapp","to":1,"type":"text","text":{"body":"x"}}"#,
                CODE_INVALID_PARAMETER,
                "invalid type",
            ),
        ];
        for (body, code, detail) in cases {
            let error = SendRequest::parse(body.as_bytes()).unwrap_err();
            assert_eq!(error.code, *code, "{body}");
            let text = format!("{} {}", error.message, error.details.unwrap_or_default());
            assert!(text.contains(detail), "{body}: {text:?} does not mention {detail:?}");
        }
    }
}
