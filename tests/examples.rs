//! Runs every program in `examples/` and checks what it prints.
//!
//! **How the programs are found.** `cargo test` does not always build the examples as programs:
//! `cargo test --all-targets` (what `scripts/test` runs) compiles them as libtest harnesses,
//! whose `main` never runs, and `cargo test --test examples` does not build them at all. So the
//! first test that needs a program runs `cargo build --examples --message-format=json` once,
//! with the same cargo, target directory and profile as this test binary, and takes each
//! program's path from the `executable` field of cargo's messages (no guessing of paths or
//! hashes). When the examples are already built, that build only checks them (about a
//! second). Cargo releases its build lock before it runs tests, so this nested build does not
//! wait for the outer one.
//!
//! **Failing loudly.** A failed build, a program cargo did not report, a non-zero exit or a run
//! longer than two minutes fails the test that needed it, with the program's output.
//! `every_example_is_tested` fails when a file in `examples/` has no test here, or a test
//! names a program that does not exist.
//!
//! The examples need no Kafka, no CQL database and no network: they use the local models in
//! `models/` and the embedded feature store in temporary directories.

use std::collections::{BTreeMap, BTreeSet};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// Every program in `examples/`, each with a test below.
const EXAMPLES: [&str; 9] = [
    "basic_inference",
    "batch_list",
    "cache_stats",
    "custom_provider",
    "feature_store",
    "moderation",
    "ner",
    "recommendations",
    "sentiment_pipeline",
];

/// Longest time one program may run.
const RUN_TIMEOUT: Duration = Duration::from_secs(120);

fn manifest_dir() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// Builds the examples once; their executables by name, or why the build failed.
fn built() -> &'static Result<BTreeMap<String, PathBuf>, String> {
    static BUILT: OnceLock<Result<BTreeMap<String, PathBuf>, String>> = OnceLock::new();
    BUILT.get_or_init(|| {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| env!("CARGO").into());
        // `CARGO_TARGET_TMPDIR` is `<target dir>/tmp` of the build that compiled this test.
        let target_dir = Path::new(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .expect("CARGO_TARGET_TMPDIR has a parent")
            .to_owned();
        let mut command = Command::new(cargo);
        command
            .current_dir(manifest_dir())
            .args([
                "build",
                "--examples",
                "--message-format=json-render-diagnostics",
            ])
            .arg("--target-dir")
            .arg(&target_dir);
        if !cfg!(debug_assertions) {
            command.arg("--release");
        }
        let output = command
            .output()
            .map_err(|e| format!("cannot run cargo: {e}"))?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() {
            return Err(format!(
                "`cargo build --examples` failed ({}):\n{}",
                output.status,
                String::from_utf8_lossy(&output.stderr)
            ));
        }
        let mut found = BTreeMap::new();
        for line in stdout.lines() {
            let Ok(message) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let is_example = message["reason"] == "compiler-artifact"
                && message["target"]["kind"]
                    .as_array()
                    .is_some_and(|kinds| kinds.iter().any(|k| k == "example"));
            if let (true, Some(name), Some(exe)) = (
                is_example,
                message["target"]["name"].as_str(),
                message["executable"].as_str(),
            ) {
                found.insert(name.to_owned(), PathBuf::from(exe));
            }
        }
        Ok(found)
    })
}

/// What a program printed.
struct Output {
    stdout: String,
    stderr: String,
}

impl Output {
    /// The JSON after `prefix` on the first line that starts with it.
    fn json(&self, prefix: &str) -> Value {
        let line = self.line(prefix);
        serde_json::from_str(&line[prefix.len()..])
            .unwrap_or_else(|e| panic!("not JSON after {prefix:?} ({e}): {line}"))
    }

    /// The first line starting with `prefix`.
    fn line(&self, prefix: &str) -> &str {
        self.stdout
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or_else(|| panic!("no line starts with {prefix:?} in:\n{}", self.stdout))
    }

    /// Lines starting with `prefix` (leading spaces ignored).
    fn lines(&self, prefix: &str) -> Vec<&str> {
        self.stdout
            .lines()
            .map(str::trim_start)
            .filter(|l| l.starts_with(prefix))
            .collect()
    }

    fn has_line(&self, line: &str) {
        assert!(
            self.stdout.lines().any(|l| l.trim() == line),
            "no line {line:?} in:\n{}",
            self.stdout
        );
    }
}

