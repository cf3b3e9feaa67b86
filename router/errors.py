"""Errors of the router's request path, each carrying what the HTTP and gRPC fronts need to answer
it: an HTTP status, OpenAI's error ``type``/``code``/``param``, a gRPC status code, and for
overload a Retry-After. `tandem.engine.errors.InvalidRequestError` (raised by validation here and
by the tokenizer) maps to 400 / INVALID_ARGUMENT through `api_error`."""

from __future__ import annotations

import grpc

from tandem.engine.errors import InvalidRequestError
from tandem.router.types import NoReplicaError


class APIError(Exception):
    status = 500
    type = "server_error"
    grpc_code = grpc.StatusCode.INTERNAL

    def __init__(self, message: str, code: str | None = None, param: str | None = None,
                 retry_after: float | None = None):
        super().__init__(message)
        self.message, self.code, self.param, self.retry_after = message, code, param, retry_after

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, round(self.retry_after)))} if self.retry_after else {}


class BadRequest(APIError):
    status, type, grpc_code = 400, "invalid_request_error", grpc.StatusCode.INVALID_ARGUMENT


class ModelNotFound(APIError):
    status, type, grpc_code = 404, "invalid_request_error", grpc.StatusCode.NOT_FOUND

    def __init__(self, model: str):
        super().__init__(f"The model `{model}` does not exist.", code="model_not_found", param="model")


class Overloaded(APIError):
    """The admission queue is full: come back later (429)."""
    status, type, grpc_code = 429, "rate_limit_error", grpc.StatusCode.RESOURCE_EXHAUSTED


class Unavailable(APIError):
    """No replica can take the request now, or it waited too long for admission (503)."""
    status, type, grpc_code = 503, "service_unavailable", grpc.StatusCode.UNAVAILABLE


class UpstreamError(APIError):
    """A worker failed the request where the router cannot retry it (500)."""


class UpstreamTimeout(APIError):
    status, type, grpc_code = 504, "timeout", grpc.StatusCode.DEADLINE_EXCEEDED


def api_error(e: BaseException) -> APIError:
    """Any exception of the request path as the APIError the client sees."""
    if isinstance(e, APIError):
        return e
    if isinstance(e, InvalidRequestError):
        return BadRequest(e.message, code=e.code, param=e.param)
    if isinstance(e, NoReplicaError):
        return Unavailable(str(e) or "no healthy decode replica", code="no_replica", retry_after=1)
    return UpstreamError(f"internal error: {type(e).__name__}: {e}")
