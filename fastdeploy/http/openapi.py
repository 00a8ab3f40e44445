"""The OpenAPI description served at /openapi.json, shaped by the recipe's input type."""

from __future__ import annotations

from typing import Any

from fastdeploy import __version__
from fastdeploy.recipe import Recipe


def _obj(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        schema["required"] = required
    return schema


def openapi_document(recipe: Recipe) -> dict[str, Any]:
    if recipe.is_file:
        data = {"type": "object", "additionalProperties": {"type": "string", "format": "byte"},
                "description": "file name -> base64 content"}
        prediction: dict[str, Any] = {"type": "object", "description": "keyed by the request's file names"}
    else:
        data = {"type": "array", "items": {}, "description": "inputs, any JSON values"}
        prediction = {"type": "array", "items": {}, "description": "one output per input, in order"}
    priority = {"type": "integer", "minimum": 0, "maximum": 9}
    failure = _obj({"success": {"type": "boolean", "enum": [False]}, "reason": {"type": "string"}}, ["success", "reason"])
    result = _obj({
        "unique_id": {"type": "string"},
        "status": {"type": "string", "enum": ["queued", "processing", "done", "failed", "cancelled", "not_found"]},
        "success": {"type": ["boolean", "null"]},
        "prediction": prediction,
        "reason": {"type": "string"},
    }, ["unique_id", "status", "success"])

    def post(summary: str, body: dict[str, Any], ok: dict[str, Any], codes: list[str]) -> dict[str, Any]:
        responses = {"200": {"description": "ok", "content": {"application/json": {"schema": ok}}}}
        for code in codes:
            responses[code] = {"description": "failure", "content": {"application/json": {"schema": failure}}}
        return {"post": {"summary": summary, "requestBody": {"required": True, "content": {"application/json": {"schema": body}}},
                         "responses": responses}}

    def get(summary: str, codes: list[str]) -> dict[str, Any]:
        responses = {code: {"description": summary} for code in codes}
        return {"get": {"summary": summary, "responses": responses}}

    return {
        "openapi": "3.1.0",
        "info": {"title": f"fastDeploy: {recipe.name}", "version": __version__},
        "components": {"securitySchemes": {  # used when the service runs with API keys
            "bearer": {"type": "http", "scheme": "bearer"},
            "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"},
        }},
        "paths": {
            "/sync": post("Predict and wait for the result", _obj({"data": data, "priority": priority}, ["data"]),
                          _obj({"success": {"type": "boolean"}, "unique_id": {"type": "string"}, "prediction": prediction}),
                          ["400", "401", "413", "429", "500", "503", "504"]),
            "/async": post("Queue a prediction; poll /result or receive a webhook",
                           _obj({"data": data, "priority": priority, "webhook": {"type": "string", "format": "uri"}}, ["data"]),
                           _obj({"success": {"type": "boolean"}, "unique_id": {"type": "string"}}),
                           ["400", "401", "413", "429", "503"]),
            "/result": post("Read a job's status and result", _obj({"unique_id": {"type": "string"}}, ["unique_id"]),
                            result, ["400", "401", "404"]),
            "/cancel": post("Cancel a queued job, or discard the outcome of one being predicted",
                            _obj({"unique_id": {"type": "string"}}, ["unique_id"]),
                            _obj({"success": {"type": "boolean"}, "unique_id": {"type": "string"},
                                  "status": {"type": "string", "enum": ["cancelled"]}}),
                            ["400", "401", "404", "409"]),
            "/health": get("200 while the process is alive", ["200"]),
            "/ready": get("200 once every stage is loaded and serving, else 503", ["200", "503"]),
            "/meta": get("Recipe, stages, batch sizes, workers and limits", ["200"]),
            "/metrics": get("Prometheus metrics", ["200"]),
        },
    }
