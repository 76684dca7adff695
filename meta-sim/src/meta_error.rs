//! Graph API errors as Meta returns them: `{"error":{"message","type","code",
//! "error_data","error_subcode","fbtrace_id"}}` with the HTTP status Meta uses, and the
//! titles and details of the WhatsApp error codes the simulator can return or inject.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use rand::Rng;
use serde::Serialize;

/// Invalid or missing access token.
pub const CODE_INVALID_TOKEN: u32 = 190;
/// Invalid parameter, unknown object or unparseable request.
pub const CODE_INVALID_PARAMETER: u32 = 100;
/// A parameter is present but its value is not valid.
pub const CODE_INVALID_VALUE: u32 = 131009;
/// Cloud API throughput (messages per second) of the sending number reached.
pub const CODE_RATE_LIMIT: u32 = 130429;
/// Too many messages from one number to one recipient in a short time.
pub const CODE_PAIR_RATE_LIMIT: u32 = 131056;
/// Unknown error, sent with HTTP 500 as at Meta.
pub const CODE_UNKNOWN: u32 = 131000;

/// An error response of the send endpoint, shaped as the Graph API shapes it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("meta error {code}: {message}")]
pub struct MetaError {
    pub http_status: StatusCode,
    pub code: u32,
    /// `OAuthException` for nearly every WhatsApp error, `GraphMethodException` for an
    /// unknown object.
    pub error_type: &'static str,
    pub message: String,
    /// `error_data.details`, absent for token errors as at Meta.
    pub details: Option<String>,
    pub subcode: Option<u32>,
}

impl MetaError {
    pub fn invalid_token() -> Self {
        Self {
            http_status: StatusCode::UNAUTHORIZED,
            code: CODE_INVALID_TOKEN,
            error_type: "OAuthException",
            message: "Invalid OAuth access token - Cannot parse access token".to_owned(),
            details: None,
            subcode: None,
        }
    }

    /// Builds the error for a phone number id that does not exist (or that the token
    /// cannot reach), with Meta's subcode 33.
    pub fn unknown_object(id: &str) -> Self {
        Self {
            http_status: StatusCode::BAD_REQUEST,
            code: CODE_INVALID_PARAMETER,
            error_type: "GraphMethodException",
            message: format!(
                "Unsupported post request. Object with ID '{id}' does not exist, cannot be loaded due to missing \
                 permissions, or does not support this operation. Please read the Graph API documentation at \
                 https://developers.facebook.com/docs/graph-api"
            ),
            details: None,
            subcode: Some(33),
        }
    }

    /// Builds the error for a path that is not `/{vNN.N}/{phone_number_id}/messages`.
    pub fn unknown_path(details: String) -> Self {
        Self {
            http_status: StatusCode::BAD_REQUEST,
            code: CODE_INVALID_PARAMETER,
            error_type: "GraphMethodException",
            message: "Unknown path components".to_owned(),
            details: Some(details),
            subcode: None,
        }
    }

    /// Builds the error for a missing parameter as Meta words it: `(#100) The parameter X is required.`
    pub fn missing_parameter(name: &str) -> Self {
        Self::with_code(
            StatusCode::BAD_REQUEST,
            CODE_INVALID_PARAMETER,
            format!("(#100) The parameter {name} is required."),
            format!("The parameter {name} is required."),
        )
    }

    /// Builds the error for a parameter of the wrong type or shape, or an unparseable body
    /// (code 100).
    pub fn invalid_parameter(details: String) -> Self {
        Self::with_code(StatusCode::BAD_REQUEST, CODE_INVALID_PARAMETER, "(#100) Invalid parameter".to_owned(), details)
    }

    /// Builds the error for a parameter whose value is not valid (code 131009).
    pub fn invalid_value(details: String) -> Self {
        Self::known(StatusCode::BAD_REQUEST, CODE_INVALID_VALUE, Some(details))
    }

    pub fn rate_limited() -> Self {
        Self::known(StatusCode::BAD_REQUEST, CODE_RATE_LIMIT, None)
    }

    pub fn pair_rate_limited() -> Self {
        Self::known(StatusCode::BAD_REQUEST, CODE_PAIR_RATE_LIMIT, None)
    }

    /// Builds the random fault of `--error-rate`: HTTP 500 with code 131000.
    pub fn unknown_failure() -> Self {
        Self::known(StatusCode::INTERNAL_SERVER_ERROR, CODE_UNKNOWN, None)
    }

    /// Builds an error injected by a rule: `code` with its catalogue title and details.
    pub fn injected(http_status: StatusCode, code: u32) -> Self {
        Self::known(http_status, code, None)
    }

    /// Builds the error of a catalogue code, `(#code) Title`, with the catalogue's details
    /// unless `details` is given.
    fn known(http_status: StatusCode, code: u32, details: Option<String>) -> Self {
        let description = describe(code);
        let message = format!("(#{code}) {}", description.title);
        let details = details.unwrap_or_else(|| description.details.to_owned());
        Self::with_code(http_status, code, message, details)
    }

