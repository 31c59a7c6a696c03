//! The built-in transforms of `preprocess` and `postprocess` steps, compiled once at load and
//! applied to each request's value.
//!
//! A transform takes the value flowing through the pipeline (`data`) and returns the next one,
//! or an error message; it never panics and never half-applies (the step keeps the old value
//! on failure). Text transforms work on `data` itself or on the string at `field`.

use std::collections::BTreeMap;
use std::sync::Arc;

use minijinja::{Environment, UndefinedBehavior};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};
use unicode_normalization::{
    IsNormalized, UnicodeNormalization, is_nfc_quick, is_nfd_quick, is_nfkc_quick, is_nfkd_quick,
};

use super::path::{JsonPath, describe};
use crate::model::Entity;
use crate::numbers::{self, Plain};

/// Why a transform failed: the message, and whether the request's own data is at fault (a
/// number the transform must compute with but cannot represent) rather than the step.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct TransformError {
    /// The request is answered with `invalid_request` instead of `step_failed`.
    pub(crate) invalid_request: bool,
    /// What went wrong.
    pub(crate) message: String,
}

impl From<String> for TransformError {
    fn from(message: String) -> Self {
        TransformError {
            invalid_request: false,
            message,
        }
    }
}

/// A transform as written in a pipeline file: `{ op = "trim" }`, `{ op = "extract", path = "label" }`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case", deny_unknown_fields)]
pub enum TransformDef {
    /// Removes leading and trailing whitespace.
    Trim {
        /// Path of the string inside `data`; `data` itself when absent.
        #[serde(default)]
        field: Option<String>,
    },
    /// Lower-cases.
    Lowercase {
        /// Path of the string inside `data`.
        #[serde(default)]
        field: Option<String>,
    },
    /// Applies a Unicode normalisation form.
    Normalize {
        /// Path of the string inside `data`.
        #[serde(default)]
        field: Option<String>,
        /// `nfc`, `nfd`, `nfkc` (the default) or `nfkd`.
        #[serde(default)]
        form: NormalForm,
    },
    /// Turns every run of whitespace into one space.
    CollapseWhitespace {
        /// Path of the string inside `data`.
        #[serde(default)]
        field: Option<String>,
    },
    /// Removes control characters (keeping nothing of them; newlines and tabs become spaces).
    StripControl {
        /// Path of the string inside `data`.
        #[serde(default)]
        field: Option<String>,
    },
    /// Keeps at most `max_chars` characters.
    Truncate {
        /// Path of the string inside `data`.
        #[serde(default)]
        field: Option<String>,
        /// Characters kept (Unicode scalar values).
        max_chars: usize,
    },
    /// Everything text usually needs, in order: control characters out, normalisation (NFKC),
    /// whitespace collapsed, trimmed; optionally lower-cased and truncated.
    Clean {
        /// Path of the string inside `data`.
        #[serde(default)]
        field: Option<String>,
        /// Lower-case too.
        #[serde(default)]
        lowercase: bool,
        /// Keep at most this many characters.
        #[serde(default)]
        max_chars: Option<usize>,
    },
    /// Replaces `data` with the value at `path` inside it (`label`, `scores[0].label`).
    Extract {
        /// Path inside `data`.
        path: String,
        /// Used when nothing is at `path`; without it a missing value is an error.
        #[serde(default)]
        default: Option<Value>,
    },
    /// Renders a Jinja template (for example a prompt) with `data`, `input`, `features`,
    /// `parameters`, `entity` and `request_id` in scope. Undefined variables are errors.
    Template {
        /// The template source.
        template: String,
        /// Where to put the text inside `data`; it replaces `data` when absent.
        #[serde(default)]
        into: Option<String>,
    },
    /// Builds a new object from paths into the context, e.g.
    /// `fields = { text = "data.text", segment = "features.profile.segment" }`.
    Object {
        /// Output key → context path (rooted at `data`, `input`, `features`, `parameters`,
        /// `entity` or `request_id`).
        fields: BTreeMap<String, String>,
    },
    /// Maps a label (a string) through a table, e.g. `POSITIVE` → `positive`.
    MapLabels {
        /// Path of the label inside `data`.
        #[serde(default)]
        field: Option<String>,
        /// Label → replacement.
        mapping: BTreeMap<String, Value>,
        /// Replacement for labels not in the table; without it they are kept.
        #[serde(default)]
        default: Option<Value>,
    },
    /// Puts `above` (score ≥ threshold) or `below` at `into`, from the number at `field`.
    Threshold {
        /// Path of the number inside `data`.
        #[serde(default)]
        field: Option<String>,
        /// The threshold.
        threshold: f64,
        /// Value when the score is at or above the threshold.
        above: Value,
        /// Value when it is below.
        below: Value,
        /// Where the value goes inside `data`; it replaces `data` when absent.
        #[serde(default)]
        into: Option<String>,
    },
    /// Sets `field` inside `data` to a constant.
    Set {
        /// Path inside `data`.
        field: String,
        /// The value.
        value: Value,
    },
    /// Adds a `metadata` object to `data` (an object): the pipeline id plus `values`.
    Metadata {
        /// Extra entries.
        #[serde(default)]
        values: Map<String, Value>,
    },
    /// A transform registered in Rust with `PipelineManager::register_transform`.
    Custom {
        /// The name it was registered under.
        name: String,
    },
}

