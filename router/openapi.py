"""The OpenAPI 3 document served at /openapi.json. Request schemas come from the field tables in
router/openai_protocol.py (what the parser accepts is what the document says); response schemas
are written out here."""

from __future__ import annotations

from tandem.router.openai_protocol import CHAT_FIELDS, COMPLETION_FIELDS


def _request_schema(fields: dict, required: list[str]) -> dict:
    props = {}
    for name, (types, desc) in fields.items():
        nullable = "null" in types
        alts = [{"type": t} for t in types if t != "null"]
        s = alts[0] if len(alts) == 1 else {"oneOf": alts}
        props[name] = {**s, "description": desc, **({"nullable": True} if nullable else {})}
    return {"type": "object", "properties": props, "required": required, "additionalProperties": False}


def _ref(name: str) -> dict:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict, desc: str) -> dict:
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


ERRORS = {
    "400": _json(_ref("Error"), "Invalid request (validation, malformed JSON, context length exceeded)"),
    "404": _json(_ref("Error"), "Unknown model"),
    "429": _json(_ref("Error"), "Admission queue full (Retry-After)"),
    "500": _json(_ref("Error"), "A worker failed the request"),
    "503": _json(_ref("Error"), "No healthy decode replica, or admission timed out (Retry-After)"),
}


def _generation(op: str, summary: str, req: str, resp: str, chunk: str) -> dict:
    return {"post": {
        "operationId": op, "summary": summary,
        "requestBody": {"required": True, "content": {"application/json": {"schema": _ref(req)}}},
        "responses": {"200": {"description": "The answer; with stream=true, Server-Sent Events of "
                                             f"{chunk} objects ending in `data: [DONE]`",
                              "content": {"application/json": {"schema": _ref(resp)},
                                          "text/event-stream": {"schema": {"type": "string"}}}},
                      **ERRORS}}}


USAGE = {"type": "object", "properties": {
    "prompt_tokens": {"type": "integer"}, "completion_tokens": {"type": "integer"},
    "total_tokens": {"type": "integer"},
    "prompt_tokens_details": {"type": "object", "properties": {"cached_tokens": {"type": "integer"}}}}}
FINISH = {"type": "string", "enum": ["stop", "length", "abort"], "nullable": True}


def openapi_document(version: str = "0.1.0") -> dict:
    completion_choice = {"type": "object", "properties": {
        "index": {"type": "integer"}, "text": {"type": "string"}, "finish_reason": FINISH,
        "logprobs": {"type": "object", "nullable": True, "properties": {
            "tokens": {"type": "array", "items": {"type": "string"}},
            "token_logprobs": {"type": "array", "items": {"type": "number"}},
            "top_logprobs": {"type": "array", "items": {"type": "object",
                                                       "additionalProperties": {"type": "number"}}},
            "text_offset": {"type": "array", "items": {"type": "integer"}}}}}}
    token_lp = {"type": "object", "properties": {
        "token": {"type": "string"}, "logprob": {"type": "number"},
        "bytes": {"type": "array", "items": {"type": "integer"}}}}
    chat_choice = {"type": "object", "properties": {
        "index": {"type": "integer"}, "finish_reason": FINISH,
        "message": {"type": "object", "properties": {"role": {"type": "string"},
                                                     "content": {"type": "string"}}},
        "logprobs": {"type": "object", "nullable": True, "properties": {"content": {
            "type": "array", "items": {"allOf": [token_lp, {"type": "object", "properties": {
                "top_logprobs": {"type": "array", "items": token_lp}}}]}}}}}}

    def envelope(obj: str, choice: dict) -> dict:
        return {"type": "object", "properties": {
            "id": {"type": "string"}, "object": {"type": "string", "enum": [obj]},
            "created": {"type": "integer"}, "model": {"type": "string"},
            "choices": {"type": "array", "items": choice}, "usage": USAGE}}

    return {
        "openapi": "3.0.3",
        "info": {"title": "Tandem router", "version": version,
                 "description": "OpenAI-compatible API of Tandem's router (disaggregated "
                                "prefill/decode). The same requests are served over gRPC as "
                                "tandem.v1.Router on the router's gRPC port."},
        "paths": {
            "/v1/completions": _generation("createCompletion", "Text completion", "CompletionRequest",
                                           "Completion", "text_completion"),
            "/v1/chat/completions": _generation("createChatCompletion", "Chat completion",
                                                "ChatCompletionRequest", "ChatCompletion",
                                                "chat.completion.chunk"),
            "/v1/models": {"get": {"operationId": "listModels", "summary": "The served model",
                                   "responses": {"200": _json(_ref("ModelList"), "Models")}}},
            "/health": {"get": {"operationId": "health", "summary": "Liveness of the router process",
                                "responses": {"200": {"description": "Alive"}}}},
            "/ready": {"get": {"operationId": "ready", "summary": "At least one healthy decode replica",
                               "responses": {"200": {"description": "Ready"},
                                             "503": {"description": "No healthy decode replica"}}}},
            "/metrics": {"get": {"operationId": "metrics", "summary": "Prometheus metrics",
                                 "responses": {"200": {"description": "Prometheus text exposition",
                                                       "content": {"text/plain": {"schema": {"type": "string"}}}}}}},
            "/openapi.json": {"get": {"operationId": "openapi", "summary": "This document",
                                      "responses": {"200": {"description": "OpenAPI 3 document"}}}},
        },
        "components": {"schemas": {
            "CompletionRequest": _request_schema(COMPLETION_FIELDS, ["prompt"]),
            "ChatCompletionRequest": _request_schema(CHAT_FIELDS, ["messages"]),
            "Completion": envelope("text_completion", completion_choice),
            "ChatCompletion": envelope("chat.completion", chat_choice),
            "ModelList": {"type": "object", "properties": {
                "object": {"type": "string", "enum": ["list"]},
                "data": {"type": "array", "items": {"type": "object", "properties": {
                    "id": {"type": "string"}, "object": {"type": "string"},
                    "created": {"type": "integer"}, "owned_by": {"type": "string"},
                    "max_model_len": {"type": "integer"}}}}}},
            "Error": {"type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": "string", "nullable": True},
                    "code": {"type": "string", "nullable": True}}}}},
        }},
    }
