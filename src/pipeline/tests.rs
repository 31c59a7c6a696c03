//! Unit tests of pipelines run through the manager, with the built-in `echo` model and
//! custom transforms; features and real models are covered by the integration tests.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::{Value, json};

use super::*;

fn manager() -> PipelineManager {
    PipelineManager::new(Arc::new(ModelManager::new()))
}

fn def(text: &str) -> PipelineDef {
    def::parse(text, "p", "test").unwrap()
}

#[tokio::test]
async fn steps_run_in_order_and_are_recorded() {
    let m = manager();
    m.create_pipeline(def(
        r#"
id = "label"
[[steps]]
type = "preprocess"
transforms = [{ op = "clean", field = "text", lowercase = true }]
record_output = true
[[steps]]
type = "model"
model = "echo"
[[steps]]
type = "postprocess"
transforms = [{ op = "extract", path = "text" }, { op = "map_labels", mapping = { "hello world" = "greeting" } }]
"#,
    ))
    .unwrap();
    let out = m
        .execute("label", json!({"text": "  Hello\n WORLD "}))
        .await
        .unwrap();
    assert_eq!(out.output, json!("greeting"));
    let names: Vec<&str> = out.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["preprocess", "model:echo", "postprocess"]);
    assert_eq!(out.steps[0].output, Some(json!({"text": "hello world"})));
    assert_eq!(out.steps[1].output, None);
    assert_eq!(out.model_version.as_deref(), Some("1"));
}

#[tokio::test]
async fn on_error_fail_skip_and_default() {
    let m = manager();
    let step = |on_error: &str| {
        format!(
            "[[steps]]\ntype = \"postprocess\"\ntransforms = [{{ op = \"extract\", path = \"missing\" }}]\non_error = {on_error}\n[[steps]]\ntype = \"preprocess\"\ntransforms = [{{ op = \"set\", field = \"after\", value = true }}]\n"
        )
    };
    for (id, on_error) in [
        ("fail", "\"fail\""),
        ("skip", "\"skip\""),
        ("dflt", "{ default = { d = 1 } }"),
    ] {
        let mut d = def(&step(on_error));
        d.id = id.into();
        m.create_pipeline(d).unwrap();
    }
    let err = m.execute("fail", json!({"a": 1})).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::StepFailed);
    // The steps that ran, the failed one last; the one after it never ran.
    let names: Vec<&str> = err.steps.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, ["postprocess"]);
    assert!(
        err.message
            .starts_with("step `postprocess`: no value at `missing`"),
        "{err}"
    );
    let out = m.execute("skip", json!({"a": 1})).await.unwrap();
    assert_eq!(out.output, json!({"a": 1, "after": true}));
    let out = m.execute("dflt", json!({"a": 1})).await.unwrap();
    assert_eq!(out.output, json!({"d": 1, "after": true}));
}