/// Runs example `name` with `args` from the repository root; panics unless it exits with 0
/// within [`RUN_TIMEOUT`].
fn run(name: &str, args: &[&str]) -> Output {
    let executables = built().as_ref().unwrap_or_else(|e| panic!("{e}"));
    let exe = executables.get(name).unwrap_or_else(|| {
        panic!(
            "cargo built no example `{name}` (built: {:?}); is examples/{name}.rs missing?",
            executables.keys().collect::<Vec<_>>()
        )
    });
    let mut child = Command::new(exe)
        .args(args)
        .current_dir(manifest_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", exe.display()));
    let mut pipes = (child.stdout.take(), child.stderr.take());
    let read = |pipe: Option<Box<dyn Read + Send>>| {
        std::thread::spawn(move || {
            let mut text = String::new();
            if let Some(mut p) = pipe {
                let _ = p.read_to_string(&mut text);
            }
            text
        })
    };
    let stdout = read(pipes.0.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let stderr = read(pipes.1.take().map(|p| Box::new(p) as Box<dyn Read + Send>));
    let started = Instant::now();
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for the example") {
            break status;
        }
        if started.elapsed() > RUN_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "example {name} ran longer than {RUN_TIMEOUT:?}; output so far:\n{}",
                stdout.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = Output {
        stdout: stdout.join().unwrap_or_default(),
        stderr: stderr.join().unwrap_or_default(),
    };
    assert!(
        status.success(),
        "example {name} {args:?} failed ({status}):\nstdout:\n{}\nstderr:\n{}",
        out.stdout,
        out.stderr
    );
    out
}

#[test]
fn every_example_is_tested() {
    let on_disk: BTreeSet<String> = std::fs::read_dir(manifest_dir().join("examples"))
        .expect("read examples/")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "rs"))
        .filter_map(|p| p.file_stem().map(|s| s.to_string_lossy().into_owned()))
        .collect();
    let tested: BTreeSet<String> = EXAMPLES.iter().map(|s| s.to_string()).collect();
    assert_eq!(
        on_disk, tested,
        "examples/*.rs and the programs tests/examples.rs runs differ"
    );
}

/// The JSON after ` -> ` on the line of `input`.
fn answer(out: &Output, input: &str) -> String {
    let line = out
        .stdout
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with(&format!("{input} -> ")))
        .unwrap_or_else(|| panic!("no answer for {input} in:\n{}", out.stdout));
    line[input.len() + 4..].to_owned()
}

