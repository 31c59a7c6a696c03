//! Named-entity recognition in a pipeline, with a small **rule-based** recogniser written
//! here as a custom [`Provider`]. It is not a neural model: it finds PERSON, ORG, LOC, DATE,
//! MONEY and EMAIL entities with a gazetteer (lists of known organisations, places and first
//! names), capitalisation, titles (`Dr.`, `Ms.`), company suffixes (`Inc.`, `Foundation`) and
//! patterns for dates, amounts and e-mail addresses. It misses what its lists and rules do not
//! cover, and its `score` is a fixed confidence per rule, not a calibrated probability. It
//! answers in the token-classification shape Hugging Face uses (aggregated):
//! `[{"entity_group", "word", "start", "end", "score"}]`, with `start`/`end` as character
//! (Unicode scalar value) offsets, so `text[start..end] == word` counting characters. A neural
//! model behind the Hugging Face provider answers in the same shape and could replace it
//! without changing the pipeline.
//!
//! ```text
//! cargo run --example ner
//! cargo run --example ner -- "Ms. Maria Garcia paid $300 to Globex Inc. on May 4, 2025."
//! ```
//!
//! The pipeline `ner_document` splits a document into sentences (a custom transform), runs the
//! model `ner@1` on every sentence with a `map` step (one batched model call per chunk of
//! sentences), and moves the offsets from the sentence to the document (another custom
//! transform). Two documents go through `execute_batch` together.
//!
//! Output: per document a `document ID: "TEXT"` line, one readable line per entity, and an
//! `entities ID: [JSON]` line with the entities and their document offsets. Deterministic.

use std::sync::Arc;

use futures::future::BoxFuture;
use inferflow::executor::ExecRequest;
use inferflow::pipeline::{PipelineManager, TransformContext, def};
use inferflow::providers::manager::{ModelManager, ModelSpec};
use inferflow::providers::{Provider, ProviderError, ProviderInput, ProviderOutput};
use serde_json::{Value, json};

// ---------------------------------------------------------------------------------------------
// The recogniser.

const ORGS: &[&str] = &[
    "Apache Software Foundation",
    "United Nations",
    "European Union",
    "World Health Organization",
    "Hugging Face",
    "Red Hat",
    "Google",
    "Microsoft",
    "Mozilla",
    "Confluent",
    "OpenAI",
    "NASA",
    "Philips",
    "Siemens",
];

const PLACES: &[&str] = &[
    "New York",
    "San Francisco",
    "Los Angeles",
    "United States",
    "United Kingdom",
    "Amsterdam",
    "Rotterdam",
    "Utrecht",
    "Berlin",
    "Munich",
    "Paris",
    "London",
    "Madrid",
    "Lisbon",
    "Vienna",
    "Rome",
    "Tokyo",
    "Kyoto",
    "Seattle",
    "Boston",
    "Chicago",
    "Toronto",
    "Sydney",
    "Singapore",
    "Netherlands",
    "Germany",
    "France",
    "Spain",
    "Italy",
    "Japan",
    "China",
    "India",
    "Brazil",
    "Canada",
    "Europe",
    "Asia",
    "Africa",
];

const FIRST_NAMES: &[&str] = &[
    "Ada", "Alan", "Grace", "Linus", "Marie", "Maria", "Anna", "John", "Mary", "James", "Emma",
    "Sophie", "Lars", "Yuki", "Priya", "Ahmed", "Fatima", "Carlos", "Wei", "Olga", "Guido",
];

const TITLES: &[&str] = &["Mr", "Mrs", "Ms", "Dr", "Prof", "Sir", "Dame"];

/// Last words of organisation names.
const ORG_SUFFIXES: &[&str] = &[
    "Inc",
    "Corp",
    "Corporation",
    "Ltd",
    "LLC",
    "GmbH",
    "AG",
    "BV",
    "Foundation",
    "University",
    "Institute",
    "Bank",
    "Labs",
];

