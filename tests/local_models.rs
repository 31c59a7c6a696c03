//! The local provider with the models shipped in `models/`: the iris ONNX classifier checked
//! against the outputs its training script recorded, the VADER analyser checked against the
//! Python reference's scores, input errors, batching into one model run, and idle unload.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use inferflow::executor::{ExecRequest, Executor};
use inferflow::model::{ErrorKind, Target};
use inferflow::providers::manager::{ModelExecutor, ModelManager, ModelSpec};
use inferflow::providers::{
    LocalConfig, LocalModelConfig, LocalModelKind, LocalProvider, Provider, ProviderError,
    ProviderInput,
};
use serde_json::{Value, json};

fn models_dir(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("models")
        .join(name)
}

fn local() -> LocalProvider {
    let mut config = LocalConfig::default();
    config.models.insert(
        "iris".into(),
        LocalModelConfig {
            kind: LocalModelKind::Onnx,
            path: models_dir("iris"),
        },
    );
    config.models.insert(
        "vader".into(),
        LocalModelConfig {
            kind: LocalModelKind::Vader,
            path: models_dir("vader"),
        },
    );
    config.models.insert(
        "missing".into(),
        LocalModelConfig {
            kind: LocalModelKind::Onnx,
            path: models_dir("no-such-model"),
        },
    );
    LocalProvider::new(config).unwrap()
}

fn read_json(path: PathBuf) -> Value {
    serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap()
}

fn inputs(data: impl IntoIterator<Item = Value>) -> Vec<ProviderInput> {
    data.into_iter().map(ProviderInput::new).collect()
}

