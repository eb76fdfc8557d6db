"""Errors the engine raises, each carrying the HTTP-style code and the
parameter it concerns, so every front end (CLI, UI, API) can show the same
one-line message without knowing where it came from."""

from __future__ import annotations


def error_dict(message: str, type_: str, code: int, param: str | None = None) -> dict:
    """vLLM's nested error shape: {"error": {message, type, param, code}} (the one builder)."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class EngineError(Exception):
    """Base class: a message fit to show a user, plus an OpenAI-style code/type/param."""

    code: int = 500
    type: str = "InternalServerError"

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def to_dict(self) -> dict:
        return error_dict(self.message, self.type, self.code, self.param)


class InvalidRequestError(EngineError):
    """The request itself is wrong: bad image, too many images, prompt too long, bad sampling value."""

    code = 400
    type = "BadRequestError"


class ModelNotFoundError(EngineError):
    code = 404
    type = "NotFoundError"


class EngineBusyError(EngineError):
    """The bounded request queue is full: answer quickly instead of queueing without bound."""

    code = 503
    type = "ServiceUnavailableError"


class DeviceOutOfMemoryError(EngineError):
    code = 500
    type = "InternalServerError"


class ModelLoadError(EngineError):
    """A named model could not be found or loaded (missing folder, no network, bad files)."""

    code = 500
    type = "ModelLoadError"
