"""Entry script: init() runs once when the service starts, run() once per request.

Written the Azure ML way, so the same file works there and on edgepack.
"""

import json
import os

import numpy as np
import onnxruntime as ort

session = None


def init():
    global session
    model_dir = os.getenv("AZUREML_MODEL_DIR") or os.getenv("EDGEPACK_MODEL_DIR")
    # Replace with your model's file name.
    session = ort.InferenceSession(os.path.join(model_dir, "model.onnx"))


def run(raw_data):
    data = np.asarray(json.loads(raw_data)["data"], dtype=np.float32)
    inputs = {session.get_inputs()[0].name: data}
    outputs = session.run(None, inputs)
    return outputs[0].tolist()
