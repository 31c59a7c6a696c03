//! `inferflow batch`, run as a user would run it: the real binary over JSON Lines files, with
//! the shipped local models (config/models.example.toml, from the repository root) and the
//! embedded feature store. No Kafka and no CQL database are involved.

use std::collections::HashMap;
use std::path::Path;
use std::process::{Command, Output};

use serde_json::{Value, json};

#[path = "integration/number_cases.rs"]
mod number_cases;

fn inferflow(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_inferflow"));
    cmd.args(args);
    for (key, _) in std::env::vars() {
        if key.starts_with("INFERFLOW__") || key == "INFERFLOW_CONFIG" {
            cmd.env_remove(key);
        }
    }
    cmd.envs(env.iter().copied());
    cmd.output().expect("run inferflow")
}

/// `inferflow batch ARGS --input INPUT --output OUTPUT` with the shipped models.
fn batch(input: &Path, output: &Path, args: &[&str]) -> Output {
    let mut all = vec![
        "batch",
        "--config",
        "config/models.example.toml",
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ];
    all.extend_from_slice(args);
    inferflow(&all, &[])
}

/// `inferflow batch --config CONFIG --pipeline PIPELINE --input INPUT --output OUTPUT`.
fn batch_with(config: &str, pipeline: &str, input: &Path, output: &Path) -> Output {
    inferflow(
        &[
            "batch",
            "--config",
            config,
            "--pipeline",
            pipeline,
            "--input",
            input.to_str().unwrap(),
            "--output",
            output.to_str().unwrap(),
        ],
        &[],
    )
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// The output file's results, in order.
fn results(path: &Path) -> Vec<Value> {
    let text = std::fs::read_to_string(path).unwrap();
    assert!(text.ends_with('\n'), "every result ends its line: {text:?}");
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}")))
        .collect()
}

fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(path, lines.join("\n") + "\n").unwrap();
}

/// Writes the pipeline `name` (its TOML) into `root/pipelines/` and a configuration
/// `root/inferflow.toml` pointing `pipelines.dir` there and `feature_store.path` at
/// `root/store/features.redb`, with `feature_store` as more of its `[feature_store]` table;
/// returns the configuration's path.
fn pipeline_and_config(root: &Path, name: &str, pipeline: &str, feature_store: &str) -> String {
    std::fs::create_dir_all(root.join("pipelines")).unwrap();
    std::fs::write(root.join(format!("pipelines/{name}.toml")), pipeline).unwrap();
    let config = root.join("inferflow.toml");
    std::fs::write(
        &config,
        format!(
            "[pipelines]\ndir = {:?}\n[feature_store]\npath = {:?}\n{feature_store}",
            root.join("pipelines").to_str().unwrap(),
            root.join("store/features.redb").to_str().unwrap()
        ),
    )
    .unwrap();
    config.to_str().unwrap().to_owned()
}

#[test]
fn sentiment_batch_labels_every_line_in_order_with_step_records() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let texts = [
        ("pos", "  What a GREAT day!  ", "positive"),
        ("neg", "This is awful, I hate it.", "negative"),
        ("neu", "The train leaves at nine.", "neutral"),
        ("pos2", "I love this, thank you so much", "positive"),
    ];
    let lines: Vec<String> = texts
        .iter()
        .map(|(id, text, _)| json!({"request_id": id, "data": {"text": text}}).to_string())
        .collect();
    write_lines(&input, &lines);
    // Batches of 3 with 2 at once: the second, short batch may finish first; order must hold.
    let out = batch(
        &input,
        &output,
        &[
            "--pipeline",
            "sentiment",
            "--batch-size",
            "3",
            "--concurrency",
            "2",
        ],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let results = results(&output);
    assert_eq!(results.len(), texts.len());
    for (result, (id, _, label)) in results.iter().zip(texts) {
        assert_eq!(result["request_id"], id, "{result}");
        assert_eq!(result["status"], "ok", "{result}");
        assert_eq!(result["pipeline"], "sentiment");
        assert_eq!(result["output"]["label"], label, "{result}");
        assert!(result["output"]["compound"].is_number(), "{result}");
        assert!(result.get("source").is_none(), "no Kafka source offline");
        let steps: Vec<&str> = result["steps"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["name"].as_str().unwrap())
            .collect();
        assert_eq!(steps, ["clean", "model:sentiment@1", "shape"], "{result}");
    }
    // No terminal here, so no bar: a summary line instead.
    let err = stderr(&out);
    assert!(
        err.contains("4 ok, 0 error, 0 skipped"),
        "summary missing: {err}"
    );
    // The summary line has the shape of the README's example.
    let summary = err.lines().last().unwrap_or_default();
    assert_eq!(shape(summary), shape(&readme_summary()), "{summary}");
}

