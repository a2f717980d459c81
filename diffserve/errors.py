"""Error types. A `UserError` is the user's to fix: the CLI prints its one-line message and exits 2,
the server answers 4xx. Anything else is a bug or an environment failure and keeps its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base class for errors caused by user input (request, flags, checkpoint files)."""

    #: HTTP status the server answers with.
    http_status: int = 400
    #: OpenAI error "type" field.
    error_type: str = "invalid_request_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


class InvalidRequestError(UserError):
    """A generation request that fails validation (bad size, steps, prompt, ...)."""


class CheckpointError(UserError):
    """A model folder or hub id that cannot be loaded: missing files, unknown classes, bad keys."""

    http_status = 500
    error_type = "server_error"


class OutputError(UserError):
    """An output path that cannot be written."""


class CancelledError(Exception):
    """A generation stopped because its request was cancelled."""