/// Organisation words followed by `of Place`: `University of Amsterdam`.
const ORG_OF: &[&str] = &["University", "Institute", "Bank"];

const MONTHS: &[&str] = &[
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
    "Jan",
    "Feb",
    "Mar",
    "Apr",
    "Jun",
    "Jul",
    "Aug",
    "Sep",
    "Sept",
    "Oct",
    "Nov",
    "Dec",
];

const WEEKDAYS: &[&str] = &[
    "Monday",
    "Tuesday",
    "Wednesday",
    "Thursday",
    "Friday",
    "Saturday",
    "Sunday",
];

const CURRENCY_WORDS: &[&str] = &[
    "dollars", "euros", "pounds", "yen", "USD", "EUR", "GBP", "JPY",
];
const CURRENCY_CODES: &[&str] = &["USD", "EUR", "GBP", "JPY"];
const MAGNITUDES: &[&str] = &["thousand", "million", "billion", "trillion", "k", "m", "bn"];

/// Words that keep their full stop: titles, company suffixes and other abbreviations.
const ABBREVIATIONS: &[&str] = &[
    "Mr", "Mrs", "Ms", "Dr", "Prof", "Inc", "Corp", "Ltd", "Co", "St", "Jr", "Sr", "e.g", "i.e",
    "vs", "B.V",
];

/// Fixed confidences per rule (not probabilities).
const SURE: f64 = 0.99;
const PATTERN: f64 = 0.95;
const RULE: f64 = 0.9;
const WEAK: f64 = 0.75;
const GUESS: f64 = 0.6;

/// One word of the text, with its byte and character span.
#[derive(Debug, Clone, Copy)]
struct Token<'a> {
    text: &'a str,
    byte_start: usize,
    byte_end: usize,
    char_start: usize,
    char_end: usize,
    /// Punctuation (a comma, a full stop...) follows it: names do not run on past it.
    breaks: bool,
}

fn is_abbreviation(word: &str) -> bool {
    let bare = word.trim_end_matches('.');
    ABBREVIATIONS.contains(&bare)
        || (bare.chars().count() == 1 && bare.chars().all(|c| c.is_uppercase()))
}

/// Splits on whitespace and trims surrounding punctuation (keeping the full stop of
/// abbreviations and dropping a possessive `'s`).
fn tokenize(text: &str) -> Vec<Token<'_>> {
    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let byte = |k: usize| chars.get(k).map_or(text.len(), |c| c.0);
    let mut tokens: Vec<Token<'_>> = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        if chars[i].1.is_whitespace() {
            i += 1;
            continue;
        }
        let mut j = i;
        while j < chars.len() && !chars[j].1.is_whitespace() {
            j += 1;
        }
        let (mut a, mut b) = (i, j);
        while a < b && "\"'([{“‘«".contains(chars[a].1) {
            a += 1;
        }
        if a > i
            && let Some(last) = tokens.last_mut()
        {
            last.breaks = true;
        }
        let mut breaks = false;
        while a < b {
            let c = chars[b - 1].1;
            let closing = "\"')]}”’»,;:!?…".contains(c);
            let full_stop = c == '.' && !is_abbreviation(&text[byte(a)..byte(b)]);
            if !(closing || full_stop) {
                break;
            }
            b -= 1;
            breaks = true;
        }
        if b - a > 2 && chars[b - 1].1 == 's' && matches!(chars[b - 2].1, '\'' | '’') {
            b -= 2;
        }
        if a < b {
            tokens.push(Token {
                text: &text[byte(a)..byte(b)],
                byte_start: byte(a),
                byte_end: byte(b),
                char_start: a,
                char_end: b,
                breaks,
            });
        } else if let Some(last) = tokens.last_mut() {
            // A chunk of punctuation only (a dash): a break too.
            last.breaks = true;
        }
        i = j;
    }
    tokens
}

fn capitalised(t: &Token<'_>) -> bool {
    t.text.chars().next().is_some_and(char::is_uppercase)
}

fn bare<'a>(t: &Token<'a>) -> &'a str {
    t.text.trim_end_matches('.')
}

