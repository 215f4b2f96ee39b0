# A stock Azure ML entry script: a global model loaded in init(), run(raw_data) parsing JSON.
# It runs unchanged on Azure ML and on edgepack.
import json
import logging
import os

import numpy as np
import onnxruntime

session = None
input_name = None


def init():
    global session, input_name
    # AZUREML_MODEL_DIR is the folder the model was registered into: digits.onnx lies in it.
    model_path = os.path.join(os.getenv("AZUREML_MODEL_DIR"), "digits.onnx")
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    logging.info("model loaded from %s", model_path)


def run(raw_data):
    data = np.array(json.loads(raw_data)["data"], dtype=np.float32).reshape(-1, 64)
    labels, probabilities = session.run(None, {input_name: data})
    return {
        "predictions": labels.tolist(),
        "confidence": probabilities.max(axis=1).round(4).tolist(),
    }
