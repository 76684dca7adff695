//! JSON serialisation in the byte form Meta sends: every non-ASCII character escaped as
//! lowercase `\uXXXX` (characters outside the Basic Multilingual Plane as a UTF-16
//! surrogate pair) and every `/` escaped as `\/`. The ingress signs and verifies these
//! exact bytes, so generated traffic must use the same form to exercise it.

use std::io::{self, Write};

use serde::Serialize;
use serde_json::ser::Formatter;

/// Serialises `value` in Meta's wire form. Keys keep the order in which `value`
/// serialises them, which for structs is their declaration order.
pub fn to_meta_json<T: Serialize + ?Sized>(value: &T) -> Vec<u8> {
    let mut out = Vec::with_capacity(1024);
    let mut serializer = serde_json::Serializer::with_formatter(&mut out, MetaFormatter);
    value.serialize(&mut serializer).expect("serialising into memory does not fail");
    out
}

/// A compact formatter that escapes what Meta escapes. serde_json already escapes
/// quotes, backslashes and control characters before handing the rest of a string to
/// [`Formatter::write_string_fragment`], so only non-ASCII and `/` are handled here.
struct MetaFormatter;

impl Formatter for MetaFormatter {
    fn write_string_fragment<W>(&mut self, writer: &mut W, fragment: &str) -> io::Result<()>
    where
        W: ?Sized + Write,
    {
        let mut plain_start = 0;
        for (index, character) in fragment.char_indices() {
            if character.is_ascii() && character != '/' {
                continue;
            }
            writer.write_all(&fragment.as_bytes()[plain_start..index])?;
            if character == '/' {
                writer.write_all(b"\\/")?;
            } else {
                let mut units = [0u16; 2];
                for unit in character.encode_utf16(&mut units) {
                    write!(writer, "\\u{unit:04x}")?;
                }
            }
            plain_start = index + character.len_utf8();
        }
        writer.write_all(&fragment.as_bytes()[plain_start..])
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

    use super::*;
    use crate::signing::meta_signature;

    /// The app secret the fixtures under `fixtures/meta` are signed with.
    const TEST_APP_SECRET: &str = "test_app_secret_0123456789abcdef";

    #[test]
    fn escapes_non_ascii_and_slash() {
        let text = "Olá é 😀 a/b 山 \"q\" \\ \n <ok> 100% @home";
        let wire = String::from_utf8(to_meta_json(text)).unwrap();
        assert_eq!(
            wire,
            r#""Ol\u00e1 \u00e9 \ud83d\ude00 a\/b \u5c71 \"q\" \\ \n <ok> 100% @home""#
        );
        assert!(wire.is_ascii());
    }

    #[test]
    fn escaped_output_parses_back_to_input() {
        let value = serde_json::json!({"k/ey": "Zoë 🎉 東京 https://x.y/z", "n": [1, 2.5, null, true]});
        let wire = to_meta_json(&value);
        let reparsed: serde_json::Value = serde_json::from_slice(&wire).unwrap();
        assert_eq!(reparsed, value);
    }

    #[test]
    fn fixtures_reproduced_byte_for_byte() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../fixtures/meta");
        let mut checked = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let path = entry.unwrap().path();
            let Some(name) = path.file_name().and_then(|n| n.to_str()) else { continue };
            let Some(stem) = name.strip_suffix(".pretty.json") else { continue };
            let pretty = std::fs::read(&path).unwrap();
            let wire = std::fs::read(dir.join(format!("{stem}.wire.json"))).unwrap();
            let ordered: OrderedJson = serde_json::from_slice(&pretty).unwrap();
            let produced = to_meta_json(&ordered);
            assert_eq!(String::from_utf8_lossy(&produced), String::from_utf8_lossy(&wire), "{stem}");
            assert_eq!(
                meta_signature(TEST_APP_SECRET, &produced),
                meta_signature(TEST_APP_SECRET, &wire),
                "{stem}"
            );
            checked += 1;
        }
        assert_eq!(checked, 4);
    }

    /// A JSON value that keeps object keys in document order, so a fixture can be
    /// parsed and serialised again without reordering.
    enum OrderedJson {
        Null,
        Bool(bool),
        Number(serde_json::Number),
        String(String),
        Array(Vec<OrderedJson>),
        Object(Vec<(String, OrderedJson)>),
    }

    impl Serialize for OrderedJson {
        fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            use serde::ser::{SerializeMap, SerializeSeq};
            match self {
                OrderedJson::Null => serializer.serialize_unit(),
                OrderedJson::Bool(b) => serializer.serialize_bool(*b),
                OrderedJson::Number(n) => n.serialize(serializer),
                OrderedJson::String(s) => serializer.serialize_str(s),
                OrderedJson::Array(items) => {
                    let mut seq = serializer.serialize_seq(Some(items.len()))?;
                    for item in items {
                        seq.serialize_element(item)?;
                    }
                    seq.end()
                }
                OrderedJson::Object(entries) => {
                    let mut map = serializer.serialize_map(Some(entries.len()))?;
                    for (key, value) in entries {
                        map.serialize_entry(key, value)?;
                    }
                    map.end()
                }
            }
        }
    }

    impl<'de> Deserialize<'de> for OrderedJson {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_any(OrderedJsonVisitor)
        }
    }

    struct OrderedJsonVisitor;

    impl<'de> Visitor<'de> for OrderedJsonVisitor {
        type Value = OrderedJson;

        fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
            f.write_str("any JSON value")
        }

        fn visit_unit<E>(self) -> Result<OrderedJson, E> {
            Ok(OrderedJson::Null)
        }

        fn visit_bool<E>(self, v: bool) -> Result<OrderedJson, E> {
            Ok(OrderedJson::Bool(v))
        }

        fn visit_u64<E>(self, v: u64) -> Result<OrderedJson, E> {
            Ok(OrderedJson::Number(v.into()))
        }

        fn visit_i64<E>(self, v: i64) -> Result<OrderedJson, E> {
            Ok(OrderedJson::Number(v.into()))
        }

        fn visit_f64<E: serde::de::Error>(self, v: f64) -> Result<OrderedJson, E> {
            serde_json::Number::from_f64(v).map(OrderedJson::Number).ok_or_else(|| E::custom("non-finite number"))
        }

        fn visit_str<E>(self, v: &str) -> Result<OrderedJson, E> {
            Ok(OrderedJson::String(v.to_owned()))
        }

        fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<OrderedJson, A::Error> {
            let mut items = Vec::new();
            while let Some(item) = seq.next_element()? {
                items.push(item);
            }
            Ok(OrderedJson::Array(items))
        }

        fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<OrderedJson, A::Error> {
            let mut entries = Vec::new();
            while let Some((key, value)) = map.next_entry()? {
                entries.push((key, value));
            }
            Ok(OrderedJson::Object(entries))
        }
    }
}