fn is_number(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_digit())
        && s.chars()
            .all(|c| c.is_ascii_digit() || c == ',' || c == '.')
}

fn is_day(s: &str) -> bool {
    let digits = s.trim_end_matches(['s', 't', 'n', 'd', 'r', 'h']);
    digits.len() <= 2
        && !digits.is_empty()
        && digits.chars().all(|c| c.is_ascii_digit())
        && (1..=31).contains(&digits.parse::<u32>().unwrap_or(0))
}

fn is_year(s: &str) -> bool {
    s.len() == 4
        && s.chars().all(|c| c.is_ascii_digit())
        && (s.starts_with('1') || s.starts_with('2'))
}

fn is_iso_date(s: &str) -> bool {
    let b = s.as_bytes();
    b.len() == 10
        && b[4] == b'-'
        && b[7] == b'-'
        && b.iter()
            .enumerate()
            .all(|(i, c)| i == 4 || i == 7 || c.is_ascii_digit())
}

fn is_email(s: &str) -> bool {
    let Some((local, domain)) = s.split_once('@') else {
        return false;
    };
    let ok = |c: char| c.is_alphanumeric() || "._%+-".contains(c);
    !local.is_empty()
        && local.chars().all(ok)
        && domain.contains('.')
        && !domain.starts_with('.')
        && !domain.ends_with('.')
        && domain
            .chars()
            .all(|c| c.is_alphanumeric() || c == '.' || c == '-')
}

