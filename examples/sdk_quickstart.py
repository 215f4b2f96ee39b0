"""Azure ML's "deploy machine learning models" workflow in Python, run against an edgepack hub.

Written the way Azure ML's v1 documentation writes it (register the model, an environment and
an inference configuration, a deployment configuration, deploy, wait, state, test the web
service, its logs, delete); only the imports and the workspace line differ. The workspace line
also says which devices a deployment goes to: Azure deploys to a compute target, edgepack to
the devices whose tags match.

Run it from ``examples/digits`` once the model is trained, with a hub you logged in to
(``edgepack login``), your signing key (``edgepack keygen``) trusted by the hub, and a device
tagged ``site=berlin`` whose agent runs the process runtime (see the README's quick start)::

    cd examples/digits && python train.py && python ../sdk_quickstart.py
"""

import json

# Azure ML: from azureml.core import Workspace
#           from azureml.core.environment import Environment
#           from azureml.core.model import InferenceConfig, Model
#           from azureml.core.webservice import LocalWebservice
from edgepack import Environment, Hub, InferenceConfig, LocalWebservice, Model, Selector

# Azure ML: ws = Workspace.from_config(path=".file-path/ws_config.json")
ws = Hub.from_config(target=Selector("site=berlin"))

# Register the model
model = Model.register(workspace = ws,
                       model_path ="model/digits.onnx",
                       model_name = "digits",
                       tags = {"onnx": "demo"},
                       description = "Handwritten digit classifier (scikit-learn digits, ONNX)",)
print(model.name, model.id, model.version, sep='\t')

# Define an inference configuration
env = Environment.get(ws, "AzureML-Minimal").clone("digits-env")

for pip_package in ["onnxruntime", "numpy"]:
    env.python.conda_dependencies.add_pip_package(pip_package)

inference_config = InferenceConfig(entry_script='score.py',
                                    environment=env)

# Define a deployment configuration, deploy
deployment_config = LocalWebservice.deploy_configuration(port=8890)
service = Model.deploy(ws, "myservice", [model], inference_config, deployment_config)
service.wait_for_deployment(show_output = True)
print(service.state)

# Test the resulting web service
with open("model/test_samples.json") as f:
    samples = json.load(f)
input_data = json.dumps({"data": samples["data"][:5]})
print(service.run(input_data))
print(service.get_logs())

# Delete resources
service.delete()
model.delete()
