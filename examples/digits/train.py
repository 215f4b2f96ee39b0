"""Train a digits classifier on scikit-learn's bundled data set and export it to ONNX.

Nothing is downloaded: ``load_digits`` ships with scikit-learn. Writes ``model/digits.onnx``
and ``model/test_samples.json`` (held-out inputs with scikit-learn's own predictions, used to
check that the deployed service agrees with the trained model).

    python examples/digits/train.py [--out examples/digits/model]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from skl2onnx import to_onnx
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "model")
    args = parser.parse_args()

    digits = load_digits()
    x = digits.data.astype(np.float32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, digits.target, test_size=0.2, random_state=0, stratify=digits.target
    )
    clf = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=0))
    clf.fit(x_train, y_train)
    accuracy = float(clf.score(x_test, y_test))

    onx = to_onnx(clf, x_train[:1], options={id(clf.steps[-1][1]): {"zipmap": False}},
                  target_opset=17)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "digits.onnx").write_bytes(onx.SerializeToString())
    samples = {
        "data": x_test[:50].tolist(),
        "expected": [int(v) for v in clf.predict(x_test[:50])],
        "labels": [int(v) for v in y_test[:50]],
    }
    (args.out / "test_samples.json").write_text(json.dumps(samples))
    print(json.dumps({"model": str(args.out / "digits.onnx"), "test_accuracy": round(accuracy, 4)}))


if __name__ == "__main__":
    main()
