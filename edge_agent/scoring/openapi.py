"""The OpenAPI 3 document served at ``GET /swagger.json``.

Shaped like the one azureml-inference-server-http generates (``ServiceInput`` and
``ServiceOutput`` component schemas taken from ``inference_schema``'s decorators), so clients
written against an Azure ML web service find what they expect. Without decorators both
schemas are the generic ``{"type": "object", "example": {}}``, as on Azure.
"""

from __future__ import annotations

from typing import Any

GENERIC_SCHEMA: dict[str, Any] = {"type": "object", "example": {}}


def _json_content(ref: str) -> dict[str, Any]:
    return {"application/json": {"schema": {"$ref": f"#/components/schemas/{ref}"}}}


def openapi_document(
    *,
    title: str,
    version: str,
    input_schema: dict[str, Any] | None,
    output_schema: dict[str, Any] | None,
) -> dict[str, Any]:
    """Describe a scoring service whose ``/score`` takes ``input_schema`` and returns
    ``output_schema`` (``None`` means unknown: a generic object)."""
    error = {"description": "The request failed.", "content": _json_content("ErrorResponse")}
    return {
        "openapi": "3.0.3",
        "info": {
            "title": title,
            "description": f"Scoring API of the edgepack module {title}",
            "version": version,
        },
        "paths": {
            "/": {
                "get": {
                    "operationId": "ServiceHealthCheck",
                    "description": "Liveness: answers while the process runs.",
                    "responses": {
                        "200": {
                            "description": "The process is up.",
                            "content": {"text/plain": {"schema": {"type": "string", "example": "Healthy"}}},
                        }
                    },
                }
            },
            "/healthz": {
                "get": {
                    "operationId": "ServiceReadiness",
                    "description": "Readiness: 200 once init() has succeeded, 503 before.",
                    "responses": {
                        "200": {"description": "Ready to score."},
                        "503": {"description": "init() has not finished."},
                    },
                }
            },
            "/score": {
                "post": {
                    "operationId": "RunMLService",
                    "description": "Run the module's model and get the prediction output.",
                    "requestBody": {
                        "description": "The input payload for the module's run().",
                        "content": _json_content("ServiceInput"),
                    },
                    "responses": {
                        "200": {
                            "description": "The output of run().",
                            "content": _json_content("ServiceOutput"),
                        },
                        "default": error,
                    },
                }
            },
            "/metrics": {
                "get": {
                    "operationId": "Metrics",
                    "description": "Prometheus text format: requests, errors, latency.",
                    "responses": {"200": {"description": "Metrics."}},
                }
            },
        },
        "components": {
            "schemas": {
                "ServiceInput": input_schema or GENERIC_SCHEMA,
                "ServiceOutput": output_schema or GENERIC_SCHEMA,
                "ErrorResponse": {
                    "type": "object",
                    "properties": {
                        "error": {"type": "string"},
                        "type": {"type": "string"},
                    },
                },
            }
        },
    }