/// Unicode normalisation forms.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NormalForm {
    /// Canonical composition.
    Nfc,
    /// Canonical decomposition.
    Nfd,
    /// Compatibility composition: folds full-width letters, ligatures and the like.
    #[default]
    Nfkc,
    /// Compatibility decomposition.
    Nfkd,
}

/// What a transform can see besides `data`.
#[derive(Debug, Clone, Copy)]
pub struct TransformContext<'a> {
    /// The pipeline's id.
    pub pipeline: &'a str,
    /// The request's id.
    pub request_id: &'a str,
    /// The pipeline's input, before any step.
    pub input: &'a Value,
    /// Features looked up so far, by feature name.
    pub features: &'a Map<String, Value>,
    /// The request's parameters.
    pub parameters: Option<&'a Map<String, Value>>,
    /// The request's entity.
    pub entity: Option<&'a Entity>,
}

impl TransformContext<'_> {
    /// The context as one JSON object, the way templates and `object` paths see it.
    pub fn to_value(&self, data: &Value) -> Value {
        let mut root = Map::new();
        root.insert("data".into(), data.clone());
        root.insert("input".into(), self.input.clone());
        root.insert("features".into(), Value::Object(self.features.clone()));
        root.insert(
            "parameters".into(),
            self.parameters
                .map(|p| Value::Object(p.clone()))
                .unwrap_or_else(|| Value::Object(Map::new())),
        );
        root.insert(
            "entity".into(),
            self.entity
                .map(|e| serde_json::json!({"type": e.entity_type, "id": e.id}))
                .unwrap_or(Value::Null),
        );
        root.insert("request_id".into(), Value::String(self.request_id.into()));
        Value::Object(root)
    }

    /// The value at a context path (`data.text`, `features.profile.segment`, `entity.id`).
    pub fn lookup(&self, data: &Value, path: &JsonPath) -> Option<Value> {
        // The path after its root is read in place (`get_after`), never built as a new path.
        let root: Value = match path.first_key()? {
            "data" => return path.get_after(1, data).cloned(),
            "input" => return path.get_after(1, self.input).cloned(),
            "features" => {
                return if path.depth() == 1 {
                    Some(Value::Object(self.features.clone()))
                } else {
                    let first = path.key_at(1)?;
                    path.get_after(2, self.features.get(first)?).cloned()
                };
            }
            "parameters" => Value::Object(self.parameters.cloned().unwrap_or_default()),
            "entity" => self
                .entity
                .map(|e| serde_json::json!({"type": e.entity_type, "id": e.id}))?,
            "request_id" => Value::String(self.request_id.into()),
            _ => return None,
        };
        path.get_after(1, &root).cloned()
    }
}

