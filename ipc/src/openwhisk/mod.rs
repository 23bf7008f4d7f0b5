//! OpenWhisk's JSON shapes, as sprout speaks them: its REST API's action and
//! activation bodies (`action`, `activation`) and its invoker contract's
//! `ActivationMessage` and acknowledgements (`invoker`). Field names are
//! OpenWhisk's (`../docs/api.md`, "OpenWhisk"); every difference from upstream is
//! listed there.

pub mod action;
pub mod activation;
pub mod invoker;

use std::cell::Cell;
use std::fmt;

use serde::de::{self, DeserializeSeed, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// The most JSON values (numbers, strings, arrays, object keys, ... each counts one) an
/// OpenWhisk body may hold. Parsed into a tree, a value costs 32 bytes however
/// small its text (`0,` is two), so a body is counted before it is parsed: this
/// bounds the tree at 32 MiB plus the body's strings. OpenWhisk's own limit on a
/// payload (1 MiB by default) holds at most half a million.
pub const MAX_JSON_VALUES: usize = 1 << 20;

/// Counts the values of the JSON text `body` without building them, refusing it
/// (with how many it has at least) once it holds more than `max`; a body that is
/// not JSON passes, for the parser to say why.
pub fn check_json_values(body: &[u8], max: usize) -> Result<(), TooManyValues> {
    let count = Cell::new(0usize);
    let mut de = serde_json::Deserializer::from_slice(body);
    match (Counter { count: &count, max }).deserialize(&mut de) {
        Err(_) if count.get() > max => Err(TooManyValues { max }),
        _ => Ok(()),
    }
}

/// A JSON body with more than [`MAX_JSON_VALUES`] values.
#[derive(Debug, thiserror::Error)]
#[error("the JSON body holds more than {max} values (numbers, strings, object keys, arrays, objects and literals each count one)")]
pub struct TooManyValues {
    pub max: usize,
}

/// Counts one value and everything in it, failing past `max`.
#[derive(Clone, Copy)]
struct Counter<'a> {
    count: &'a Cell<usize>,
    max: usize,
}

impl Counter<'_> {
    fn one<E: de::Error>(self) -> Result<(), E> {
        self.count.set(self.count.get() + 1);
        if self.count.get() > self.max {
            return Err(E::custom("too many values"));
        }
        Ok(())
    }
}

impl<'de> DeserializeSeed<'de> for Counter<'_> {
    type Value = ();
    fn deserialize<D: Deserializer<'de>>(self, d: D) -> Result<(), D::Error> {
        d.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Counter<'_> {
    type Value = ();
    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        self.one()
    }
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        self.one()
    }
    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        self.one()
    }
    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        self.one()
    }
    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        self.one()
    }
    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        self.one()
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        self.one()?;
        while seq.next_element_seed(self)?.is_some() {}
        Ok(())
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<(), A::Error> {
        self.one()?;
        // A key costs what a string does.
        while map.next_key_seed(self)?.is_some() {
            map.next_value_seed(self)?;
        }
        Ok(())
    }
}

/// One of OpenWhisk's `{"key": ..., "value": ...}` pairs (parameters, annotations).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub key: String,
    pub value: serde_json::Value,
    /// A parameter that goes to the action's environment at init (`initArgs`), not
    /// to `main`'s argument.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub init: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_values_are_counted_before_a_tree_is_built() {
        // The object, "a", the array, 1, 2, the inner object, "b", null, "c", "x".
        assert!(check_json_values(br#"{"a":[1,2,{"b":null}],"c":"x"}"#, 10).is_ok());
        let e = check_json_values(br#"{"a":[1,2,{"b":null}],"c":"x"}"#, 9).unwrap_err();
        assert!(e.to_string().contains("more than 9 values"), "{e}");
        let many = format!("[{}0]", "0,".repeat(2_000_000));
        assert!(check_json_values(many.as_bytes(), MAX_JSON_VALUES).is_err());
        // Not JSON: passed on, for the parser to name.
        assert!(check_json_values(b"{nope", 10).is_ok());
        // One large string is one value.
        let big = format!("{{\"code\":\"{}\"}}", "x".repeat(1 << 20));
        assert!(check_json_values(big.as_bytes(), 3).is_ok());
    }
}