#[tokio::test]
async fn iris_answers_the_held_out_rows_as_recorded_in_one_model_run() {
    let provider = local();
    let expected = read_json(models_dir("iris").join("expected.json"));
    let rows = expected["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 30);
    provider.load_model("iris").await.unwrap();
    assert_eq!(provider.runs("iris"), 0, "the warm-up is not counted");

    let out = provider
        .infer_batch(
            "iris",
            inputs(rows.iter().map(|r| json!({"features": r["features"]}))),
        )
        .await;
    assert_eq!(out.len(), rows.len());
    assert_eq!(provider.runs("iris"), 1, "30 inputs, one model run");
    let mut correct = 0;
    for (row, outcome) in rows.iter().zip(out) {
        let output = outcome.unwrap().output;
        assert_eq!(output["label"], row["label"], "{row}");
        for (label, p) in row["probabilities"].as_object().unwrap() {
            let got = output["scores"][label].as_f64().unwrap();
            let want = p.as_f64().unwrap();
            assert!(
                (got - want).abs() < 1e-5,
                "{label}: {got} vs {want} for {row}"
            );
        }
        if output["label"] == row["true_label"] {
            correct += 1;
        }
    }
    // The accuracy train.py measured on the same rows (metrics.json).
    let metrics = read_json(models_dir("iris").join("metrics.json"));
    let accuracy = f64::from(correct) / rows.len() as f64;
    assert!((accuracy - metrics["test_accuracy"].as_f64().unwrap()).abs() < 1e-4);
}

#[tokio::test]
async fn iris_takes_named_features_in_any_order() {
    let provider = local();
    let named = json!({"features": {
        "petal_width_cm": 0.2, "petal_length_cm": 1.3, "sepal_width_cm": 3.0, "sepal_length_cm": 4.4
    }});
    let ordered = json!({"features": [4.4, 3.0, 1.3, 0.2]});
    let out = provider.infer_batch("iris", inputs([named, ordered])).await;
    let a = out[0].as_ref().unwrap();
    let b = out[1].as_ref().unwrap();
    assert_eq!(a.output, b.output);
    assert_eq!(a.output["label"], "setosa");
}

#[tokio::test]
async fn wrong_inputs_fail_alone_with_invalid_input() {
    let provider = local();
    let good = json!({"features": [6.1, 3.0, 4.9, 1.8]});
    let bad = [
        json!({"features": [1.0, 2.0, 3.0]}),
        json!({"features": [1.0, 2.0, 3.0, "x"]}),
        json!({"features": {"sepal_length_cm": 1.0}}),
        json!({"features": {"sepal_length_cm": 1, "sepal_width_cm": 1, "petal_length_cm": 1, "petal_width_cm": 1, "colour": 2}}),
        json!([1.0, 2.0, 3.0, 4.0]),
        json!({"features": [1.0, 2.0, 3.0, 4.0], "extra": 1}),
        json!({"features": [1e39, 2.0, 3.0, 4.0]}),
        json!("a string"),
    ];
    let mut batch = inputs(bad.iter().cloned());
    batch.insert(3, ProviderInput::new(good.clone()));
    let out = provider.infer_batch("iris", batch).await;
    assert_eq!(out.len(), bad.len() + 1);
    assert_eq!(out[3].as_ref().unwrap().output["label"], "virginica");
    for (i, outcome) in out.iter().enumerate().filter(|(i, _)| *i != 3) {
        let error = outcome.as_ref().unwrap_err();
        assert_eq!(error.kind(), ErrorKind::InvalidRequest, "{i}: {error}");
        assert!(!error.retryable());
    }
    let message = out[0].as_ref().unwrap_err().to_string();
    assert!(
        message.contains("3 values; this model takes 4"),
        "{message}"
    );
    let message = out[2].as_ref().unwrap_err().to_string();
    assert!(message.contains("`sepal_width_cm` is missing"), "{message}");

    let with_param = ProviderInput::with_parameters(good, json!({"top_k": 1}).as_object().cloned());
    let out = provider.infer_batch("iris", vec![with_param]).await;
    assert!(
        out[0]
            .as_ref()
            .unwrap_err()
            .to_string()
            .contains("unknown parameter `top_k`")
    );
}

#[tokio::test]
async fn missing_and_unknown_models_fail_clearly() {
    let provider = local();
    let error = provider.load_model("missing").await.unwrap_err();
    assert!(matches!(error, ProviderError::LocalModel { .. }), "{error}");
    assert!(error.to_string().contains("metadata.json"), "{error}");
    let out = provider.infer_batch("nope", inputs([json!("x")])).await;
    assert!(matches!(
        out[0].as_ref().unwrap_err(),
        ProviderError::UnknownModel { .. }
    ));
}

#[tokio::test]
async fn vader_matches_the_python_reference_scores() {
    let provider = local();
    let reference = read_json(models_dir("vader").join("reference.json"));
    let cases = reference["cases"].as_array().unwrap();
    assert!(cases.len() >= 50);
    let out = provider
        .infer_batch("vader", inputs(cases.iter().map(|c| c["text"].clone())))
        .await;
    let mut mismatches = Vec::new();
    for (case, outcome) in cases.iter().zip(out) {
        let output = outcome.unwrap().output;
        let pairs = [
            ("compound", &output["compound"], 1.5e-4),
            ("pos", &output["scores"]["positive"], 1.5e-3),
            ("neu", &output["scores"]["neutral"], 1.5e-3),
            ("neg", &output["scores"]["negative"], 1.5e-3),
        ];
        for (name, got, tolerance) in pairs {
            let want = case[name].as_f64().unwrap();
            let got = got.as_f64().unwrap();
            if (got - want).abs() > tolerance {
                mismatches.push(format!("{name} {got} vs {want}: {:?}", case["text"]));
            }
        }
        let compound = case["compound"].as_f64().unwrap();
        let label = if compound >= 0.05 {
            "positive"
        } else if compound <= -0.05 {
            "negative"
        } else {
            "neutral"
        };
        assert_eq!(output["label"], label, "{:?}", case["text"]);
    }
    assert!(mismatches.is_empty(), "{mismatches:#?}");
}

#[tokio::test]
async fn vader_takes_text_or_a_text_field_only() {
    let provider = local();
    let out = provider
        .infer_batch(
            "vader",
            inputs([
                json!({"text": "What a great day!"}),
                json!(42),
                json!({"txt": "x"}),
            ]),
        )
        .await;
    assert_eq!(out[0].as_ref().unwrap().output["label"], "positive");
    for bad in &out[1..] {
        assert_eq!(bad.as_ref().unwrap_err().kind(), ErrorKind::InvalidRequest);
    }
}

fn request(data: Value) -> ExecRequest {
    ExecRequest {
        request_id: "r".into(),
        data,
        parameters: None,
        entity: None,
        tenant: None,
    }
}

#[tokio::test(start_paused = true)]
async fn idle_models_are_unloaded_and_reloaded_transparently() {
    let provider = Arc::new(local());
    let manager = Arc::new(ModelManager::new());
    manager.register_provider("local", provider.clone());
    manager
        .load_model_with_warmup(
            ModelSpec {
                unload_after_idle: Some(Duration::from_secs(60)),
                cache: false,
                ..ModelSpec::new("sentiment", "1", "local", "vader")
            },
            ProviderInput::new(json!("warm up")),
        )
        .await
        .unwrap();
    assert!(provider.is_loaded("vader"));
    assert_eq!(provider.loads("vader"), 1);
    let executor = ModelExecutor::new(manager.clone());
    let target = Target::Model("sentiment".into());

    let out = executor
        .execute(&target, vec![request(json!("I love it"))])
        .await;
    assert_eq!(out[0].as_ref().unwrap().output["label"], "positive");

    // Not idle long enough yet.
    tokio::time::advance(Duration::from_secs(59)).await;
    assert!(manager.unload_idle().is_empty());
    tokio::time::advance(Duration::from_secs(2)).await;
    assert_eq!(manager.unload_idle(), vec!["sentiment@1".to_owned()]);
    assert!(!provider.is_loaded("vader"));
    assert!(manager.unload_idle().is_empty(), "already unloaded");

    // The next request loads it again and is answered as usual.
    let out = executor
        .execute(&target, vec![request(json!("I hate it"))])
        .await;
    assert_eq!(out[0].as_ref().unwrap().output["label"], "negative");
    assert!(provider.is_loaded("vader"));
    assert_eq!(provider.loads("vader"), 2);
    let stats = manager.stats("sentiment@1").unwrap();
    assert_eq!((stats.idle_unloads, stats.reloads), (1, 1));

    // The background sweeper does the same on its own.
    let sweeper = manager.spawn_idle_sweeper(Duration::from_secs(10));
    tokio::time::sleep(Duration::from_secs(75)).await;
    assert!(!provider.is_loaded("vader"));
    // admit() loads it ahead of the batch.
    executor.admit(&target, 1).await;
    assert!(provider.is_loaded("vader"));
    sweeper.abort();
}

#[tokio::test]
async fn a_model_registered_without_warm_up_is_loaded_by_admit_before_its_batch() {
    let provider = Arc::new(local());
    let manager = Arc::new(ModelManager::new());
    manager.register_provider("local", provider.clone());
    manager
        .load_model(ModelSpec::new("iris", "1", "local", "iris"))
        .unwrap();
    assert!(!provider.is_loaded("iris"));
    let executor = ModelExecutor::new(manager.clone());
    let target = Target::Model("iris".into());
    executor.admit(&target, 1).await;
    assert!(
        provider.is_loaded("iris"),
        "loaded ahead of the execute timeout"
    );
    let out = executor
        .execute(
            &target,
            vec![request(json!({"features": [5.9, 3.0, 5.1, 1.8]}))],
        )
        .await;
    assert_eq!(out[0].as_ref().unwrap().output["label"], "virginica");
    assert_eq!(provider.loads("iris"), 1);
    let stats = manager.stats("iris@1").unwrap();
    assert_eq!((stats.reloads, stats.idle_unloads), (0, 0));
}
