//! From message bytes to a request, or to the error that answers it.
//!
//! The order matters: the size is checked before anything is parsed; the bytes are parsed as
//! JSON with serde_json's nesting limit (128 levels) left on; the `request_id` is read first,
//! so that every later problem can be answered with an error *result* keyed by it. Only when no
//! `request_id` can be read does a message become a dead letter.

use std::collections::HashSet;

use serde_json::Value;

use crate::model::{ErrorBody, ErrorKind, InferenceRequest, MAX_REQUEST_ID_CHARS, Target};

/// What decoding a message value led to.
#[derive(Debug, Clone, PartialEq)]
pub enum Decoded {
    /// A valid request for `target`.
    Request {
        /// The request.
        request: InferenceRequest,
        /// What it asks to run.
        target: Target,
    },
    /// The request has an id but cannot be run: answer it with an error result.
    Reject {
        /// The request's id (the result's key).
        request_id: String,
        /// The target, when the request named one validly.
        target: Option<Target>,
        /// Why.
        error: ErrorBody,
    },
    /// No request id can be read: send the message to the dead-letter topic.
    DeadLetter(ErrorBody),
}

/// What decoding checks against.
#[derive(Debug, Clone)]
pub struct DecodeRules {
    /// Largest accepted value, in bytes.
    pub max_request_bytes: usize,
    /// Topics a request may name in `reply_to`.
    pub reply_to_allowed: HashSet<String>,
}

/// Decodes one message value. `now_ms` is the current Unix time in milliseconds.
pub fn decode(value: Option<&[u8]>, rules: &DecodeRules, now_ms: i64) -> Decoded {
    let bytes = match value {
        None | Some([]) => {
            return Decoded::DeadLetter(ErrorBody::new(
                ErrorKind::InvalidJson,
                "the message has no value",
            ));
        }
        Some(b) => b,
    };
    if bytes.len() > rules.max_request_bytes {
        return Decoded::DeadLetter(ErrorBody::new(
            ErrorKind::PayloadTooLarge,
            format!(
                "the message value has {} bytes, more than the {} allowed (executor.max_request_bytes)",
                bytes.len(),
                rules.max_request_bytes
            ),
        ));
    }
    // Fast path: a well-formed request parses straight into its type, in one pass. Anything
    // else (not an object, a bad field, a duplicate key) goes the slow way below, which reads
    // the id first and classifies the problem; so the outcome is the same either way.
    if bytes.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
        && let Ok(request) = serde_json::from_slice::<InferenceRequest>(bytes)
        && valid_request_id(&request.request_id)
    {
        return check(request, rules, now_ms);
    }
    let json: Value = match serde_json::from_slice(bytes) {
        Ok(v) => v,
        Err(e) => {
            return Decoded::DeadLetter(ErrorBody::new(
                ErrorKind::InvalidJson,
                format!("not valid JSON: {e}"),
            ));
        }
    };
    let Value::Object(object) = &json else {
        return Decoded::DeadLetter(ErrorBody::new(
            ErrorKind::InvalidRequest,
            "a request must be a JSON object",
        ));
    };
    let request_id = match object.get("request_id") {
        Some(Value::String(id)) if valid_request_id(id) => id.clone(),
        Some(Value::String(_)) => {
            return Decoded::DeadLetter(ErrorBody::new(
                ErrorKind::InvalidRequest,
                format!("request_id must have 1 to {MAX_REQUEST_ID_CHARS} characters"),
            ));
        }
        Some(_) => {
            return Decoded::DeadLetter(ErrorBody::new(
                ErrorKind::InvalidRequest,
                "request_id must be a string",
            ));
        }
        None => {
            return Decoded::DeadLetter(ErrorBody::new(
                ErrorKind::InvalidRequest,
                "request_id is missing",
            ));
        }
    };
    match serde_json::from_value(json) {
        Ok(request) => check(request, rules, now_ms),
        Err(e) => Decoded::Reject {
            request_id,
            target: None,
            error: ErrorBody::new(ErrorKind::InvalidRequest, format!("invalid request: {e}")),
        },
    }
}

/// Whether `id` is a usable request id: 1 to [`MAX_REQUEST_ID_CHARS`] characters.
fn valid_request_id(id: &str) -> bool {
    !id.is_empty() && id.chars().count() <= MAX_REQUEST_ID_CHARS
}