/// The example summary line in the README's batch section (the line after its "one summary
/// line" text, in a `text` block).
fn readme_summary() -> String {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let from = readme
        .find("one summary line")
        .expect("the README describes the summary line");
    readme[from..]
        .lines()
        .map(str::trim)
        .find(|l| l.contains(" lines: "))
        .expect("the README shows a summary line")
        .to_owned()
}

/// A summary line with its numbers as `#` and its output path as `PATH`.
fn shape(line: &str) -> String {
    let line = match line.split_once(" -> ") {
        Some((head, _)) => format!("{head} -> PATH"),
        None => line.to_owned(),
    };
    let mut out = String::new();
    let mut in_number = false;
    for c in line.chars() {
        let numeric = c.is_ascii_digit() || (in_number && c == '.');
        if numeric {
            if !in_number {
                out.push('#');
            }
        } else {
            out.push(c);
        }
        in_number = numeric;
    }
    out
}

#[test]
fn a_resumed_run_scores_each_request_exactly_once() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let lines: Vec<String> = (0..25)
        .map(|i| {
            json!({"request_id": format!("r{i}"), "data": {"text": format!("good {i}")}})
                .to_string()
        })
        .collect();
    write_lines(&input, &lines);
    let out = batch(
        &input,
        &output,
        &["--pipeline", "sentiment", "--batch-size", "4"],
    );
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let full = std::fs::read_to_string(&output).unwrap();

    // As after a crash: 10 complete results, then half of the 11th.
    let kept: Vec<&str> = full.lines().take(11).collect();
    let mut partial = kept[..10].join("\n") + "\n";
    partial.push_str(&kept[10][..kept[10].len() / 2]);
    std::fs::write(&output, &partial).unwrap();

    let out = batch(
        &input,
        &output,
        &["--pipeline", "sentiment", "--batch-size", "4"],
    );
    let err = stderr(&out);
    assert!(out.status.success(), "stderr: {err}");
    assert!(err.contains("incomplete last line"), "{err}");
    assert!(err.contains("15 ok, 0 error, 10 skipped"), "{err}");
    let results = results(&output);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &results {
        assert_eq!(r["status"], "ok", "{r}");
        *seen
            .entry(r["request_id"].as_str().unwrap().to_owned())
            .or_default() += 1;
    }
    assert_eq!(seen.len(), 25, "every request has a result");
    assert!(
        seen.values().all(|&n| n == 1),
        "each exactly once: {seen:?}"
    );
    // The results from the first run are left as they were.
    assert!(
        std::fs::read_to_string(&output)
            .unwrap()
            .starts_with(&kept[..10].join("\n"))
    );

    // Once complete, running again scores nothing.
    let out = batch(&input, &output, &["--pipeline", "sentiment"]);
    assert!(
        stderr(&out).contains("0 ok, 0 error, 25 skipped"),
        "{}",
        stderr(&out)
    );
    assert_eq!(self::results(&output).len(), 25);
}