/// A match: entity group, first and last token, score.
type Match = (&'static str, usize, usize, f64);

/// The longest entry of `list` starting at token `i` (no break inside it).
fn gazetteer(tokens: &[Token<'_>], i: usize, list: &[&str]) -> Option<usize> {
    let mut best: Option<usize> = None;
    for entry in list {
        let words: Vec<&str> = entry.split(' ').collect();
        let end = i + words.len() - 1;
        if end >= tokens.len() || best.is_some_and(|b| b >= end) {
            continue;
        }
        let fits = words.iter().enumerate().all(|(k, w)| {
            let t = &tokens[i + k];
            t.text == *w && (i + k == end || !t.breaks)
        });
        if fits {
            best = Some(end);
        }
    }
    best
}

/// Capitalised tokens from `i` on, at most `max`, stopping after a break.
fn capitalised_run(tokens: &[Token<'_>], i: usize, max: usize) -> Option<usize> {
    let mut end = None;
    for (k, t) in tokens.iter().enumerate().skip(i).take(max) {
        if !capitalised(t) {
            break;
        }
        end = Some(k);
        if t.breaks {
            break;
        }
    }
    end
}

fn email(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    is_email(tokens[i].text).then_some(("EMAIL", i, i, SURE))
}

fn money(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    let t = &tokens[i];
    let next = |k: usize, list: &[&str]| {
        !tokens[k - 1].breaks && tokens.get(k).is_some_and(|n| list.contains(&n.text))
    };
    let symbol = t.text.starts_with(['$', '€', '£', '¥']);
    if symbol && is_number(&t.text[t.text.chars().next()?.len_utf8()..]) {
        let end = if next(i + 1, MAGNITUDES) { i + 1 } else { i };
        return Some(("MONEY", i, end, PATTERN));
    }
    if CURRENCY_CODES.contains(&t.text)
        && !t.breaks
        && let Some(n) = tokens.get(i + 1)
        && is_number(n.text)
    {
        let end = if next(i + 2, MAGNITUDES) {
            i + 2
        } else {
            i + 1
        };
        return Some(("MONEY", i, end, PATTERN));
    }
    if is_number(t.text) {
        let mut end = i;
        if next(end + 1, MAGNITUDES) {
            end += 1;
        }
        if next(end + 1, CURRENCY_WORDS) {
            return Some(("MONEY", i, end + 1, RULE));
        }
    }
    None
}

fn date(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    let t = &tokens[i];
    let at = |k: usize, f: &dyn Fn(&str) -> bool| tokens.get(k).is_some_and(|n| f(n.text));
    let month = |s: &str| MONTHS.contains(&s.trim_end_matches('.'));
    if is_iso_date(t.text) {
        return Some(("DATE", i, i, SURE));
    }
    if month(t.text) {
        // Month [day[,]] [year]; a bare "May" is a verb more often than a month.
        let mut end = i;
        if !t.breaks && at(i + 1, &is_day) {
            end = i + 1;
            // The comma after the day does not end the date: "March 3, 2024".
            if at(i + 2, &is_year) {
                end = i + 2;
            }
        } else if !t.breaks && at(i + 1, &is_year) {
            end = i + 1;
        }
        if end == i && t.text == "May" {
            return None;
        }
        return Some(("DATE", i, end, if end > i { PATTERN } else { WEAK }));
    }
    if is_day(t.text) && !t.breaks && at(i + 1, &month) {
        let end = if !tokens[i + 1].breaks && at(i + 2, &is_year) {
            i + 2
        } else {
            i + 1
        };
        return Some(("DATE", i, end, PATTERN));
    }
    if WEEKDAYS.contains(&t.text) {
        return Some(("DATE", i, i, RULE));
    }
    let after_preposition = i > 0
        && ["in", "since", "by", "until", "during"].contains(&tokens[i - 1].text)
        && !tokens[i - 1].breaks;
    if is_year(t.text) && after_preposition {
        return Some(("DATE", i, i, WEAK));
    }
    None
}

fn org_by_name(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    gazetteer(tokens, i, ORGS).map(|end| ("ORG", i, end, SURE))
}

/// Capitalised words ending in a company suffix (`Globex Inc.`), or `University of X`.
fn org_by_suffix(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    let run = capitalised_run(tokens, i, 5)?;
    for m in i..=run {
        let word = bare(&tokens[m]);
        let of_place = ORG_OF.contains(&word)
            && !tokens[m].breaks
            && tokens
                .get(m + 1)
                .is_some_and(|t| t.text == "of" && !t.breaks)
            && tokens.get(m + 2).is_some_and(capitalised);
        if of_place {
            let end = capitalised_run(tokens, m + 2, 3)?;
            return Some(("ORG", skip_article(tokens, i, m), end, RULE));
        }
        if ORG_SUFFIXES.contains(&word) && m > i {
            return Some(("ORG", skip_article(tokens, i, m), m, RULE));
        }
    }
    None
}

/// `i`, or `i + 1` when token `i` is "The" and the name goes on.
fn skip_article(tokens: &[Token<'_>], i: usize, end: usize) -> usize {
    if tokens[i].text == "The" && end > i {
        i + 1
    } else {
        i
    }
}

/// A title and the capitalised name after it; the title is not part of the entity.
fn person_by_title(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    let t = &tokens[i];
    if !TITLES.contains(&bare(t)) || t.breaks {
        return None;
    }
    let end = capitalised_run(tokens, i + 1, 3)?;
    Some(("PERSON", i + 1, end, PATTERN))
}

fn place(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    gazetteer(tokens, i, PLACES).map(|end| ("LOC", i, end, SURE))
}

/// A known first name, with up to two capitalised words after it.
fn person_by_first_name(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    if !FIRST_NAMES.contains(&tokens[i].text) {
        return None;
    }
    let end = capitalised_run(tokens, i, 3)?;
    Some(("PERSON", i, end, if end > i { RULE } else { WEAK }))
}

/// A capitalised word after "in" or "near" that nothing else recognised: probably a place.
fn place_by_context(tokens: &[Token<'_>], i: usize) -> Option<Match> {
    let after = i > 0 && ["in", "near"].contains(&tokens[i - 1].text) && !tokens[i - 1].breaks;
    if !after || !capitalised(&tokens[i]) {
        return None;
    }
    let end = capitalised_run(tokens, i, 3)?;
    Some(("LOC", i, end, GUESS))
}

type Rule = fn(&[Token<'_>], usize) -> Option<Match>;

/// In order of precedence: at each word the first rule that matches wins.
const RULES: [Rule; 9] = [
    email,
    money,
    date,
    org_by_name,
    org_by_suffix,
    person_by_title,
    place,
    person_by_first_name,
    place_by_context,
];

/// The entities of `text`, left to right, in the Hugging Face token-classification shape.
fn recognise(text: &str) -> Vec<Value> {
    let tokens = tokenize(text);
    let mut entities = Vec::new();
    let mut i = 0;
    while i < tokens.len() {
        match RULES.iter().find_map(|rule| rule(&tokens, i)) {
            Some((group, first, last, score)) => {
                let (a, b) = (&tokens[first], &tokens[last]);
                entities.push(json!({
                    "entity_group": group,
                    "word": &text[a.byte_start..b.byte_end],
                    "start": a.char_start,
                    "end": b.char_end,
                    "score": score,
                }));
                i = last + 1;
            }
            None => i += 1,
        }
    }
    entities
}

/// The recogniser as a provider; its one model is `rules-v1`.
struct RuleNer;

impl Provider for RuleNer {
    fn infer_batch(
        &self,
        model: &str,
        inputs: Vec<ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<ProviderOutput, ProviderError>>> {
        let outcomes = inputs
            .into_iter()
            .map(|input| {
                if model != "rules-v1" {
                    return Err(ProviderError::UnknownModel {
                        model: model.to_owned(),
                    });
                }
                let text = match &input.data {
                    Value::String(s) => s.as_str(),
                    Value::Object(o) => o.get("text").and_then(Value::as_str).ok_or_else(|| {
                        ProviderError::InvalidInput {
                            message: "data must be a string or {\"text\": string}".into(),
                        }
                    })?,
                    _ => {
                        return Err(ProviderError::InvalidInput {
                            message: "data must be a string or {\"text\": string}".into(),
                        });
                    }
                };
                Ok(ProviderOutput::new(Value::Array(recognise(text))))
            })
            .collect();
        Box::pin(async move { outcomes })
    }
}

// ---------------------------------------------------------------------------------------------
// The pipeline.

const PIPELINE: &str = r#"
id = "ner_document"
description = "Entities of a document, sentence by sentence, with document offsets"

[[steps]]
type = "preprocess"
name = "split"
transforms = [{ op = "clean", field = "text" }, { op = "custom", name = "split_sentences" }]

[[steps]]
type = "map"
over = "sentences"
into = "entities"
concurrency = 32
step = { type = "model", model = "ner@1", input = "data.text" }

[[steps]]
type = "postprocess"
name = "document_offsets"
transforms = [{ op = "custom", name = "document_offsets" }]
"#;

/// `split_sentences`: `{"text"}` → `{"text", "sentences": [{"text", "offset"}]}`, splitting
/// after `.`, `!` or `?` followed by a space and a capital or digit (not after an
/// abbreviation). `offset` counts characters.
fn split_sentences(data: Value, _ctx: &TransformContext<'_>) -> Result<Value, String> {
    let text = data
        .get("text")
        .and_then(Value::as_str)
        .ok_or("data must be {\"text\": string}")?;
    let chars: Vec<char> = text.chars().collect();
    let mut sentences = Vec::new();
    let mut start = 0;
    let mut push = |from: usize, to: usize| {
        let piece: String = chars[from..to].iter().collect();
        let lead = piece.chars().take_while(|c| c.is_whitespace()).count();
        let trimmed = piece.trim();
        if !trimmed.is_empty() {
            sentences.push(json!({"text": trimmed, "offset": from + lead}));
        }
    };
    for k in 0..chars.len() {
        let ends = matches!(chars[k], '.' | '!' | '?')
            && chars.get(k + 1).is_some_and(|c| c.is_whitespace())
            && chars
                .get(k + 2)
                .is_some_and(|c| c.is_uppercase() || c.is_ascii_digit());
        if !ends {
            continue;
        }
        let word_start = chars[..k]
            .iter()
            .rposition(|c| c.is_whitespace())
            .map_or(0, |p| p + 1);
        let word: String = chars[word_start..=k].iter().collect();
        if chars[k] == '.' && is_abbreviation(&word) {
            continue;
        }
        push(start, k + 1);
        start = k + 1;
    }
    push(start, chars.len());
    Ok(json!({"text": text, "sentences": sentences}))
}

/// `document_offsets`: entities per sentence → one list with document offsets and the
/// sentence index.
fn document_offsets(data: Value, _ctx: &TransformContext<'_>) -> Result<Value, String> {
    let sentences = data["sentences"].as_array().ok_or("no sentences")?;
    let per_sentence = data["entities"].as_array().ok_or("no entities")?;
    let mut all = Vec::new();
    for (n, (sentence, entities)) in sentences.iter().zip(per_sentence).enumerate() {
        let offset = sentence["offset"].as_u64().ok_or("no sentence offset")?;
        for e in entities
            .as_array()
            .ok_or("entities of a sentence are a list")?
        {
            let mut e = e.clone();
            for key in ["start", "end"] {
                let at = e[key].as_u64().ok_or("entity offsets are numbers")?;
                e[key] = json!(at + offset);
            }
            e["sentence"] = json!(n);
            all.push(e);
        }
    }
    Ok(json!({"text": data["text"], "sentences": sentences.len(), "entities": all}))
}

#[tokio::main(flavor = "current_thread")]
async fn main() -> anyhow::Result<()> {
    let models = Arc::new(ModelManager::new());
    models.register_provider("rules", Arc::new(RuleNer));
    models
        .load_model_with_warmup(
            ModelSpec::new("ner", "1", "rules", "rules-v1"),
            ProviderInput::new(json!("Ada Lovelace lived in London.")),
        )
        .await?;
    let pipelines = PipelineManager::new(Arc::clone(&models));
    pipelines.register_transform("split_sentences", split_sentences);
    pipelines.register_transform("document_offsets", document_offsets);
    let def = def::parse(PIPELINE, "ner_document", "examples/ner.rs")
        .map_err(|errors| anyhow::anyhow!("{errors:?}"))?;
    pipelines.create_pipeline(def)?;

    let given: Vec<String> = std::env::args().skip(1).collect();
    let documents: Vec<String> = if given.is_empty() {
        vec![
            "Dr. Ada Lovelace joined the Apache Software Foundation in London on March 3, 2024. \
             She can be reached at ada.lovelace@example.org. The foundation raised $4.5 million \
             from Acme Corp. and Globex Inc. last year."
                .into(),
            "Grace Hopper flew from New York to Tokyo on 2025-06-12 with Linus Torvalds. \
             Tickets cost €1,200 each, paid by the University of Amsterdam. They stayed near \
             Haarlem until Friday."
                .into(),
        ]
    } else {
        given
    };
    let requests = documents
        .iter()
        .enumerate()
        .map(|(n, d)| ExecRequest {
            request_id: format!("doc-{n}"),
            data: json!({ "text": d }),
            parameters: None,
            entity: None,
            tenant: None,
        })
        .collect();
    let outcomes = pipelines.execute_batch("ner_document", requests).await;
    for (n, outcome) in outcomes.into_iter().enumerate() {
        match outcome {
            Ok(out) => {
                println!("document doc-{n}: {}", out.output["text"]);
                let entities = out.output["entities"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                for e in &entities {
                    println!(
                        "  {:<6} {:<32} [{}, {}) score {}",
                        e["entity_group"].as_str().unwrap_or("?"),
                        e["word"].to_string(),
                        e["start"],
                        e["end"],
                        e["score"]
                    );
                }
                println!("entities doc-{n}: {}", Value::Array(entities));
            }
            Err(error) => println!("error doc-{n}: {error}"),
        }
    }
    let stats = models.stats("ner@1").unwrap_or_default();
    println!(
        "model ner@1: {} sentences, {} provider calls",
        stats.requests, stats.provider_calls
    );
    Ok(())
}