/// The checks on a parsed request with a valid id: its target, `reply_to` and deadline.
fn check(request: InferenceRequest, rules: &DecodeRules, now_ms: i64) -> Decoded {
    let reject = |target: Option<Target>, kind, message: String| Decoded::Reject {
        request_id: request.request_id.clone(),
        target,
        error: ErrorBody::new(kind, message),
    };
    let target = match (&request.pipeline, &request.model) {
        (Some(p), None) if !p.is_empty() => Target::Pipeline(p.clone()),
        (None, Some(m)) if !m.is_empty() => Target::Model(m.clone()),
        (Some(_), Some(_)) => {
            return reject(
                None,
                ErrorKind::InvalidRequest,
                "name either pipeline or model, not both".into(),
            );
        }
        _ => {
            return reject(
                None,
                ErrorKind::InvalidRequest,
                "name a pipeline or a model".into(),
            );
        }
    };
    if let Some(topic) = &request.reply_to
        && !rules.reply_to_allowed.contains(topic)
    {
        return reject(
            Some(target),
            ErrorKind::ReplyToNotAllowed,
            format!("reply_to `{topic}` is not in topics.reply_to_allowed"),
        );
    }
    if let Some(deadline) = request.deadline_ms
        && deadline <= now_ms
    {
        return reject(
            Some(target),
            ErrorKind::DeadlineExceeded,
            format!(
                "the deadline passed {} ms before processing",
                now_ms - deadline
            ),
        );
    }
    Decoded::Request { request, target }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> DecodeRules {
        DecodeRules {
            max_request_bytes: 1024,
            reply_to_allowed: HashSet::from(["replies".to_owned()]),
        }
    }

    fn run(s: &str) -> Decoded {
        decode(Some(s.as_bytes()), &rules(), 1_000)
    }

    fn dead_kind(d: Decoded) -> ErrorKind {
        match d {
            Decoded::DeadLetter(e) => e.kind,
            other => panic!("expected a dead letter, got {other:?}"),
        }
    }

    fn reject_kind(d: Decoded) -> (String, ErrorKind) {
        match d {
            Decoded::Reject {
                request_id, error, ..
            } => (request_id, error.kind),
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn the_fast_path_and_the_slow_path_agree() {
        // A JSON array would fill the request struct field by field: still a dead letter.
        assert_eq!(
            dead_kind(run(r#"["a", "identity", null, 1]"#)),
            ErrorKind::InvalidRequest
        );
        // A duplicate key fails the one-pass parse; the slow path keeps the last value, as
        // before.
        match run(r#" {"request_id":"a","pipeline":"identity","data":1,"data":2}"#) {
            Decoded::Request { request, target } => {
                assert_eq!(target, Target::Pipeline("identity".into()));
                assert_eq!(request.data, serde_json::json!(2));
            }
            other => panic!("expected a request, got {other:?}"),
        }
        // An unknown field is still answered with an error result keyed by the id.
        assert_eq!(
            reject_kind(run(r#"{"request_id":"a","pipeline":"p","data":1,"x":0}"#)),
            ("a".to_owned(), ErrorKind::InvalidRequest)
        );
    }

    #[test]
    fn valid_requests_decode_with_their_target() {
        match run(
            r#"{"request_id":"a","model":"echo@1","data":[1,2],"reply_to":"replies","deadline_ms":2000}"#,
        ) {
            Decoded::Request { request, target } => {
                assert_eq!(target, Target::Model("echo@1".into()));
                assert_eq!(request.data, serde_json::json!([1, 2]));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn unreadable_messages_are_dead_letters() {
        assert_eq!(dead_kind(decode(None, &rules(), 0)), ErrorKind::InvalidJson);
        assert_eq!(
            dead_kind(decode(Some(b"\xff\xfe"), &rules(), 0)),
            ErrorKind::InvalidJson
        );
        assert_eq!(dead_kind(run("{not json")), ErrorKind::InvalidJson);
        assert_eq!(dead_kind(run("[1]")), ErrorKind::InvalidRequest);
        assert_eq!(
            dead_kind(run(r#"{"data":1,"model":"echo"}"#)),
            ErrorKind::InvalidRequest
        );
        assert_eq!(
            dead_kind(run(r#"{"request_id":7,"data":1}"#)),
            ErrorKind::InvalidRequest
        );
        let long = format!(
            r#"{{"request_id":"{}","data":1,"model":"echo"}}"#,
            "x".repeat(129)
        );
        assert_eq!(dead_kind(run(&long)), ErrorKind::InvalidRequest);
        let big = format!(r#"{{"request_id":"a","data":"{}"}}"#, "x".repeat(2000));
        assert_eq!(dead_kind(run(&big)), ErrorKind::PayloadTooLarge);
    }

    #[test]
    fn deep_nesting_is_refused_not_a_crash() {
        let deep = format!("{}{}", "[".repeat(500), "]".repeat(500));
        let rules = DecodeRules {
            max_request_bytes: 10_000,
            ..rules()
        };
        assert_eq!(
            dead_kind(decode(Some(deep.as_bytes()), &rules, 0)),
            ErrorKind::InvalidJson
        );
    }

    #[test]
    fn requests_with_an_id_get_error_results() {
        let cases = [
            (r#"{"request_id":"a","data":1}"#, ErrorKind::InvalidRequest),
            (
                r#"{"request_id":"a","pipeline":"p","model":"m","data":1}"#,
                ErrorKind::InvalidRequest,
            ),
            (
                r#"{"request_id":"a","model":"m"}"#,
                ErrorKind::InvalidRequest,
            ),
            (
                r#"{"request_id":"a","model":"m","data":1,"extra":true}"#,
                ErrorKind::InvalidRequest,
            ),
            (
                r#"{"request_id":"a","model":"m","data":1,"reply_to":"elsewhere"}"#,
                ErrorKind::ReplyToNotAllowed,
            ),
            (
                r#"{"request_id":"a","model":"m","data":1,"deadline_ms":999}"#,
                ErrorKind::DeadlineExceeded,
            ),
        ];
        for (input, kind) in cases {
            assert_eq!(reject_kind(run(input)), ("a".to_owned(), kind), "{input}");
        }
    }
}