    fn with_code(http_status: StatusCode, code: u32, message: String, details: String) -> Self {
        Self { http_status, code, error_type: "OAuthException", message, details: Some(details), subcode: None }
    }
}

impl IntoResponse for MetaError {
    fn into_response(self) -> Response {
        let body = ErrorEnvelope {
            error: ErrorBody {
                message: &self.message,
                error_type: self.error_type,
                code: self.code,
                error_data: self.details.as_deref().map(|details| ErrorData { messaging_product: "whatsapp", details }),
                error_subcode: self.subcode,
                fbtrace_id: fbtrace_id(),
            },
        };
        (self.http_status, Json(body)).into_response()
    }
}

#[derive(Serialize)]
struct ErrorEnvelope<'a> {
    error: ErrorBody<'a>,
}

#[derive(Serialize)]
struct ErrorBody<'a> {
    message: &'a str,
    #[serde(rename = "type")]
    error_type: &'static str,
    code: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_data: Option<ErrorData<'a>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error_subcode: Option<u32>,
    fbtrace_id: String,
}

#[derive(Serialize)]
struct ErrorData<'a> {
    messaging_product: &'static str,
    details: &'a str,
}

/// Title and details of a WhatsApp error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ErrorDescription {
    pub title: &'static str,
    pub details: &'static str,
}

/// Describes `code` as Meta's error-code reference does (wording as of Graph API v21).
/// A code missing from the catalogue gets a generic title, so a rule may inject any code.
pub fn describe(code: u32) -> ErrorDescription {
    let (title, details) = match code {
        0 => ("AuthException", "We were unable to authenticate the app user."),
        3 => ("API Method", "Capability or permissions issue."),
        4 => ("API Too Many Calls", "The app has reached its API call rate limit."),
        10 => ("Permission Denied", "Permission is either not granted or has been removed."),
        100 => ("Invalid parameter", "The request included one or more unsupported or misspelled parameters."),
        190 => ("Access token has expired", "Your access token has expired."),
        200 => ("API Permission", "Permission is either not granted or has been removed."),
        368 => ("Temporarily blocked for policies violations", "The WhatsApp Business Account is restricted."),
        80007 => ("Rate limit issues", "The WhatsApp Business Account has reached its rate limit."),
        130429 => ("Rate limit hit", "Cloud API message throughput has been reached."),
        130472 => (
            "User's number is part of an experiment",
            "Failed to send message because this user's phone number is part of an experiment.",
        ),
        131000 => ("Something went wrong", "Message failed to send due to an unknown error."),
        131005 => ("Access denied", "Permission is either not granted or has been removed."),
        131008 => ("Required parameter is missing", "The request is missing a required parameter."),
        131009 => ("Parameter value is not valid", "One or more parameter values are invalid."),
        131016 => ("Service unavailable", "A service is temporarily unavailable."),
        131021 => ("Recipient cannot be sender", "Sender and recipient phone number is the same."),
        131026 => ("Message undeliverable", "Message Undeliverable."),
        131031 => ("Account has been locked", "The WhatsApp Business Account is restricted or disabled."),
        131042 => ("Business eligibility payment issue", "There was an error related to your payment method."),
        131045 => ("Incorrect certificate", "Message failed to send due to a phone number registration error."),
        131047 => (
            "Re-engagement message",
            "More than 24 hours have passed since the recipient last replied to the sender number.",
        ),
        131048 => (
            "Spam rate limit hit",
            "Message failed to send because there are restrictions on how many messages can be sent from this phone number.",
        ),
        131049 => {
            ("Meta chose not to deliver", "This message was not delivered to maintain healthy ecosystem engagement.")
        }
        131051 => ("Unsupported message type", "Unsupported message type."),
        131052 => ("Media download error", "Unable to download the media sent by the user."),
        131053 => ("Media upload error", "Unable to upload the media used in the message."),
        131056 => (
            "(Business Account, Consumer Account) pair rate limit hit",
            "Too many messages sent from the sender phone number to the same recipient phone number in a short period of time.",
        ),
        131057 => ("Account in maintenance mode", "Business Account is in maintenance mode."),
        132000 => (
            "Number of parameters does not match the expected number of params",
            "The number of parameters does not match the template.",
        ),
        132001 => (
            "Template does not exist",
            "The template does not exist in the specified language or has not been approved.",
        ),
        133010 => ("Account not registered", "The phone number is not registered on the WhatsApp Business Platform."),
        _ => ("Injected error", "Error injected by a simulator rule."),
    };
    ErrorDescription { title, details }
}

/// Generates a trace id in the form of Meta's `fbtrace_id`: `A` and 22 base64url characters.
pub fn fbtrace_id() -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut rng = rand::rng();
    let mut id = String::with_capacity(23);
    id.push('A');
    for _ in 0..22 {
        id.push(char::from(ALPHABET[rng.random_range(0..ALPHABET.len())]));
    }
    id
}
