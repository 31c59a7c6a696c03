//! Numbers pass through exactly: `inferflow run` (the real binary) answers requests carrying
//! edge-case and random numbers over Kafka and over HTTP, through the built-in `identity`
//! pipeline, the `echo` model, and a pipeline whose steps touch other fields, and every number
//! comes out with the digits it went in with. A number a step must compute with but cannot
//! represent is that request's `invalid_request`, naming the path.

use std::process::Child;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::{Raw, Topics, collect, produce};
use crate::number_cases::{self, BEYOND_F64};
use crate::utils::{self, unique_name};

/// A pipeline that changes `text`, adds `touched`, runs `echo` and compares `score` with a
/// threshold: everything else in `data` is untouched.
const TOUCH_PIPELINE: &str = r#"
id = "touch"
[[steps]]
type = "preprocess"
transforms = [{ op = "clean", field = "text" }, { op = "set", field = "touched", value = true }]
[[steps]]
type = "model"
model = "echo"
[[steps]]
type = "postprocess"
transforms = [{ op = "threshold", field = "score", threshold = 0.5, above = "high", below = "low", into = "verdict" }]
"#;

/// Kills the `inferflow run` this test started when the test ends, passing or not.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn numbers_pass_through_identity_echo_and_untouched_pipeline_fields_over_kafka_and_http() {
    utils::init_tracing();
    utils::require_kafka().await;
    let topics = Topics::create("numbers", 2).await;
    let group = unique_name("numbers");
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("touch.toml"), TOUCH_PIPELINE).unwrap();
    let port = utils::free_port();
    let mut cmd = crate::harness::inferflow_run(&topics, &group, None, "warn");
    cmd.env("INFERFLOW__PIPELINES__DIR", dir.path())
        .env("INFERFLOW__HTTP__LISTEN", format!("127.0.0.1:{port}"));
    let _child = Killed(cmd.spawn().expect("start inferflow run"));

    let cases = number_cases::all(14, 300);
    let object = number_cases::object(&cases);
    let beyond = vec![BEYOND_F64.to_owned()];
    // (request id, request text, the cases its result must carry).
    let requests: Vec<(&str, String, &[String])> = vec![
        (
            "num-identity",
            format!(r#"{{"request_id":"num-identity","pipeline":"identity","data":{object}}}"#),
            &cases,
        ),
        (
            "num-echo",
            format!(r#"{{"request_id":"num-echo","model":"echo","data":{object}}}"#),
            &cases,
        ),
        (
            "num-touch",
            format!(
                r#"{{"request_id":"num-touch","pipeline":"touch","data":{{"text":"  Some   TEXT ","score":0.75,"nums":{object}}}}}"#
            ),
            &cases,
        ),
        (
            "num-beyond",
            format!(
                r#"{{"request_id":"num-beyond","pipeline":"identity","data":{}}}"#,
                number_cases::object(&beyond)
            ),
            &beyond,
        ),
    ];
    // `score` beyond what a double holds: the threshold cannot compare it.
    let refused = r#"{"request_id":"num-refused","pipeline":"touch","data":{"text":"x","score":12345678901234567890123}}"#;

    let mut raw: Vec<Raw> = requests
        .iter()
        .map(|(_, text, _)| (None, Some(text.clone().into_bytes())))
        .collect();
    raw.push((None, Some(refused.as_bytes().to_vec())));
    produce(&topics.requests, &raw).await;
    let out = collect(
        &[&topics.results, &topics.dlq],
        raw.len(),
        Duration::from_secs(90),
        Duration::from_millis(300),
    )
    .await;
    let mut by_id = std::collections::HashMap::new();
    for c in &out {
        assert_eq!(c.topic, topics.results, "no dead letters: {c:?}");
        let text = String::from_utf8(c.value.clone().expect("a result has a value")).unwrap();
        let doc: Value = serde_json::from_str(&text).expect("a result is JSON");
        by_id.insert(doc["request_id"].as_str().unwrap().to_owned(), (text, doc));
    }
    assert_eq!(by_id.len(), raw.len(), "one result per request");

    // Over HTTP, the same requests to the same process.
    let http = reqwest::Client::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while http
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await
        .is_err()
    {
        assert!(Instant::now() < deadline, "inferflow serves HTTP");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let post = |body: String| {
        let http = http.clone();
        async move {
            let response = http
                .post(format!("http://127.0.0.1:{port}/v1/predict"))
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("HTTP request");
            (response.status().as_u16(), response.text().await.unwrap())
        }
    };

    for (id, text, expected) in &requests {
        let (kafka_text, doc) = &by_id[*id];
        assert_eq!(doc["status"], "ok", "{id}: {kafka_text}");
        number_cases::assert_carried(kafka_text, expected, &format!("{id} over Kafka"));
        let (status, http_text) = post(text.clone()).await;
        assert_eq!(status, 200, "{id}: {http_text}");
        number_cases::assert_carried(&http_text, expected, &format!("{id} over HTTP"));
    }
    // The touched fields were changed, as asked.
    let touched = &by_id["num-touch"].1["output"];
    assert_eq!(
        (&touched["text"], &touched["touched"], &touched["verdict"]),
        (
            &Value::from("Some TEXT"),
            &Value::from(true),
            &Value::from("high")
        ),
        "{touched}"
    );

    // The number the threshold cannot compare: invalid_request naming the path, both ways.
    let (kafka_text, doc) = &by_id["num-refused"];
    assert_eq!(doc["error"]["kind"], "invalid_request", "{kafka_text}");
    let message = doc["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("data.score") && message.contains("12345678901234567890123"),
        "{message}"
    );
    let (status, http_text) = post(refused.to_owned()).await;
    let http_doc: Value = serde_json::from_str(&http_text).unwrap();
    assert_eq!(status, 400, "{http_text}");
    assert_eq!(http_doc["error"], doc["error"]);
}