#[tokio::test(start_paused = true)]
async fn retries_and_timeouts_apply_per_step() {
    let m = manager();
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    m.register_transform("count", move |data, _| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(data)
    });
    m.create_pipeline(def(r#"
id = "slow"
[[steps]]
type = "preprocess"
transforms = [{ op = "custom", name = "count" }]
[[steps]]
type = "model"
model = "echo"
timeout_ms = 20
retries = 2
"#))
        .unwrap();
    let request = ExecRequest {
        request_id: "r".into(),
        data: json!(1),
        parameters: json!({"delay_ms": 200}).as_object().cloned(),
        entity: None,
        tenant: None,
    };
    let started = Instant::now();
    let err = m.execute_request("slow", request).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::ProviderTimeout, "{err}");
    // Three attempts of 20 ms each, not one of 200 ms.
    assert!(
        started.elapsed() < Duration::from_millis(190),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(
        calls.load(Ordering::SeqCst),
        1,
        "the transform step is not retried"
    );
}

/// A provider without retries of its own that fails every call with the error it was given,
/// counting calls.
struct Failing {
    error: crate::providers::ProviderError,
    calls: Arc<AtomicUsize>,
}

impl crate::providers::Provider for Failing {
    fn infer_batch(
        &self,
        _model: &str,
        inputs: Vec<crate::providers::ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<crate::providers::ProviderOutput, crate::providers::ProviderError>>>
    {
        self.calls.fetch_add(1, Ordering::SeqCst);
        let error = self.error.clone();
        Box::pin(async move { vec![Err(error); inputs.len()] })
    }
}

/// Over a provider that does not retry itself, the step owns the attempt count: a transient
/// failure is tried `1 + retries` times, one that retrying cannot fix (401, 400, a malformed
/// response) once.
#[tokio::test(start_paused = true)]
async fn steps_retry_transient_model_failures_only() {
    use crate::providers::ProviderError;
    use crate::providers::manager::ModelSpec;
    let cases = [
        (ProviderError::from_status(401, "no".into(), None), 1),
        (ProviderError::from_status(400, "too long".into(), None), 1),
        (
            ProviderError::InvalidResponse {
                message: "not JSON".into(),
            },
            1,
        ),
        (ProviderError::from_status(503, "busy".into(), None), 3),
        (
            ProviderError::Timeout {
                after: Duration::from_millis(100),
            },
            3,
        ),
    ];
    for (error, expected) in cases {
        let calls = Arc::new(AtomicUsize::new(0));
        let models = Arc::new(ModelManager::new());
        models.register_provider(
            "failing",
            Arc::new(Failing {
                error: error.clone(),
                calls: Arc::clone(&calls),
            }),
        );
        models
            .load_model(ModelSpec {
                cache: false,
                ..ModelSpec::new("m", "1", "failing", "m")
            })
            .unwrap();
        let m = PipelineManager::new(models);
        m.create_pipeline(def(
            "id = \"p\"\n[[steps]]\ntype = \"model\"\nmodel = \"m\"\nretries = 2\n",
        ))
        .unwrap();
        let err = m.execute("p", json!("x")).await.unwrap_err();
        assert_eq!(err.kind, error.kind(), "{error}");
        assert_eq!(calls.load(Ordering::SeqCst), expected, "{error}");
    }
}

#[tokio::test]
async fn chaining_and_map_run_sub_steps() {
    let m = manager();
    m.register_transform("double", |data, _| {
        data.as_f64()
            .map(|x| json!(x * 2.0))
            .ok_or_else(|| "not a number".to_owned())
    });
    m.create_pipeline(def("id = \"inner\"\n[[steps]]\ntype = \"preprocess\"\ntransforms = [{ op = \"custom\", name = \"double\" }]\n"))
        .unwrap();
    m.create_pipeline(def(r#"
id = "outer"
[[steps]]
type = "map"
over = "xs"
concurrency = 2
step = { type = "pipeline", pipeline = "inner" }
[[steps]]
type = "model"
model = "echo"
"#))
        .unwrap();
    let out = m
        .execute("outer", json!({"xs": [1, 2, 3, 4, 5]}))
        .await
        .unwrap();
    assert_eq!(out.output, json!({"xs": [2.0, 4.0, 6.0, 8.0, 10.0]}));
    let err = m
        .execute("outer", json!({"xs": [1, "x"]}))
        .await
        .unwrap_err();
    assert!(err.message.contains("element 1"), "{err}");
    let err = m.execute("outer", json!({"xs": 3})).await.unwrap_err();
    assert!(err.message.contains("expected an array at `xs`"), "{err}");
    // A cycle cannot be created.
    let cyclic = def("id = \"inner\"\n[[steps]]\ntype = \"pipeline\"\npipeline = \"outer\"\n");
    let errs = m.create_pipeline(cyclic).unwrap_err();
    assert!(errs.to_string().contains("cycle"), "{errs}");
    // ... and the old `inner` still runs.
    assert_eq!(
        m.execute("inner", json!(2)).await.unwrap().output,
        json!(4.0)
    );
}

#[tokio::test]
async fn a_batch_gets_one_outcome_per_request_in_order() {
    let m = manager();
    m.create_pipeline(def("id = \"x\"\n[[steps]]\ntype = \"postprocess\"\ntransforms = [{ op = \"extract\", path = \"v\" }]\n"))
        .unwrap();
    let requests: Vec<ExecRequest> = (0..10)
        .map(|i| ExecRequest {
            request_id: format!("r{i}"),
            data: if i % 3 == 0 {
                json!({})
            } else {
                json!({"v": i})
            },
            parameters: None,
            entity: None,
            tenant: None,
        })
        .collect();
    let out = m.execute_batch("x", requests).await;
    assert_eq!(out.len(), 10);
    for (i, o) in out.iter().enumerate() {
        if i % 3 == 0 {
            assert!(o.is_err());
        } else {
            assert_eq!(o.as_ref().unwrap().output, Value::from(i));
        }
    }
    let unknown = m.execute_batch("nope", vec![]).await;
    assert!(unknown.is_empty());
    let err = m.execute("nope", json!(1)).await.unwrap_err();
    assert_eq!(err.kind, ErrorKind::UnknownPipeline);
}

#[tokio::test]
async fn the_executor_serves_pipelines_models_and_the_builtin_identity() {
    let m = Arc::new(manager());
    m.create_pipeline(def(
        "id = \"up\"\n[[steps]]\ntype = \"preprocess\"\ntransforms = [{ op = \"lowercase\" }]\n",
    ))
    .unwrap();
    let ex = PipelineExecutor::new(Arc::clone(&m));
    let req = |d: Value| ExecRequest {
        request_id: "r".into(),
        data: d,
        parameters: None,
        entity: None,
        tenant: None,
    };
    let out = ex
        .execute(&Target::Pipeline("up".into()), vec![req(json!("AB"))])
        .await;
    assert_eq!(out[0].as_ref().unwrap().output, json!("ab"));
    let out = ex
        .execute(&Target::Pipeline("identity".into()), vec![req(json!(7))])
        .await;
    assert_eq!(out[0].as_ref().unwrap().output, json!(7));
    let out = ex
        .execute(&Target::Model("echo@1".into()), vec![req(json!(8))])
        .await;
    assert_eq!(out[0].as_ref().unwrap().output, json!(8));
    let out = ex
        .execute(&Target::Model("gpt".into()), vec![req(json!(8))])
        .await;
    assert_eq!(out[0].as_ref().unwrap_err().kind, ErrorKind::UnknownModel);
}

#[tokio::test]
async fn replace_all_is_atomic() {
    let m = manager();
    m.create_pipeline(def(
        "id = \"a\"\n[[steps]]\ntype = \"preprocess\"\ntransforms = [{ op = \"trim\" }]\n",
    ))
    .unwrap();
    let good =
        def("id = \"b\"\n[[steps]]\ntype = \"preprocess\"\ntransforms = [{ op = \"trim\" }]\n");
    let bad = def("id = \"c\"\n[[steps]]\ntype = \"model\"\nmodel = \"missing\"\n");
    let errs = m.replace_all(None, vec![good.clone(), bad]).unwrap_err();
    assert!(
        errs.to_string().contains("pipelines.c.steps[0].model"),
        "{errs}"
    );
    assert_eq!(m.pipeline_ids(), ["a"]);
    m.replace_all(None, vec![good]).unwrap();
    assert_eq!(m.pipeline_ids(), ["b"]);
}

#[tokio::test]
async fn a_skipped_step_leaves_the_data_as_it_was_before_the_step() {
    // The first transform succeeds, the second fails: with `skip`, nothing of the step stays.
    let m = manager();
    let mut d = def(
        "[[steps]]\ntype = \"preprocess\"\ntransforms = [{ op = \"set\", field = \"half\", value = true }, { op = \"extract\", path = \"missing\" }]\non_error = \"skip\"\nrecord_output = true\n",
    );
    d.id = "half".into();
    m.create_pipeline(d).unwrap();
    let out = m.execute("half", json!({"a": 1})).await.unwrap();
    assert_eq!(out.output, json!({"a": 1}));
    assert_eq!(out.steps[0].output, Some(json!({"a": 1})));
}

/// A provider that answers each input with itself and records the size of every call.
struct Recording {
    sizes: Arc<std::sync::Mutex<Vec<usize>>>,
}

impl crate::providers::Provider for Recording {
    fn infer_batch(
        &self,
        _model: &str,
        inputs: Vec<crate::providers::ProviderInput>,
    ) -> BoxFuture<'_, Vec<Result<crate::providers::ProviderOutput, crate::providers::ProviderError>>>
    {
        self.sizes.lock().unwrap().push(inputs.len());
        Box::pin(async move {
            inputs
                .into_iter()
                .map(|input| Ok(crate::providers::ProviderOutput::new(input.data)))
                .collect()
        })
    }
}

/// `[batch] max_records` splits a pipeline's share of a batch into chunks no larger than it,
/// for every model call, and the outcomes stay in the requests' order; without it the whole
/// batch is one call.
#[tokio::test]
async fn batch_max_records_bounds_every_model_call() {
    use crate::providers::manager::ModelSpec;
    let sizes = Arc::new(std::sync::Mutex::new(Vec::new()));
    let models = Arc::new(ModelManager::new());
    models.register_provider(
        "recording",
        Arc::new(Recording {
            sizes: Arc::clone(&sizes),
        }),
    );
    models
        .load_model(ModelSpec {
            cache: false,
            ..ModelSpec::new("m", "1", "recording", "m")
        })
        .unwrap();
    let m = PipelineManager::new(models);
    let steps = "[[steps]]\ntype = \"model\"\nmodel = \"m\"\n";
    m.create_pipeline(def(&format!(
        "id = \"limited\"\n[batch]\nmax_records = 3\n{steps}"
    )))
    .unwrap();
    m.create_pipeline(def(&format!("id = \"whole\"\n{steps}")))
        .unwrap();
    let requests = || {
        (0..8)
            .map(|i| ExecRequest {
                request_id: format!("r{i}"),
                data: json!({ "i": i }),
                parameters: None,
                entity: None,
                tenant: None,
            })
            .collect::<Vec<_>>()
    };
    let outputs: Vec<Value> = m
        .execute_batch("limited", requests())
        .await
        .into_iter()
        .map(|r| r.unwrap().output)
        .collect();
    let expected: Vec<Value> = (0..8).map(|i| json!({ "i": i })).collect();
    assert_eq!(outputs, expected);
    let mut limited = std::mem::take(&mut *sizes.lock().unwrap());
    limited.sort_unstable();
    assert_eq!(limited, [2, 3, 3]);
    m.execute_batch("whole", requests()).await;
    assert_eq!(*sizes.lock().unwrap(), [8]);
}

#[test]
fn batch_max_records_must_be_positive_and_batch_knows_its_keys() {
    let zero = def::parse(
        "[batch]\nmax_records = 0\n[[steps]]\ntype = \"model\"\nmodel = \"echo\"\n",
        "p",
        "test",
    )
    .unwrap_err();
    assert!(zero[0].path == "pipelines.p.batch.max_records", "{zero:?}");
    let unknown = def::parse(
        "[batch]\nlinger_ms = 5\n[[steps]]\ntype = \"model\"\nmodel = \"echo\"\n",
        "p",
        "test",
    )
    .unwrap_err();
    assert!(
        unknown[0].path.starts_with("pipelines.p.batch"),
        "{unknown:?}"
    );
}
