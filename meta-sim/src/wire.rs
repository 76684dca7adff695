//! JSON in the byte form of Meta's webhooks: compact, with every non-ASCII character
//! written as a lowercase `\uXXXX` escape (a surrogate pair outside the Basic
//! Multilingual Plane) and every `/` as `\/`. A receiver must verify the signature over
//! these bytes, not over a re-serialisation.
//!
//! NOTE: `loadgen/src/wire.rs` implements the same form for generated inbound traffic;
//! the two should move into `reach_shared` together.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::Formatter;

/// Serialises `value` in Meta's byte form, keys in declaration order.
pub fn to_meta_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(512);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, MetaEscapes);
    value.serialize(&mut serializer).expect("serialising plain structs into memory cannot fail");
    out
}

/// Compact output with Meta's extra escapes. serde_json escapes quotes, backslashes and
/// control characters itself and passes the remaining runs of a string here.
struct MetaEscapes;

impl Formatter for MetaEscapes {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + Write,
    {
        let mut start = 0;
        for (index, character) in fragment.char_indices() {
            if character.is_ascii() && character != '/' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[start..index])?;
            if character == '/' {
                writer.write_all(b"\\/")?;
            } else {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units).iter() {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
            start = index + character.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[start..])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meta_json_escapes_like_meta() {
        let wire = to_meta_json(&serde_json::json!({"a/b": "Olá 😀 \"x\"\n"}));
        assert_eq!(String::from_utf8(wire.clone()).unwrap(), r#"{"a\/b":"Ol\u00e1 \ud83d\ude00 \"x\"\n"}"#);
        let parsed: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(parsed["a/b"], "Olá 😀 \"x\"\n");
    }
}
