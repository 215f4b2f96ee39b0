# The digits entry script written with inference_schema decorators, as Azure ML documents it:
# the server passes run() the "data" field of the request's JSON object, the decorator turns
# it into a float32 numpy array, and the swagger document (GET /swagger.json) shows the input
# and output schemas with these examples.
import logging
import os

import numpy as np
import onnxruntime
from inference_schema.parameter_types.numpy_parameter_type import NumpyParameterType
from inference_schema.parameter_types.standard_py_parameter_type import (
    StandardPythonParameterType,
)
from inference_schema.schema_decorators import input_schema, output_schema

session = None
input_name = None

# One 8x8 image, flattened: the input example shown in the swagger document.
INPUT_EXAMPLE = np.array(
    [[0, 0, 5, 13, 9, 1, 0, 0, 0, 0, 13, 15, 10, 15, 5, 0, 0, 3, 15, 2, 0, 11, 8, 0,
      0, 4, 12, 0, 0, 8, 8, 0, 0, 5, 8, 0, 0, 9, 8, 0, 0, 4, 11, 0, 1, 12, 7, 0,
      0, 2, 14, 5, 10, 12, 0, 0, 0, 0, 6, 13, 10, 0, 0, 0]],
    dtype=np.float32,
)  # fmt: skip
OUTPUT_EXAMPLE = {"predictions": [0], "confidence": [0.9987]}


def init():
    global session, input_name
    model_path = os.path.join(os.getenv("AZUREML_MODEL_DIR"), "digits.onnx")
    session = onnxruntime.InferenceSession(model_path, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    logging.info("model loaded from %s", model_path)


@input_schema("data", NumpyParameterType(INPUT_EXAMPLE))
@output_schema(StandardPythonParameterType(OUTPUT_EXAMPLE))
def run(data):
    labels, probabilities = session.run(None, {input_name: data.reshape(-1, 64)})
    return {
        "predictions": labels.tolist(),
        "confidence": probabilities.max(axis=1).round(4).tolist(),
    }