#[test]
fn basic_inference_labels_texts_and_flowers() {
    let out = run("basic_inference", &[]);
    out.has_line("loaded: iris@1, sentiment@1");
    let label = |input: &str| -> String {
        let a: Value = serde_json::from_str(&answer(&out, input)).unwrap();
        assert!(a["compound"].is_number() || a["scores"].is_object(), "{a}");
        a["label"].as_str().unwrap().to_owned()
    };
    assert_eq!(label(r#""The book was good.""#), "positive");
    assert_eq!(
        label(r#""The food was great but the service was TERRIBLE!!""#),
        "negative"
    );
    assert_eq!(label(r#"{"text":"Not bad at all :)"}"#), "positive");
    assert_eq!(label(r#""The meeting is at noon.""#), "neutral");
    assert!(answer(&out, "42").starts_with("error invalid_request"));
    assert_eq!(label(r#"{"features":[5.1,3.5,1.4,0.2]}"#), "setosa");
    assert!(
        answer(&out, r#"{"features":[6.0,2.7,4.1]}"#)
            .starts_with("error invalid_request: invalid input: features has 3 values")
    );
    let virginica = out
        .lines("{\"features\":{\"petal_length_cm\":5.2")
        .first()
        .copied()
        .unwrap_or_default()
        .to_owned();
    assert!(virginica.contains(r#""label":"virginica""#), "{virginica}");
    // One provider call per batch, bad inputs included.
    out.has_line("iris@1: 3 requests, 1 errors, 1 provider calls");
    out.has_line("sentiment@1: 5 requests, 1 errors, 1 provider calls");

    let given = run("basic_inference", &["I hate rainy Mondays."]);
    let a: Value = serde_json::from_str(&answer(&given, r#""I hate rainy Mondays.""#)).unwrap();
    assert_eq!(a["label"], "negative", "{a}");
}

#[test]
fn feature_store_versions_ttl_vectors_and_groups() {
    let out = run("feature_store", &[]);
    let current = out.json("current profile: ");
    assert_eq!(current["version"], 3);
    assert_eq!(current["values"]["segment"], "gold");
    let v2 = out.json("profile version 2: ");
    assert_eq!(v2["values"]["segment"], "bronze");
    assert_eq!(
        out.json("session right after the write: ")["values"]["clicks"],
        7
    );
    assert!(out.json("session after 1.2 s: ").is_null());

    let vector = out.json("vector u1: ");
    assert_eq!(vector["missing"], serde_json::json!(["session", "credit"]));
    assert_eq!(vector["features"]["profile"]["version"], 3);
    assert_eq!(vector["features"]["activity"]["values"]["orders_30d"], 4);

    let conflict = out.json("conflict: ");
    assert_eq!(conflict["refused"], true);
    assert!(
        conflict["error"]
            .as_str()
            .unwrap()
            .contains("different definition")
    );
    assert_eq!(
        out.json("group: ")["features"],
        serde_json::json!(["profile", "activity", "session"])
    );
    let u1 = out.json("group vector u1: ");
    assert_eq!(u1["missing"], serde_json::json!(["session"]));
    let u2 = out.json("group vector u2: ");
    assert_eq!(
        u2["missing"],
        serde_json::json!(["profile", "activity", "session"])
    );
    assert_eq!(u2["features"], serde_json::json!({}));

    let invalid = out.json("invalid: ");
    assert_eq!(invalid["refused"], true);
    assert!(invalid["error"].as_str().unwrap().contains("ttl_secs 0"));
    let cache = out.json("cache: ");
    assert!(cache["hits"].as_u64().unwrap() > 0, "{cache}");
    assert!(cache["misses"].as_u64().unwrap() > 0, "{cache}");
}

#[test]
fn sentiment_pipeline_prints_outputs_and_step_records() {
    let out = run("sentiment_pipeline", &[]);
    out.has_line("pipelines: review_sentiment");
    let outputs: Vec<Value> = out
        .lines("output: ")
        .iter()
        .map(|l| serde_json::from_str(&l["output: ".len()..]).unwrap())
        .collect();
    assert_eq!(outputs.len(), 4, "{}", out.stdout);
    assert_eq!(outputs[0]["text"], "What a GREAT day! Best concert ever.");
    assert_eq!(outputs[0]["use"], "testimonial");
    assert_eq!(outputs[0]["sentiment"], "positive");
    assert_eq!(outputs[1]["sentiment"], "negative");
    assert_eq!(outputs[1]["use"], "skip");
    assert_eq!(outputs[2]["sentiment"], "neutral");
    assert_eq!(outputs[3]["sentiment"], "negative");
    for o in &outputs {
        let compound = o["compound"].as_f64().unwrap();
        let expected = if compound >= 0.5 {
            "testimonial"
        } else {
            "skip"
        };
        assert_eq!(o["use"], expected, "{o}");
    }
    // Three steps per answered input, in order, each with a latency.
    let steps = out.lines("step ");
    assert_eq!(steps.len(), 12, "{}", out.stdout);
    for (n, step) in steps.iter().enumerate() {
        let name = ["clean", "model:sentiment@1", "decide"][n % 3];
        assert!(
            step.starts_with(&format!("step {name} latency_us=")),
            "{step}"
        );
    }
    assert!(steps[0].ends_with(r#"output={"text":"What a GREAT day! Best concert ever."}"#));
    assert!(
        out.line("error: ")
            .starts_with("error: step_failed: step `clean`"),
        "{}",
        out.stdout
    );
}

#[test]
fn recommendations_rank_candidates_per_user() {
    let out = run("recommendations", &[]);
    out.has_line("batch: 4 requests, 3 answered");
    let top = |user: &str| -> (String, Vec<String>, Vec<f64>) {
        let v = out.json(&format!("top {user}: "));
        assert_eq!(v["user"], user);
        assert_eq!(v["skipped"], serde_json::json!(["i9"]), "{v}");
        let items = v["top"].as_array().unwrap();
        assert_eq!(items.len(), 3, "k = 3: {v}");
        (
            v["basis"].as_str().unwrap().to_owned(),
            items
                .iter()
                .map(|i| i["item"].as_str().unwrap().to_owned())
                .collect(),
            items.iter().map(|i| i["score"].as_f64().unwrap()).collect(),
        )
    };
    let (basis, items, scores) = top("u1");
    assert_eq!(basis, "taste");
    assert_eq!(items, ["i1", "i6", "i2"]);
    // Dune · u1's taste: 0.9·1.0 + 0.1·0.0 + 0.0·0.1 + 0.3·0.4.
    assert!((scores[0] - 1.02).abs() < 1e-9, "{scores:?}");
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    let (basis, items, _) = top("u2");
    assert_eq!(basis, "taste");
    assert_eq!(items, ["i3", "i7", "i4"]);
    let (basis, items, scores) = top("u3");
    assert_eq!(basis, "popularity");
    assert_eq!(items, ["i1", "i6", "i3"]);
    assert_eq!(scores, [0.9, 0.85, 0.8]);
    assert!(
        out.line("error: ").contains("data.user_id"),
        "{}",
        out.stdout
    );
}

#[test]
fn batch_list_counts_labels_in_one_model_run() {
    let out = run("batch_list", &[]);
    out.has_line("rows: 102");
    let labels = out.json("labels: ");
    let counts: BTreeMap<String, u64> = serde_json::from_value(labels.clone()).unwrap();
    assert_eq!(counts.values().sum::<u64>(), 100, "{labels}");
    for species in ["setosa", "versicolor", "virginica"] {
        let n = counts.get(species).copied().unwrap_or(0);
        assert!((20..=55).contains(&n), "{species}: {n} in {labels}");
    }
    out.has_line("errors: 2");
    assert_eq!(out.lines("row-").len(), 2, "{}", out.stdout);
    // The whole batch went to the model as one run.
    out.has_line("provider calls: 1");
    assert!(out.line("throughput: ").contains(" rows/s"));
}

#[test]
fn cache_stats_serves_the_second_round_from_the_cache() {
    let out = run("cache_stats", &[]);
    let cached = |round: u32| -> Vec<bool> {
        out.lines(&format!("round {round}: "))
            .iter()
            .map(|l| l.rsplit_once("cached=").map(|(_, c)| c == "true").unwrap())
            .collect()
    };
    assert_eq!(cached(1), [false, false, false]);
    assert_eq!(cached(2), [true, true, true]);
    assert_eq!(cached(3), [false], "another tenant never shares answers");
    assert_eq!(cached(4), [false]);
    assert_eq!(cached(5), [false], "a model with the cache off");
    let cache = out.json("cache: ");
    assert_eq!(cache["hits"], 3, "{cache}");
    assert_eq!(cache["misses"], 4, "{cache}");
    assert_eq!(cache["entries"], 4, "{cache}");
    let ratio = cache["hit_ratio"].as_f64().unwrap();
    assert!(ratio > 0.0 && (ratio - 3.0 / 7.0).abs() < 1e-9, "{cache}");
    let cached_model = out.json("model sentiment@1: ");
    assert_eq!(cached_model["requests"], 7);
    assert_eq!(cached_model["cache_hits"], 3);
    // Round 1's three misses make one batched call; round 3's miss another.
    assert_eq!(cached_model["provider_calls"], 2);
    let fresh = out.json("model sentiment_fresh@1: ");
    assert_eq!(fresh["cache_hits"], 0);
    assert_eq!(fresh["provider_calls"], 2);
}

#[test]
fn custom_provider_batches_caches_and_counts() {
    let out = run("custom_provider", &[]);
    out.has_line(r#"a: {"text":"HELLO KAFKA HELLO KAFKA"} (version 2, cached false)"#);
    out.has_line("c: error invalid_request: invalid input: data must be a string");
    out.has_line("[shout] one call, 3 input(s), model shout-twice");
    out.has_line(r#"d: {"text":"HELLO KAFKA"} (version 1, cached false)"#);
    out.has_line(r#"e: {"text":"HELLO KAFKA"} (version 1, cached true)"#);
    assert!(
        out.line("  f: error unknown_model: no model `quiet`")
            .contains("loud@1")
    );
    let v1 = out.json("usage loud@1: ");
    assert_eq!(v1["requests"], 2);
    assert_eq!(v1["cache_hits"], 1);
    assert_eq!(v1["provider_calls"], 1);
    assert_eq!(v1["total_tokens"], 4);
    let v2 = out.json("usage loud@2: ");
    assert_eq!(v2["requests"], 3);
    assert_eq!(v2["errors"], 1);
    assert_eq!(v2["provider_calls"], 1);
}

#[test]
fn moderation_sends_strong_negativity_to_review() {
    let out = run("moderation", &[]);
    out.has_line("pipelines: moderation, sentiment");
    let mut decisions = BTreeMap::new();
    for line in out
        .stdout
        .lines()
        .filter(|l| l.starts_with("allow ") || l.starts_with("review "))
    {
        let (head, text) = line.split_once(": ").unwrap();
        let mut parts = head.split(' ');
        let decision = parts.next().unwrap().to_owned();
        let compound: f64 = parts
            .next()
            .and_then(|p| p.strip_prefix("compound="))
            .unwrap()
            .parse()
            .unwrap();
        // The threshold in config/pipelines/moderation.toml.
        let expected = if compound < -0.5 { "review" } else { "allow" };
        assert_eq!(decision, expected, "{line}");
        decisions.insert(serde_json::from_str::<String>(text).unwrap(), decision);
    }
    assert_eq!(decisions.len(), 8, "{}", out.stdout);
    assert_eq!(decisions["This is awful, I hate it."], "review");
    assert_eq!(
        decisions["Thanks for the quick reply, this fixed it."],
        "allow"
    );
    // The limit the example's documentation states: a threat without negative words passes.
    assert_eq!(decisions["I know where you live."], "allow");
    assert_eq!(
        out.json("counts: "),
        serde_json::json!({"allow": 5, "review": 3})
    );
}

/// The entities printed for `doc`, each checked against the document's text.
fn entities(out: &Output, doc: &str) -> Vec<(String, String)> {
    let text: String = serde_json::from_value(out.json(&format!("document {doc}: "))).unwrap();
    let chars: Vec<char> = text.chars().collect();
    let list = out.json(&format!("entities {doc}: "));
    let mut previous_end = 0;
    let mut found = Vec::new();
    for e in list.as_array().unwrap() {
        let (start, end) = (
            e["start"].as_u64().unwrap() as usize,
            e["end"].as_u64().unwrap() as usize,
        );
        let word = e["word"].as_str().unwrap();
        assert!(start < end && end <= chars.len(), "{e}");
        // Offsets count characters, like Hugging Face's pipelines.
        let at: String = chars[start..end].iter().collect();
        assert_eq!(at, word, "offsets of {e} in {text:?}");
        assert!(
            start >= previous_end,
            "entities overlap or are unsorted: {e}"
        );
        previous_end = end;
        let group = e["entity_group"].as_str().unwrap();
        assert!(
            ["PERSON", "ORG", "LOC", "DATE", "MONEY", "EMAIL"].contains(&group),
            "{e}"
        );
        let score = e["score"].as_f64().unwrap();
        assert!(score > 0.0 && score <= 1.0, "{e}");
        found.push((group.to_owned(), word.to_owned()));
    }
    found
}

#[test]
fn ner_finds_entities_with_document_offsets() {
    let out = run("ner", &[]);
    let has = |found: &[(String, String)], group: &str, word: &str| {
        assert!(
            found.iter().any(|(g, w)| g == group && w == word),
            "no {group} {word:?} in {found:?}"
        );
    };
    let doc0 = entities(&out, "doc-0");
    for (group, word) in [
        ("PERSON", "Ada Lovelace"),
        ("ORG", "Apache Software Foundation"),
        ("LOC", "London"),
        ("DATE", "March 3, 2024"),
        ("EMAIL", "ada.lovelace@example.org"),
        ("MONEY", "$4.5 million"),
        ("ORG", "Acme Corp."),
        ("ORG", "Globex Inc."),
    ] {
        has(&doc0, group, word);
    }
    assert!(
        !doc0.iter().any(|(_, w)| w == "She" || w == "The"),
        "{doc0:?}"
    );
    let doc1 = entities(&out, "doc-1");
    for (group, word) in [
        ("PERSON", "Grace Hopper"),
        ("LOC", "New York"),
        ("LOC", "Tokyo"),
        ("DATE", "2025-06-12"),
        ("PERSON", "Linus Torvalds"),
        ("MONEY", "€1,200"),
        ("ORG", "University of Amsterdam"),
        ("DATE", "Friday"),
    ] {
        has(&doc1, group, word);
    }
    // Six sentences of two documents, in one model call (the map step batches them).
    out.has_line("model ner@1: 6 sentences, 1 provider calls");

    let given = run(
        "ner",
        &["Ms. Maria Garcia paid $300 to Globex Inc. on May 4, 2025."],
    );
    let found = entities(&given, "doc-0");
    assert_eq!(
        found,
        [
            ("PERSON".to_owned(), "Maria Garcia".to_owned()),
            ("MONEY".to_owned(), "$300".to_owned()),
            ("ORG".to_owned(), "Globex Inc.".to_owned()),
            ("DATE".to_owned(), "May 4, 2025".to_owned()),
        ]
    );
}
