//! JSON numbers, exactly as written.
//!
//! serde_json is built with `arbitrary_precision`: a [`Number`] keeps the text it was parsed
//! from (`12345678901234567890123`, `-0.0`, `1.5E+10`, `0.12044115189281823`), and writes that
//! text back out, so data no step changes leaves inferflow with the digits it came with. This
//! module is where the rest of the code turns such a number into something it computes with,
//! and where a number crosses into a format other than JSON:
//!
//! - [`to_f64`]: the number as an `f64`, or why it cannot be one without silent rounding (an
//!   integer a double cannot hold exactly, or a value beyond the double range);
//! - [`Plain`]: a serialisable view of a [`Value`] for non-JSON serialisers (minijinja
//!   templates, TOML). Through those, `arbitrary_precision` would write each number as a
//!   private one-field struct; `Plain` writes integers as integers, fractions as doubles, and
//!   a number neither can hold (an integer beyond 64 bits) as its exact text.

use serde::ser::{Serialize, SerializeMap, SerializeSeq, Serializer};
use serde_json::{Map, Number, Value};

/// Integers up to this magnitude convert to `f64` exactly.
const MAX_EXACT_F64_INT: u64 = 1 << 53;

/// Whether the number was written as an integer (no fraction, no exponent).
pub fn is_integer_text(n: &Number) -> bool {
    !n.as_str().contains(['.', 'e', 'E'])
}

/// The number as an `f64`. A fraction or exponent gives the nearest double (the usual meaning
/// of a JSON float); an integer must convert exactly. Errors say why, naming the number:
/// an integer a double cannot hold exactly (beyond ±2^53, unless it happens to be one), or a
/// value beyond the double range (`1e400`).
pub fn to_f64(n: &Number) -> Result<f64, String> {
    if let Some(i) = n.as_i64()
        && i.unsigned_abs() <= MAX_EXACT_F64_INT
    {
        return Ok(i as f64);
    }
    let text = n.as_str();
    // Always parses: the text is a JSON number. Out-of-range values parse as ±inf or 0.
    let x: f64 = text
        .parse()
        .map_err(|_| format!("{text} is not a number"))?;
    if !x.is_finite() {
        return Err(format!("{text} is beyond the range of a 64-bit float"));
    }
    if is_integer_text(n) && format!("{x:.0}") != text {
        return Err(format!(
            "{text} is an integer that a 64-bit float cannot hold exactly"
        ));
    }
    Ok(x)
}

/// The number at `value` as an `f64`: `Ok(None)` when `value` is not a number, an error (see
/// [`to_f64`]) when it is one that a double cannot hold.
pub fn value_f64(value: &Value) -> Result<Option<f64>, String> {
    match value {
        Value::Number(n) => to_f64(n).map(Some),
        _ => Ok(None),
    }
}

/// A [`Value`] for serialisers other than serde_json's own (minijinja, TOML): integers that fit
/// 64 bits as integers, fractions and exponents as doubles, anything else (an integer beyond 64
/// bits, a value beyond the double range) as its exact text. serde_json itself needs no view:
/// it writes the number's text as it is.
#[derive(Debug, Clone, Copy)]
pub struct Plain<'a>(pub &'a Value);

impl Serialize for Plain<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self.0 {
            Value::Null => serializer.serialize_unit(),
            Value::Bool(b) => serializer.serialize_bool(*b),
            Value::Number(n) => {
                if let Some(u) = n.as_u64() {
                    serializer.serialize_u64(u)
                } else if let Some(i) = n.as_i64() {
                    serializer.serialize_i64(i)
                } else if is_integer_text(n) {
                    serializer.serialize_str(n.as_str())
                } else {
                    match to_f64(n) {
                        Ok(x) => serializer.serialize_f64(x),
                        Err(_) => serializer.serialize_str(n.as_str()),
                    }
                }
            }
            Value::String(s) => serializer.serialize_str(s),
            Value::Array(items) => {
                let mut seq = serializer.serialize_seq(Some(items.len()))?;
                for item in items {
                    seq.serialize_element(&Plain(item))?;
                }
                seq.end()
            }
            Value::Object(map) => {
                let mut out = serializer.serialize_map(Some(map.len()))?;
                for (k, v) in map {
                    out.serialize_entry(k, &Plain(v))?;
                }
                out.end()
            }
        }
    }
}

/// `serialize_with` for an `Option<Value>` field that may go through a non-JSON serialiser
/// (the configuration printed as TOML).
pub fn serialize_plain_option<S: Serializer>(
    value: &Option<Value>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match value {
        Some(v) => serializer.serialize_some(&Plain(v)),
        None => serializer.serialize_none(),
    }
}

