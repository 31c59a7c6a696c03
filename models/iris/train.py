"""Trains the iris classifier shipped in this directory and writes every file beside it.

    python3 -m venv /tmp/iris-venv
    /tmp/iris-venv/bin/pip install -r models/iris/requirements.txt
    /tmp/iris-venv/bin/python models/iris/train.py

Offline: the iris data is the copy bundled inside scikit-learn (`load_iris`), nothing is
downloaded. Deterministic: a fixed split seed and a deterministic solver (lbfgs), so running it
again writes the same files.

The model is a standardising step followed by a multinomial logistic regression. Its learned
weights are folded into one affine map and exported as a plain ONNX graph of standard operators
(MatMul, Add, Softmax; opset 13), because tract, the Rust runtime inferflow uses, does not
implement the `ai.onnx.ml` operator set that skl2onnx would emit for a LinearClassifier.

Writes:
- `iris.onnx`: input `features` float32 [N, 4], output `probabilities` float32 [N, 3].
- `metadata.json`: feature names (the order of the input columns) and label names (the order
  of the output columns), read by inferflow's local provider.
- `expected.json`: the held-out rows with their true label, the label the model predicts and
  its probabilities, computed here; `tests/local_models.rs` checks inferflow's answers against
  them.
- `metrics.json`: the accuracy on the training and held-out rows.
"""

import json
import pathlib
import sys

import numpy as np
import onnx
import sklearn
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator
from sklearn.datasets import load_iris
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.preprocessing import StandardScaler

SEED = 42
TEST_SIZE = 30
OUT = pathlib.Path(__file__).resolve().parent
PINNED = {"scikit-learn": "1.9.1", "numpy": "2.4.6", "onnx": "1.23.2"}
FEATURES = ["sepal_length_cm", "sepal_width_cm", "petal_length_cm", "petal_width_cm"]


def check_versions():
    found = {"scikit-learn": sklearn.__version__, "numpy": np.__version__, "onnx": onnx.__version__}
    if found != PINNED:
        print(f"warning: versions {found} differ from the pinned {PINNED}", file=sys.stderr)


def main():
    check_versions()
    iris = load_iris()
    x = iris.data.astype(np.float64)
    y = iris.target
    labels = [str(name) for name in iris.target_names]
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=TEST_SIZE, random_state=SEED, stratify=y
    )

    scaler = StandardScaler().fit(x_train)
    classifier = LogisticRegression(C=1.0, max_iter=1000, random_state=SEED)
    classifier.fit(scaler.transform(x_train), y_train)

    # Fold the scaler into the linear layer: ((x - mean) / scale) @ W.T + b
    # = x @ (W / scale).T + (b - (mean / scale) @ W.T).
    weights = (classifier.coef_ / scaler.scale_).T  # [4, 3]
    bias = classifier.intercept_ - (scaler.mean_ / scaler.scale_) @ classifier.coef_.T  # [3]

    graph = helper.make_graph(
        nodes=[
            helper.make_node("MatMul", ["features", "weights"], ["linear"]),
            helper.make_node("Add", ["linear", "bias"], ["logits"]),
            helper.make_node("Softmax", ["logits"], ["probabilities"], axis=1),
        ],
        name="iris_logistic_regression",
        inputs=[helper.make_tensor_value_info("features", TensorProto.FLOAT, ["N", 4])],
        outputs=[helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", 3])],
        initializer=[
            numpy_helper.from_array(weights.astype(np.float32), "weights"),
            numpy_helper.from_array(bias.astype(np.float32), "bias"),
        ],
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 13)],
        producer_name="inferflow models/iris/train.py",
        doc_string="Iris species from four measurements (cm): standardised multinomial "
        "logistic regression, scikit-learn " + sklearn.__version__,
    )
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, OUT / "iris.onnx")

    # The exported graph must agree with scikit-learn's own probabilities.
    session = ReferenceEvaluator(model)
    (graph_probs,) = session.run(None, {"features": x_test.astype(np.float32)})
    sklearn_probs = classifier.predict_proba(scaler.transform(x_test))
    max_diff = float(np.abs(graph_probs - sklearn_probs).max())
    assert max_diff < 1e-5, f"exported graph differs from scikit-learn by {max_diff}"

    train_accuracy = float(classifier.score(scaler.transform(x_train), y_train))
    test_accuracy = float((graph_probs.argmax(axis=1) == y_test).mean())

    metadata = {
        "format": "onnx",
        "model_file": "iris.onnx",
        "input": "features",
        "output": "probabilities",
        "output_kind": "probabilities",
        "feature_names": FEATURES,
        "labels": labels,
        "description": "Iris species from sepal and petal measurements in cm.",
    }
    expected = {
        "comment": "Held-out iris rows (not used in training). probabilities are the exported "
        "ONNX graph's float32 outputs, computed by onnx's reference evaluator in train.py.",
        "rows": [
            {
                "features": [float(v) for v in row],
                "true_label": labels[int(truth)],
                "label": labels[int(probs.argmax())],
                "probabilities": {label: float(p) for label, p in zip(labels, probs)},
            }
            for row, truth, probs in zip(x_test, y_test, graph_probs)
        ],
    }
    metrics = {
        "train_rows": int(len(y_train)),
        "test_rows": int(len(y_test)),
        "train_accuracy": round(train_accuracy, 4),
        "test_accuracy": round(test_accuracy, 4),
        "max_abs_difference_onnx_vs_sklearn": max_diff,
        "seed": SEED,
        "versions": {"scikit-learn": sklearn.__version__, "numpy": np.__version__, "onnx": onnx.__version__},
    }
    for name, doc in [("metadata.json", metadata), ("expected.json", expected), ("metrics.json", metrics)]:
        (OUT / name).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(metrics, indent=2))


if __name__ == "__main__":
    main()
