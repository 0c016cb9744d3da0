"""Errors the server reports to a client: a stable code and a message without internals."""

from __future__ import annotations

from genfill.protocol import ErrorCode


class RequestError(Exception):
    """A request cannot be served; the message goes to the client as is, so it must name the
    problem in the client's terms and never carry paths, tracebacks or library internals."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
