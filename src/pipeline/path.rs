//! JSON field paths: `label`, `scores[0].label`, `features.profile.segment`.
//!
//! A path is parsed once, when its pipeline loads, and read many times. The empty path names
//! the whole value.

use std::fmt;

use serde_json::{Map, Value};

/// One step into a JSON value.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    /// An object member.
    Key(String),
    /// An array element.
    Index(usize),
}

/// A parsed path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct JsonPath {
    text: String,
    segments: Vec<Segment>,
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.text.is_empty() {
            f.write_str("(the whole value)")
        } else {
            f.write_str(&self.text)
        }
    }
}

impl JsonPath {
    /// Parses `a.b[0].c`. Keys are any characters but `.`, `[` and `]`; indexes are decimal.
    pub fn parse(text: &str) -> Result<Self, String> {
        let mut segments = Vec::new();
        let trimmed = text.trim();
        if trimmed.is_empty() {
            return Ok(JsonPath::default());
        }
        for part in trimmed.split('.') {
            let (key, mut rest) = match part.find('[') {
                Some(i) => (&part[..i], &part[i..]),
                None => (part, ""),
            };
            // Only a leading index (`[0].label`) may go without a key.
            if key.is_empty() && (!segments.is_empty() || rest.is_empty()) {
                return Err(format!("`{text}`: empty key"));
            }
            if key.contains(']') {
                return Err(format!("`{text}`: unexpected `]` in `{part}`"));
            }
            if !key.is_empty() {
                segments.push(Segment::Key(key.to_owned()));
            }
            while !rest.is_empty() {
                let Some(close) = rest.find(']') else {
                    return Err(format!("`{text}`: `[` without `]`"));
                };
                let index = rest[1..close].parse::<usize>().map_err(|_| {
                    format!("`{text}`: `{}` is not an array index", &rest[1..close])
                })?;
                segments.push(Segment::Index(index));
                rest = &rest[close + 1..];
                if !rest.is_empty() && !rest.starts_with('[') {
                    return Err(format!("`{text}`: expected `.` or `[` after `]`"));
                }
            }
        }
        Ok(JsonPath {
            text: trimmed.to_owned(),
            segments,
        })
    }

    /// True for the empty path (the whole value).
    pub fn is_root(&self) -> bool {
        self.segments.is_empty()
    }

    /// The first key, if the path starts with one (used to check context roots).
    pub fn first_key(&self) -> Option<&str> {
        match self.segments.first() {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// The path without its first segment.
    pub fn tail(&self) -> JsonPath {
        let segments = self.segments.iter().skip(1).cloned().collect::<Vec<_>>();
        let text = match self.text.find(['.', '[']) {
            Some(i) => self.text[i..].trim_start_matches('.').to_owned(),
            None => String::new(),
        };
        JsonPath { text, segments }
    }

    /// The value at this path, if there is one.
    pub fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        self.get_after(0, value)
    }

    /// The key at segment `n` (0 is the first), if that segment is a key.
    pub(crate) fn key_at(&self, n: usize) -> Option<&str> {
        match self.segments.get(n) {
            Some(Segment::Key(k)) => Some(k),
            _ => None,
        }
    }

    /// How many segments the path has.
    pub(crate) fn depth(&self) -> usize {
        self.segments.len()
    }

    /// The value at the path made of the segments after the first `skip`, if there is one:
    /// what `tail()` (applied `skip` times) would find, without building the shorter path.
    pub(crate) fn get_after<'v>(&self, skip: usize, value: &'v Value) -> Option<&'v Value> {
        let mut current = value;
        for segment in self.segments.iter().skip(skip) {
            current = match (segment, current) {
                (Segment::Key(k), Value::Object(map)) => map.get(k)?,
                (Segment::Index(i), Value::Array(items)) => items.get(*i)?,
                _ => return None,
            };
        }
        Some(current)
    }

    /// The value at this path, or an error saying where the path stopped.
    pub fn require<'v>(&self, value: &'v Value) -> Result<&'v Value, String> {
        self.get(value)
            .ok_or_else(|| format!("no value at `{self}` in {}", describe(value)))
    }

    /// A mutable reference to the value at this path, if there is one.
    pub fn get_mut<'v>(&self, value: &'v mut Value) -> Option<&'v mut Value> {
        let mut current = value;
        for segment in &self.segments {
            current = match (segment, current) {
                (Segment::Key(k), Value::Object(map)) => map.get_mut(k)?,
                (Segment::Index(i), Value::Array(items)) => items.get_mut(*i)?,
                _ => return None,
            };
        }
        Some(current)
    }

    /// Puts `new` at this path, creating objects for missing keys. Fails when the path runs
    /// into a value that is not an object (or an array index out of range).
    pub fn set(&self, value: &mut Value, new: Value) -> Result<(), String> {
        let mut current = value;
        for segment in &self.segments {
            current = match segment {
                Segment::Key(k) => {
                    if current.is_null() {
                        *current = Value::Object(Map::new());
                    }
                    match current {
                        Value::Object(map) => map.entry(k.clone()).or_insert(Value::Null),
                        other => {
                            return Err(format!(
                                "cannot set `{self}`: `{k}` is inside {}, not an object",
                                describe(other)
                            ));
                        }
                    }
                }
                Segment::Index(i) => {
                    let fits = matches!(&*current, Value::Array(items) if *i < items.len());
                    let no_element = |v: &Value| {
                        format!("cannot set `{self}`: no element {i} in {}", describe(v))
                    };
                    if !fits {
                        return Err(no_element(current));
                    }
                    match current {
                        Value::Array(items) => &mut items[*i],
                        other => return Err(no_element(other)),
                    }
                }
            };
        }
        *current = new;
        Ok(())
    }
}

/// A short description of a JSON value's type, for error messages.
pub fn describe(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reads_keys_and_indexes() {
        let v = json!({"scores": [{"label": "POS", "score": 0.9}], "a": {"b": 1}});
        let p = JsonPath::parse("scores[0].label").unwrap();
        assert_eq!(p.get(&v), Some(&json!("POS")));
        assert_eq!(JsonPath::parse("a.b").unwrap().get(&v), Some(&json!(1)));
        assert_eq!(JsonPath::parse("").unwrap().get(&v), Some(&v));
        assert_eq!(JsonPath::parse("scores[1].label").unwrap().get(&v), None);
        let err = JsonPath::parse("a.missing")
            .unwrap()
            .require(&v)
            .unwrap_err();
        assert!(err.contains("a.missing"), "{err}");
        assert_eq!(
            JsonPath::parse("[0]").unwrap().get(&json!([7])),
            Some(&json!(7))
        );
    }

    #[test]
    fn rejects_malformed_paths() {
        for bad in ["a..b", "a[x]", "a[1", "a]", "a[0]b", ".a"] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} should not parse");
        }
    }

    #[test]
    fn sets_values_creating_objects() {
        let mut v = json!({"a": {}});
        JsonPath::parse("a.b.c")
            .unwrap()
            .set(&mut v, json!(1))
            .unwrap();
        assert_eq!(v, json!({"a": {"b": {"c": 1}}}));
        let mut s = json!("text");
        assert!(JsonPath::parse("x").unwrap().set(&mut s, json!(1)).is_err());
        let p = JsonPath::parse("features.profile.segment").unwrap();
        assert_eq!(p.first_key(), Some("features"));
        assert_eq!(p.tail().to_string(), "profile.segment");
    }
}