/// The roots a context path may start with.
pub const CONTEXT_ROOTS: [&str; 6] = [
    "data",
    "input",
    "features",
    "parameters",
    "entity",
    "request_id",
];

/// A transform written in Rust: takes `data` and the context, returns the new `data` or an
/// error message.
pub type TransformFn =
    Arc<dyn Fn(Value, &TransformContext<'_>) -> Result<Value, String> + Send + Sync>;

/// A text operation.
#[derive(Debug, Clone, Copy)]
pub(crate) enum TextOp {
    Trim,
    Lowercase,
    Normalize(NormalForm),
    CollapseWhitespace,
    StripControl,
    Truncate(usize),
}

impl TextOp {
    /// The text after the operation: `s` itself, not a copy, when the operation would not
    /// change it (the usual case for clean text), so a chain of operations copies only where
    /// something changes.
    fn apply(self, s: String) -> String {
        match self {
            // ASCII text is in every normal form, and a text of at most `n` bytes has at most
            // `n` characters: both are answered without looking at the characters.
            TextOp::Normalize(_) if s.is_ascii() => s,
            TextOp::Truncate(n) if s.len() <= n => s,
            TextOp::Trim => {
                let trimmed = s.trim();
                if trimmed.len() == s.len() {
                    s
                } else {
                    trimmed.to_owned()
                }
            }
            TextOp::Lowercase => s.to_lowercase(),
            // The quick checks answer `Yes` only for text already in that form; `Maybe` and
            // `No` normalise as before.
            TextOp::Normalize(NormalForm::Nfc) => match is_nfc_quick(s.chars()) {
                IsNormalized::Yes => s,
                _ => s.nfc().collect(),
            },
            TextOp::Normalize(NormalForm::Nfd) => match is_nfd_quick(s.chars()) {
                IsNormalized::Yes => s,
                _ => s.nfd().collect(),
            },
            TextOp::Normalize(NormalForm::Nfkc) => match is_nfkc_quick(s.chars()) {
                IsNormalized::Yes => s,
                _ => s.nfkc().collect(),
            },
            TextOp::Normalize(NormalForm::Nfkd) => match is_nfkd_quick(s.chars()) {
                IsNormalized::Yes => s,
                _ => s.nfkd().collect(),
            },
            TextOp::CollapseWhitespace => {
                // Unchanged when every whitespace is a single ' ' after a non-space.
                let mut in_space = false;
                let unchanged = s.chars().all(|c| {
                    let fine = !c.is_whitespace() || (c == ' ' && !in_space);
                    in_space = c.is_whitespace();
                    fine
                });
                if unchanged {
                    return s;
                }
                // Runs of other characters are copied whole; each run of whitespace becomes
                // one ' '.
                let mut out = String::with_capacity(s.len());
                let mut in_space = false;
                let mut start = 0;
                for (i, c) in s.char_indices() {
                    if c.is_whitespace() {
                        if !in_space {
                            out.push_str(&s[start..i]);
                            out.push(' ');
                        }
                        in_space = true;
                        start = i + c.len_utf8();
                    } else {
                        in_space = false;
                    }
                }
                out.push_str(&s[start..]);
                out
            }
            TextOp::StripControl => {
                if !s.chars().any(char::is_control) {
                    return s;
                }
                // Runs of other characters are copied whole; a line break or tab becomes a
                // space, any other control character goes.
                let mut out = String::with_capacity(s.len());
                let mut start = 0;
                for (i, c) in s.char_indices() {
                    if c.is_control() {
                        out.push_str(&s[start..i]);
                        if matches!(c, '\n' | '\r' | '\t') {
                            out.push(' ');
                        }
                        start = i + c.len_utf8();
                    }
                }
                out.push_str(&s[start..]);
                out
            }
            TextOp::Truncate(n) => {
                let mut s = s;
                // The byte offset of the character after the first `n`, if there is one.
                if let Some((end, _)) = s.char_indices().nth(n) {
                    s.truncate(end);
                }
                s
            }
        }
    }
}

/// A compiled transform.
#[derive(Clone)]
pub(crate) enum Transform {
    Text {
        field: JsonPath,
        ops: Vec<TextOp>,
    },
    Extract {
        path: JsonPath,
        default: Option<Value>,
    },
    Template {
        env: Arc<Environment<'static>>,
        into: Option<JsonPath>,
    },
    Object {
        fields: Vec<(String, JsonPath)>,
    },
    MapLabels {
        field: JsonPath,
        mapping: BTreeMap<String, Value>,
        default: Option<Value>,
    },
    Threshold {
        field: JsonPath,
        threshold: f64,
        above: Value,
        below: Value,
        into: JsonPath,
    },
    Set {
        field: JsonPath,
        value: Value,
    },
    Metadata {
        values: Map<String, Value>,
    },
    Custom {
        name: String,
        f: TransformFn,
    },
}

/// Name of the single template in a template transform's environment.
const TEMPLATE_NAME: &str = "template";

fn field(path: &Option<String>) -> Result<JsonPath, String> {
    JsonPath::parse(path.as_deref().unwrap_or(""))
}

/// Checks a context path: it must parse and start with one of [`CONTEXT_ROOTS`].
pub(crate) fn context_path(text: &str) -> Result<JsonPath, String> {
    let path = JsonPath::parse(text)?;
    match path.first_key() {
        Some(root) if CONTEXT_ROOTS.contains(&root) => Ok(path),
        _ => Err(format!(
            "`{text}` must start with one of {}",
            CONTEXT_ROOTS.join(", ")
        )),
    }
}

impl TransformDef {
    /// Compiles the transform; `custom` resolves registered Rust transforms by name.
    pub(crate) fn compile(
        &self,
        custom: &dyn Fn(&str) -> Option<TransformFn>,
    ) -> Result<Transform, String> {
        let text = |f: &Option<String>, ops: Vec<TextOp>| -> Result<Transform, String> {
            Ok(Transform::Text {
                field: field(f)?,
                ops,
            })
        };
        match self {
            TransformDef::Trim { field } => text(field, vec![TextOp::Trim]),
            TransformDef::Lowercase { field } => text(field, vec![TextOp::Lowercase]),
            TransformDef::Normalize { field, form } => text(field, vec![TextOp::Normalize(*form)]),
            TransformDef::CollapseWhitespace { field } => {
                text(field, vec![TextOp::CollapseWhitespace])
            }
            TransformDef::StripControl { field } => text(field, vec![TextOp::StripControl]),
            TransformDef::Truncate { field, max_chars } => {
                if *max_chars == 0 {
                    return Err("max_chars must be at least 1".into());
                }
                text(field, vec![TextOp::Truncate(*max_chars)])
            }
            TransformDef::Clean {
                field,
                lowercase,
                max_chars,
            } => {
                let mut ops = vec![
                    TextOp::StripControl,
                    TextOp::Normalize(NormalForm::Nfkc),
                    TextOp::CollapseWhitespace,
                    TextOp::Trim,
                ];
                if *lowercase {
                    ops.push(TextOp::Lowercase);
                }
                if let Some(n) = max_chars {
                    if *n == 0 {
                        return Err("max_chars must be at least 1".into());
                    }
                    ops.push(TextOp::Truncate(*n));
                }
                text(field, ops)
            }
            TransformDef::Extract { path, default } => Ok(Transform::Extract {
                path: JsonPath::parse(path)?,
                default: default.clone(),
            }),
            TransformDef::Template { template, into } => {
                let mut env = Environment::new();
                env.set_undefined_behavior(UndefinedBehavior::Strict);
                env.add_template_owned(TEMPLATE_NAME, template.clone())
                    .map_err(|e| format!("template does not compile: {e}"))?;
                Ok(Transform::Template {
                    env: Arc::new(env),
                    into: into.as_deref().map(JsonPath::parse).transpose()?,
                })
            }
            TransformDef::Object { fields } => {
                if fields.is_empty() {
                    return Err("fields must name at least one field".into());
                }
                let fields = fields
                    .iter()
                    .map(|(k, p)| context_path(p).map(|p| (k.clone(), p)))
                    .collect::<Result<_, _>>()?;
                Ok(Transform::Object { fields })
            }
            TransformDef::MapLabels {
                field: f,
                mapping,
                default,
            } => Ok(Transform::MapLabels {
                field: field(f)?,
                mapping: mapping.clone(),
                default: default.clone(),
            }),
            TransformDef::Threshold {
                field: f,
                threshold,
                above,
                below,
                into,
            } => {
                if !threshold.is_finite() {
                    return Err("threshold must be a finite number".into());
                }
                Ok(Transform::Threshold {
                    field: field(f)?,
                    threshold: *threshold,
                    above: above.clone(),
                    below: below.clone(),
                    into: field(into)?,
                })
            }
            TransformDef::Set { field, value } => {
                let field = JsonPath::parse(field)?;
                if field.is_root() {
                    return Err("field must name a field inside data".into());
                }
                Ok(Transform::Set {
                    field,
                    value: value.clone(),
                })
            }
            TransformDef::Metadata { values } => Ok(Transform::Metadata {
                values: values.clone(),
            }),
            TransformDef::Custom { name } => match custom(name) {
                Some(f) => Ok(Transform::Custom {
                    name: name.clone(),
                    f,
                }),
                None => Err(format!(
                    "no custom transform `{name}` is registered (register it with PipelineManager::register_transform)"
                )),
            },
        }
    }
}

/// Puts `new` at `into` inside `data`, or makes it the new `data`.
/// `path` (inside `data`) as a path from the request's root: `data`, `data.score`,
/// `data[0].score`.
fn data_path(path: &JsonPath) -> String {
    if path.is_root() {
        "data".to_owned()
    } else {
        let text = path.to_string();
        if text.starts_with('[') {
            format!("data{text}")
        } else {
            format!("data.{text}")
        }
    }
}

fn place(mut data: Value, into: &Option<JsonPath>, new: Value) -> Result<Value, String> {
    match into {
        None => Ok(new),
        Some(p) if p.is_root() => Ok(new),
        Some(p) => {
            p.set(&mut data, new)?;
            Ok(data)
        }
    }
}

impl Transform {
    /// Applies the transform to `data`.
    pub(crate) fn apply(
        &self,
        mut data: Value,
        ctx: &TransformContext<'_>,
    ) -> Result<Value, TransformError> {
        match self {
            Transform::Text { field, ops } => {
                let target = field
                    .get_mut(&mut data)
                    .ok_or_else(|| format!("no value at `{field}`"))?;
                let Value::String(s) = target else {
                    return Err(format!(
                        "expected a string at `{field}`, found {}",
                        describe(target)
                    )
                    .into());
                };
                let mut text = std::mem::take(s);
                for op in ops {
                    text = op.apply(text);
                }
                *s = text;
                Ok(data)
            }
            Transform::Extract { path, default } => match path.get(&data) {
                Some(v) => Ok(v.clone()),
                None => Ok(default
                    .clone()
                    .ok_or_else(|| format!("no value at `{path}` in {}", describe(&data)))?),
            },
            Transform::Template { env, into } => {
                let template = env
                    .get_template(TEMPLATE_NAME)
                    .map_err(|e| format!("template: {e}"))?;
                // Numbers reach the template as integers and doubles (`Plain`); an integer
                // beyond 64 bits as its exact text, never rounded.
                let text = template
                    .render(Plain(&ctx.to_value(&data)))
                    .map_err(|e| format!("template: {e}"))?;
                Ok(place(data, into, Value::String(text))?)
            }
            Transform::Object { fields } => {
                let mut out = Map::new();
                for (key, path) in fields {
                    let value = ctx
                        .lookup(&data, path)
                        .ok_or_else(|| format!("no value at `{path}` for field `{key}`"))?;
                    out.insert(key.clone(), value);
                }
                Ok(Value::Object(out))
            }
            Transform::MapLabels {
                field,
                mapping,
                default,
            } => {
                let target = field
                    .get_mut(&mut data)
                    .ok_or_else(|| format!("no label at `{field}`"))?;
                let Value::String(label) = target else {
                    return Err(format!(
                        "expected a string label at `{field}`, found {}",
                        describe(target)
                    )
                    .into());
                };
                if let Some(mapped) = mapping.get(label.as_str()).or(default.as_ref()) {
                    *target = mapped.clone();
                }
                Ok(data)
            }
            Transform::Threshold {
                field,
                threshold,
                above,
                below,
                into,
            } => {
                let score = numbers::value_f64(field.get(&data).unwrap_or(&Value::Null))
                    .map_err(|e| TransformError {
                        invalid_request: true,
                        message: format!(
                            "the number at `{}` cannot be compared with the threshold: {e}",
                            data_path(field)
                        ),
                    })?
                    .ok_or_else(|| format!("expected a number at `{field}`"))?;
                let chosen = if score >= *threshold { above } else { below };
                Ok(place(data, &Some(into.clone()), chosen.clone())?)
            }
            Transform::Set { field, value } => {
                field.set(&mut data, value.clone())?;
                Ok(data)
            }
            Transform::Metadata { values } => {
                let Value::Object(map) = &mut data else {
                    return Err(
                        format!("metadata needs an object, found {}", describe(&data)).into(),
                    );
                };
                let mut meta = match map.remove("metadata") {
                    Some(Value::Object(m)) => m,
                    _ => Map::new(),
                };
                meta.insert("pipeline".into(), Value::String(ctx.pipeline.into()));
                for (k, v) in values {
                    meta.insert(k.clone(), v.clone());
                }
                map.insert("metadata".into(), Value::Object(meta));
                Ok(data)
            }
            Transform::Custom { name, f } => {
                // A registered closure is user code: a panic in it must not take the
                // processor down, so it becomes this request's error.
                let call = std::panic::AssertUnwindSafe(|| f(data, ctx));
                match std::panic::catch_unwind(call) {
                    Ok(result) => {
                        Ok(result.map_err(|e| format!("custom transform `{name}`: {e}"))?)
                    }
                    Err(_) => Err(format!("custom transform `{name}` panicked").into()),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ctx<'a>(input: &'a Value, features: &'a Map<String, Value>) -> TransformContext<'a> {
        TransformContext {
            pipeline: "p",
            request_id: "r-1",
            input,
            features,
            parameters: None,
            entity: None,
        }
    }

    fn run(def: Value, data: Value) -> Result<Value, String> {
        let def: TransformDef = serde_json::from_value(def).unwrap();
        let t = def.compile(&|_| None)?;
        let features: Map<String, Value> =
            serde_json::from_value(json!({"profile": {"segment": "gold"}})).unwrap();
        let input = json!({"text": "orig"});
        t.apply(data, &ctx(&input, &features))
            .map_err(|e| e.message)
    }

    #[test]
    fn text_cleaning() {
        let dirty = json!({"text": "  Ｈｅｌｌｏ\u{0007}\n\t  WORLD  "});
        let out = run(
            json!({"op": "clean", "field": "text", "lowercase": true}),
            dirty,
        )
        .unwrap();
        assert_eq!(out, json!({"text": "hello world"}));
        assert_eq!(
            run(json!({"op": "truncate", "max_chars": 3}), json!("héllo")).unwrap(),
            json!("hél")
        );
        assert_eq!(
            run(json!({"op": "normalize", "form": "nfc"}), json!("e\u{301}")).unwrap(),
            json!("é")
        );
        let err = run(json!({"op": "trim"}), json!(5)).unwrap_err();
        assert!(err.contains("expected a string"), "{err}");
    }

    #[test]
    fn extraction_templates_labels_thresholds() {
        let model_out = json!({"scores": [{"label": "POSITIVE", "score": 0.93}]});
        assert_eq!(
            run(
                json!({"op": "extract", "path": "scores[0].label"}),
                model_out.clone()
            )
            .unwrap(),
            json!("POSITIVE")
        );
        assert!(run(json!({"op": "extract", "path": "nope"}), model_out.clone()).is_err());
        assert_eq!(
            run(
                json!({"op": "extract", "path": "nope", "default": 0}),
                model_out
            )
            .unwrap(),
            json!(0)
        );
        let prompt = run(
            json!({"op": "template", "template": "Classify for a {{ features.profile.segment }} user: {{ data.text }}", "into": "prompt"}),
            json!({"text": "hi"}),
        )
        .unwrap();
        assert_eq!(prompt["prompt"], json!("Classify for a gold user: hi"));
        let undefined = run(
            json!({"op": "template", "template": "{{ features.nope.x }}"}),
            json!({}),
        );
        assert!(undefined.is_err());
        assert_eq!(
            run(
                json!({"op": "map_labels", "field": "label", "mapping": {"POSITIVE": "positive"}}),
                json!({"label": "POSITIVE"})
            )
            .unwrap(),
            json!({"label": "positive"})
        );
        assert_eq!(
            run(
                json!({"op": "threshold", "field": "score", "threshold": 0.5, "above": "toxic", "below": "ok", "into": "verdict"}),
                json!({"score": 0.7})
            )
            .unwrap(),
            json!({"score": 0.7, "verdict": "toxic"})
        );
        assert_eq!(
            run(
                json!({"op": "object", "fields": {"t": "input.text", "s": "features.profile.segment", "id": "request_id"}}),
                json!(null)
            )
            .unwrap(),
            json!({"t": "orig", "s": "gold", "id": "r-1"})
        );
        assert_eq!(
            run(
                json!({"op": "metadata", "values": {"v": 2}}),
                json!({"a": 1})
            )
            .unwrap(),
            json!({"a": 1, "metadata": {"pipeline": "p", "v": 2}})
        );
    }

    /// Compiles and applies one transform to `data` (JSON text), keeping the whole error.
    fn apply_text(def: Value, data: &str) -> Result<Value, TransformError> {
        let def: TransformDef = serde_json::from_value(def).unwrap();
        let t = def.compile(&|_| None).unwrap();
        let features = Map::new();
        let input = json!({});
        t.apply(serde_json::from_str(data).unwrap(), &ctx(&input, &features))
    }

    #[test]
    fn templates_see_numbers_as_numbers_and_big_integers_exactly() {
        let out = apply_text(
            json!({"op": "template", "template": "{{ data.i + 1 }} {{ data.x * 2 }} {{ data.big }} {{ data.neg }} {{ data.edge }}"}),
            r#"{"i": 41, "x": 0.25, "big": 12345678901234567890123, "neg": -12345678901234567890123, "edge": 9007199254740993}"#,
        )
        .unwrap();
        assert_eq!(
            out,
            json!("42 0.5 12345678901234567890123 -12345678901234567890123 9007199254740993")
        );
        let out = apply_text(
            json!({"op": "template", "template": "{{ data.x }}"}),
            r#"{"x": 0.12044115189281823}"#,
        )
        .unwrap();
        assert_eq!(out, json!("0.12044115189281823"));
    }

    #[test]
    fn a_number_a_threshold_cannot_compare_is_an_invalid_request_naming_its_path() {
        let def = json!({"op": "threshold", "field": "s.score", "threshold": 0.5, "above": "hi", "below": "lo", "into": "v"});
        // (The number is named as serde_json writes it: `1e400` as `1e+400`.)
        for (text, named) in [
            ("12345678901234567890123", "12345678901234567890123"),
            ("9007199254740993", "9007199254740993"),
            ("1e400", "1e+400"),
        ] {
            let err =
                apply_text(def.clone(), &format!(r#"{{"s": {{"score": {text}}}}}"#)).unwrap_err();
            assert!(err.invalid_request, "{err:?}");
            assert!(
                err.message.contains("`data.s.score`") && err.message.contains(named),
                "{err:?}"
            );
        }
        // An exact integer, a float in any notation, -0.0: compared as usual.
        for (text, verdict) in [("9007199254740992", "hi"), ("1.5E-1", "lo"), ("-0.0", "lo")] {
            let out = apply_text(def.clone(), &format!(r#"{{"s": {{"score": {text}}}}}"#)).unwrap();
            assert_eq!(out["v"], json!(verdict), "{text}");
        }
        // Not a number at all: the step's own failure, as before.
        let err = apply_text(def, r#"{"s": {"score": "x"}}"#).unwrap_err();
        assert!(!err.invalid_request, "{err:?}");
    }

    #[test]
    fn bad_definitions_are_refused() {
        let parse = |v: Value| serde_json::from_value::<TransformDef>(v);
        assert!(parse(json!({"op": "shout"})).is_err());
        assert!(parse(json!({"op": "trim", "fields": "x"})).is_err());
        let compile = |v: Value| parse(v).unwrap().compile(&|_| None).err();
        assert!(compile(json!({"op": "template", "template": "{{ unclosed"})).is_some());
        assert!(compile(json!({"op": "object", "fields": {"a": "nowhere.x"}})).is_some());
        assert!(
            compile(json!({"op": "custom", "name": "mine"}))
                .unwrap()
                .contains("register")
        );
        assert!(compile(json!({"op": "truncate", "max_chars": 0})).is_some());
    }

    /// Each text operation gives what its plain definition gives, whether it changes the text
    /// or returns it as it was.
    #[test]
    fn text_ops_match_their_definitions() {
        let texts = [
            "",
            " ",
            "clean text",
            "  two  spaces\tand a tab\n",
            "\u{7}bell\u{0}nul\r\n",
            "Ｈｅｌｌｏ ﬁ ①",
            "e\u{301} and é",
            "\u{3000}ideographic\u{a0}space",
            "ünïcödé ok",
            // Runs copied whole around controls and spaces of several bytes, at the edges.
            "é\u{7}ü\n\r\tx",
            "\u{1}\u{1}start and end\u{7f}",
            "x\u{85}y\u{2028}z",
            "日本\t\t語\u{1}",
            // The shortcuts: ASCII (already in every normal form), at most 3 bytes (within
            // `Truncate(3)`), and just over.
            "plain ASCII ~",
            "abc",
            "abcd",
            "hé",
            "héllo",
        ];
        for text in texts {
            let collapsed = {
                let mut out = String::new();
                let mut in_space = false;
                for c in text.chars() {
                    if c.is_whitespace() {
                        if !in_space {
                            out.push(' ');
                        }
                        in_space = true;
                    } else {
                        out.push(c);
                        in_space = false;
                    }
                }
                out
            };
            let stripped: String = text
                .chars()
                .filter_map(|c| match c {
                    '\n' | '\r' | '\t' => Some(' '),
                    c if c.is_control() => None,
                    c => Some(c),
                })
                .collect();
            let cases: [(TextOp, String); 9] = [
                (TextOp::Trim, text.trim().to_owned()),
                (TextOp::Lowercase, text.to_lowercase()),
                (TextOp::Normalize(NormalForm::Nfc), text.nfc().collect()),
                (TextOp::Normalize(NormalForm::Nfd), text.nfd().collect()),
                (TextOp::Normalize(NormalForm::Nfkc), text.nfkc().collect()),
                (TextOp::Normalize(NormalForm::Nfkd), text.nfkd().collect()),
                (TextOp::CollapseWhitespace, collapsed),
                (TextOp::StripControl, stripped),
                (TextOp::Truncate(3), text.chars().take(3).collect()),
            ];
            for (op, expected) in cases {
                assert_eq!(op.apply(text.to_owned()), expected, "{op:?} of {text:?}");
            }
        }
    }
}