#[test]
fn an_output_that_is_not_results_is_left_alone() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_lines(
        &input,
        &[json!({"request_id": "a", "data": "x"}).to_string()],
    );
    std::fs::write(&output, "precious data\nmore\n").unwrap();
    let out = batch(&input, &output, &["--pipeline", "identity"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("not a result"), "{}", stderr(&out));
    assert_eq!(
        std::fs::read_to_string(&output).unwrap(),
        "precious data\nmore\n"
    );
}

#[test]
fn invalid_lines_get_error_results_and_nothing_is_skipped() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    let mut text = [
        r#"{"request_id":"ok1","data":{"text":"nice"}}"#,
        r#"{"request_id":"trunc","data":{"te"#,
        r#"{"data":{"text":"no id"}}"#,
        r#"{"request_id":"nodata"}"#,
        r#"[1,2,3]"#,
        r#"{"request_id":"both","pipeline":"sentiment","model":"sentiment@1","data":"x"}"#,
        r#"{"request_id":"other","pipeline":"no-such-pipeline","data":"x"}"#,
        r#"{"request_id":"bymodel","model":"sentiment@1","data":"so happy"}"#,
    ]
    .join("\n")
    .into_bytes();
    text.extend_from_slice(b"\n\xff\xfe not utf-8\n");
    std::fs::write(&input, text).unwrap();
    let out = batch(&input, &output, &["--pipeline", "sentiment"]);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let results = results(&output);
    let got: Vec<(String, String, String)> = results
        .iter()
        .map(|r| {
            (
                r["request_id"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
                r["error"]["kind"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    let want = [
        ("ok1", "ok", ""),
        ("line-2", "error", "invalid_json"),
        ("line-3", "error", "invalid_request"),
        ("nodata", "error", "invalid_request"),
        ("line-5", "error", "invalid_request"),
        ("both", "error", "invalid_request"),
        ("other", "error", "unknown_pipeline"),
        ("bymodel", "ok", ""),
        ("line-9", "error", "invalid_json"),
    ];
    let want: Vec<(String, String, String)> = want
        .iter()
        .map(|(a, b, c)| (a.to_string(), b.to_string(), c.to_string()))
        .collect();
    assert_eq!(got, want);
    assert_eq!(results[7]["model"], "sentiment@1");
    assert_eq!(results[7]["output"]["label"], "positive");
    assert!(
        stderr(&out).contains("2 ok, 7 error, 0 skipped"),
        "{}",
        stderr(&out)
    );
}

#[test]
fn an_unknown_pipeline_or_model_fails_before_writing_anything() {
    let dir = tempfile::tempdir().unwrap();
    let (input, output) = (dir.path().join("in.jsonl"), dir.path().join("out.jsonl"));
    write_lines(
        &input,
        &[json!({"request_id": "a", "data": "x"}).to_string()],
    );
    let out = batch(&input, &output, &["--pipeline", "sentimnet"]);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "stderr: {err}");
    assert!(err.contains("no pipeline `sentimnet`"), "{err}");
    assert!(
        err.contains("sentiment"),
        "the known ones are listed: {err}"
    );
    assert!(!output.exists(), "no output for a setup error");

    let out = batch(&input, &output, &["--model", "nope@1"]);
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("nope@1"), "{}", stderr(&out));
    assert!(!output.exists());

    let out = batch(
        &dir.path().join("missing.jsonl"),
        &output,
        &["--pipeline", "sentiment"],
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("missing.jsonl"), "{}", stderr(&out));
}

/// Features written with `inferflow features` (embedded backend) are read by a batch run
/// whose configuration keeps the default `scylla` backend, pointed at nothing: batch uses the
/// embedded store at `feature_store.path` by default.
#[test]
fn a_features_pipeline_reads_the_embedded_store_by_default() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config: &str = &pipeline_and_config(
        root,
        "greet",
        r#"
id = "greet"

[[steps]]
type = "features"
entity_type = "user"
features = ["profile"]
entity_id = "data.user_id"

[[steps]]
type = "postprocess"
name = "render"
transforms = [
  { op = "template", template = "Hello {{ data.name }}, {{ features.profile.segment }} member", into = "greeting" },
]
"#,
        "contact_points = [\"127.0.0.1:1\"]\n",
    );
    let put = inferflow(
        &[
            "features",
            "--config",
            config,
            "put",
            "--entity-type",
            "user",
            "--entity-id",
            "u1",
            "--name",
            "profile",
            "--values",
            r#"{"segment":"gold"}"#,
            "--version",
            "1",
        ],
        &[("INFERFLOW__FEATURE_STORE__BACKEND", "embedded")],
    );
    assert!(put.status.success(), "stderr: {}", stderr(&put));

    let (input, output) = (root.join("in.jsonl"), root.join("out.jsonl"));
    write_lines(
        &input,
        &[
            json!({"request_id": "a", "data": {"user_id": "u1", "name": "Ada"}}).to_string(),
            json!({"request_id": "b", "data": {"name": "nobody"}}).to_string(),
        ],
    );
    let out = batch_with(config, "greet", &input, &output);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let results = results(&output);
    assert_eq!(results[0]["status"], "ok", "{}", results[0]);
    assert_eq!(
        results[0]["output"],
        json!({"user_id": "u1", "name": "Ada", "greeting": "Hello Ada, gold member"})
    );
    let steps: Vec<&str> = results[0]["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["name"].as_str().unwrap())
        .collect();
    assert_eq!(steps, ["features:user", "render"]);
    assert_eq!(results[1]["status"], "error", "{}", results[1]);
    assert_eq!(
        results[1]["error"]["kind"], "invalid_request",
        "{}",
        results[1]
    );

    // With the configured backend (scylla, pointed at a closed port) there is no store.
    let out = inferflow(
        &[
            "batch",
            "--config",
            config,
            "--pipeline",
            "greet",
            "--input",
            input.to_str().unwrap(),
            "--output",
            root.join("out2.jsonl").to_str().unwrap(),
            "--feature-store",
            "configured",
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1), "stderr: {}", stderr(&out));
    assert!(stderr(&out).contains("feature store"), "{}", stderr(&out));
}

/// Numbers pass through exactly: written with `inferflow features put` and read with
/// `features get` (the embedded store), and in `inferflow batch` through `identity`, and
/// through a pipeline that reads them from the store next to the request's own.
#[test]
fn numbers_pass_through_the_features_cli_and_batch_exactly() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let config: &str = &pipeline_and_config(
        root,
        "exact",
        r#"
id = "exact"

[[steps]]
type = "features"
entity_type = "user"
features = ["exact"]
entity_id = "data.user_id"

[[steps]]
type = "postprocess"
transforms = [{ op = "object", fields = { feature = "features.exact", nums = "data.nums" } }]
"#,
        "backend = \"embedded\"\n",
    );
    let mut cases = number_cases::all(7, 300);
    cases.push(number_cases::BEYOND_F64.to_owned());
    let object = number_cases::object(&cases);
    let key = [
        "--entity-type",
        "user",
        "--entity-id",
        "u1",
        "--name",
        "exact",
    ];

    let mut args = vec!["features", "--config", config, "put"];
    args.extend_from_slice(&key);
    args.extend_from_slice(&["--values", &object, "--version", "1"]);
    let put = inferflow(&args, &[]);
    assert!(put.status.success(), "stderr: {}", stderr(&put));
    let printed = String::from_utf8(put.stdout).unwrap();
    number_cases::assert_carried(&printed, &cases, "features put");
    let mut args = vec!["features", "--config", config, "get"];
    args.extend_from_slice(&key);
    let get = inferflow(&args, &[]);
    assert!(get.status.success(), "stderr: {}", stderr(&get));
    let printed = String::from_utf8(get.stdout).unwrap();
    number_cases::assert_carried(&printed, &cases, "features get");

    let (input, output) = (root.join("in.jsonl"), root.join("out.jsonl"));
    let lines = [
        format!(r#"{{"request_id":"identity","pipeline":"identity","data":{object}}}"#),
        format!(
            r#"{{"request_id":"exact","pipeline":"exact","data":{{"user_id":"u1","nums":{object}}}}}"#
        ),
    ];
    write_lines(&input, &lines);
    let out = batch_with(config, "identity", &input, &output);
    assert!(out.status.success(), "stderr: {}", stderr(&out));
    let text = std::fs::read_to_string(&output).unwrap();
    let written: Vec<&str> = text.lines().collect();
    assert_eq!(written.len(), 2, "{text}");
    for line in written {
        let doc: Value = serde_json::from_str(line).unwrap();
        assert_eq!(doc["status"], "ok", "{line}");
        number_cases::assert_carried(line, &cases, &format!("batch {}", doc["request_id"]));
    }
}

/// A features step whose features land in the data (`into`), so the output shows the values
/// the step used.
const AUDIT_PIPELINE: &str = r#"
id = "audit"

[[steps]]
type = "features"
name = "profile"
entity_type = "user"
features = ["profile", "never_written"]
entity_id = "data.user_id"
into = "used"
"#;

/// The prediction audit: a features step's record lists the feature versions it read, and
/// `inferflow features get --version N` reads back exactly the values the step used. Version 1
/// is written, a request scored, version 2 written, a request scored again: each result names
/// its own version, and the history reproduces each.
#[test]
fn a_features_step_records_the_versions_it_read_and_the_history_reproduces_them() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let embedded = "backend = \"embedded\"\n";
    let config: &str = &pipeline_and_config(root, "audit", AUDIT_PIPELINE, embedded);
    let features = |args: &[&str]| -> Value {
        let mut all = vec!["features", "--config", config];
        all.extend_from_slice(args);
        let out = inferflow(&all, &[]);
        assert!(out.status.success(), "{args:?}: {}", stderr(&out));
        serde_json::from_slice(&out.stdout).expect("features prints JSON")
    };
    let key = [
        "--entity-type",
        "user",
        "--entity-id",
        "u1",
        "--name",
        "profile",
    ];
    let score = |id: &str| -> Value {
        let (input, output) = (
            root.join(format!("{id}.in")),
            root.join(format!("{id}.out")),
        );
        write_lines(
            &input,
            &[json!({"request_id": id, "data": {"user_id": "u1"}}).to_string()],
        );
        let out = batch_with(config, "audit", &input, &output);
        assert!(out.status.success(), "stderr: {}", stderr(&out));
        results(&output).remove(0)
    };

    let put = |values: &str, version: &str| {
        let mut put = vec!["put"];
        put.extend(key);
        put.extend(["--values", values, "--version", version]);
        features(&put);
    };
    put(r#"{"segment":"silver","score":0.25}"#, "1");
    let first = score("first");
    put(r#"{"segment":"gold","score":0.75}"#, "2");
    let second = score("second");

    for (result, version) in [(&first, 1), (&second, 2)] {
        assert_eq!(result["status"], "ok", "{result}");
        let step = &result["steps"][0];
        assert_eq!(step["name"], "profile", "{result}");
        assert_eq!(
            step["features"],
            json!([
                {"entity_type": "user", "entity_id": "u1", "feature": "profile", "version": version},
                {"entity_type": "user", "entity_id": "u1", "feature": "never_written", "version": null},
            ]),
            "{result}"
        );
        // Reproduce: the recorded version, read from the history, is what the step used.
        let recorded = step["features"][0]["version"].as_u64().unwrap().to_string();
        let mut get = vec!["get"];
        get.extend(key);
        get.extend(["--version", recorded.as_str()]);
        let stored = features(&get);
        assert_eq!(stored["version"], version);
        assert_eq!(
            stored["values"], result["output"]["used"]["profile"],
            "{result}"
        );
    }
    assert_eq!(first["output"]["used"]["profile"]["segment"], "silver");
    assert_eq!(second["output"]["used"]["profile"]["segment"], "gold");
}
