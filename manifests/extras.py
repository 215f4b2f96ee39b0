"""Which optional part of the ``edgepack`` distribution brings which imported package.

The base install is what a device needs (the agent, the scoring server, the CLI's device and
client commands); the hub, the docker runtime and the ONNX runtime are extras
(``pyproject.toml``). A command
that reaches a package of an extra that is not installed says, in one line, which extra to
install (:func:`missing_extra_message`), instead of a traceback.
"""

from __future__ import annotations

#: import name (its top-level package) -> the extra of ``pyproject.toml`` that installs it
EXTRA_OF_IMPORT: dict[str, str] = {
    "fastapi": "hub",
    "starlette": "hub",
    "multipart": "hub",
    "python_multipart": "hub",
    "swagger_ui_bundle": "hub",
    "sqlalchemy": "hub",
    "alembic": "hub",
    "prometheus_client": "hub",
    "cloudevents": "hub",
    "standardwebhooks": "hub",
    "aiohttp": "hub",
    "pydantic_settings": "hub",
    "docker": "docker",
    "onnxruntime": "onnx",
    "numpy": "onnx",
    "psycopg": "postgres",
    "boto3": "s3",
    "botocore": "s3",
}

#: what each extra is for, said in the one-line error
PURPOSE = {
    "hub": "the hub",
    "docker": "the docker runtime and runtime images",
    "onnx": "an ONNX module run in this Python",
    "postgres": "a hub on PostgreSQL",
    "s3": "a hub's blobs in S3",
}


def extra_for(module_name: str | None) -> str | None:
    """The extra that installs ``module_name`` (a dotted import name), or None for a package
    every install has (or one that is not ours to name)."""
    if not module_name:
        return None
    return EXTRA_OF_IMPORT.get(module_name.split(".", 1)[0])


def missing_extra_message(module_name: str | None) -> str | None:
    """One line naming the extra to install for a missing ``module_name``, or None."""
    extra = extra_for(module_name)
    if extra is None:
        return None
    top = (module_name or "").split(".", 1)[0]
    return (
        f"{PURPOSE[extra]} needs the package {top!r}, which this install lacks: "
        f"pip install 'edgepack[{extra}]'"
    )