/// `serialize_with` for a `Map<String, Value>` field that may go through a non-JSON
/// serialiser (the configuration printed as TOML).
pub fn serialize_plain_map<S: Serializer>(
    map: &Map<String, Value>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let mut out = serializer.serialize_map(Some(map.len()))?;
    for (k, v) in map {
        out.serialize_entry(k, &Plain(v))?;
    }
    out.end()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn num(text: &str) -> Number {
        match serde_json::from_str::<Value>(text).unwrap() {
            Value::Number(n) => n,
            other => panic!("{other:?}"),
        }
    }

    /// `text` as serde_json writes it back: every digit kept, an exponent spelled `e+N`/`e-N`.
    fn as_written(text: &str) -> String {
        match text.find(['e', 'E']) {
            None => text.to_owned(),
            Some(at) => {
                let (mantissa, exponent) = (&text[..at], &text[at + 1..]);
                if exponent.starts_with(['+', '-']) {
                    format!("{mantissa}e{exponent}")
                } else {
                    format!("{mantissa}e+{exponent}")
                }
            }
        }
    }

    /// Parses `text` as JSON and writes it back.
    fn round_trip(text: &str) -> String {
        serde_json::to_string(&serde_json::from_str::<Value>(text).unwrap()).unwrap()
    }

    #[test]
    fn numbers_keep_their_text_through_a_value() {
        for text in [
            "91.57142857142857",
            "0.12044115189281823",
            "12345678901234567890123",
            "-12345678901234567890123",
            "9007199254740993",
            "-9007199254740993",
            "9007199254740991",
            "-9007199254740991",
            "18446744073709551616",
            "-0.0",
            "-0",
            "1e300",
            "5e-324",
            "1.5E+10",
            "1E400",
            "0.1000000000000000055511151231257827",
        ] {
            let written = as_written(text);
            assert_eq!(round_trip(text), written);
            assert_eq!(round_trip(&format!("[{text}]")), format!("[{written}]"));
        }
    }

    #[test]
    fn random_doubles_round_trip_in_shortest_form() {
        let mut rng = fastrand::Rng::with_seed(14);
        for _ in 0..20_000 {
            let x = f64::from_bits(rng.u64(..));
            if !x.is_finite() {
                continue;
            }
            let text = format!("{x:?}");
            assert_eq!(round_trip(&text), as_written(&text));
            // Parsed into an f64 (typed fields, `as_f64`): the same double, not one step off.
            assert_eq!(
                serde_json::from_str::<f64>(&text).unwrap().to_bits(),
                x.to_bits()
            );
            assert_eq!(to_f64(&num(&text)).unwrap().to_bits(), x.to_bits());
        }
    }

    #[test]
    fn to_f64_refuses_what_a_double_cannot_hold() {
        assert_eq!(to_f64(&num("9007199254740992")), Ok(9007199254740992.0));
        assert_eq!(to_f64(&num("-9007199254740992")), Ok(-9007199254740992.0));
        // 2^70 is a double exactly.
        assert_eq!(to_f64(&num("1180591620717411303424")), Ok(2f64.powi(70)));
        assert_eq!(to_f64(&num("1.5E+10")), Ok(1.5e10));
        assert_eq!(to_f64(&num("5e-324")), Ok(5e-324));
        assert!(to_f64(&num("-0.0")).unwrap().is_sign_negative());
        for text in [
            "9007199254740993",
            "-9007199254740993",
            "12345678901234567890123",
            "-12345678901234567890123",
        ] {
            let err = to_f64(&num(text)).unwrap_err();
            assert!(err.contains(text) && err.contains("exactly"), "{err}");
        }
        let err = to_f64(&num("1e400")).unwrap_err();
        assert!(err.contains("1e+400") && err.contains("range"), "{err}");
    }

    #[test]
    fn plain_writes_numbers_a_non_json_format_understands() {
        let value: Value = serde_json::from_str(
            r#"{"i": 7, "n": -7, "x": 0.5, "big": 12345678901234567890123, "huge": 1e400}"#,
        )
        .unwrap();
        let text = toml::to_string(&Plain(&value)).unwrap();
        assert!(!text.contains("serde_json"), "{text}");
        let back: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(back["i"].as_integer(), Some(7));
        assert_eq!(back["n"].as_integer(), Some(-7));
        assert_eq!(back["x"].as_float(), Some(0.5));
        assert_eq!(back["big"].as_str(), Some("12345678901234567890123"));
        assert_eq!(back["huge"].as_str(), Some("1e+400"));
    }
}
