"""Errors the engine raises. Each names what was wrong so that servers can map it to a client
error (HTTP 400 / gRPC INVALID_ARGUMENT) without parsing messages."""

from __future__ import annotations


class TandemError(Exception):
    """Base class of every error Tandem raises on purpose."""


class InvalidRequestError(TandemError, ValueError):
    """A request the engine refuses (bad sampling parameter, prompt too long...).

    ``param`` names the offending field in OpenAI's terms (``"temperature"``, ``"prompt"``...).
    """

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ModelLoadError(TandemError):
    """The model directory cannot be loaded (missing/corrupt files, unsupported settings)."""


class UnsupportedArchitectureError(ModelLoadError):
    pass
