"""Exceptions raised by the genfill SDK.

Every error the server reports carries a stable ``code`` (``genfill.protocol.ErrorCode``);
``error_for_code`` is the one place that maps codes to classes. Codes are an open set: one
this SDK does not know (a newer server's) raises the root ``GenfillError`` with the server's
message and code. The tree::

    GenfillError
    ├── InvalidInput (ValueError)    a bad argument: image file unreadable or missing, array of
    │                                the wrong dtype or shape, an option out of range; raised
    │                                before anything is sent. Also a ValueError, so
    │                                ``except ValueError`` keeps working.
    ├── Timeout (TimeoutError)       a wait passed its deadline (connect, reply, job, close)
    ├── ConnectError                 the server could not be reached or refused the handshake
    │   ├── AuthenticationError      wrong or missing token, refused origin or host
    │   └── ConnectTimeout (Timeout) no hello within the open timeout
    ├── ProtocolError                a malformed or unexpected message, either direction
    ├── LimitExceeded                over one of the server's announced limits
    ├── ConnectionClosed             the connection dropped while a call was waiting
    └── JobError                     a job did not produce a result
        ├── JobFailed                bad input for this job, or the engine failed
        ├── JobCancelled             the job was cancelled
        ├── EngineUnavailable        the engine or model asked for is not installed
        └── Unsupported              the server or engine lacks a feature, option or role asked for
"""

from __future__ import annotations

from .protocol import ErrorCode


class GenfillError(Exception):
    """Root of every genfill exception. ``code`` is a stable ``ErrorCode`` value or ``None``."""

    def __init__(self, message: str, *, code: str | None = None, job_id: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.job_id = job_id


class InvalidInput(GenfillError, ValueError):
    pass


class Timeout(GenfillError, TimeoutError):
    pass


class ConnectError(GenfillError):
    pass


class AuthenticationError(ConnectError):
    pass


class ConnectTimeout(ConnectError, Timeout):
    pass


class ProtocolError(GenfillError):
    pass


class LimitExceeded(GenfillError):
    pass


class ConnectionClosed(GenfillError):
    pass


class JobError(GenfillError):
    pass


class JobFailed(JobError):
    pass


class JobCancelled(JobError):
    pass


class EngineUnavailable(JobError):
    pass


class Unsupported(JobError):
    pass


_CLASS_BY_CODE: dict[ErrorCode, type[GenfillError]] = {
    ErrorCode.BAD_MESSAGE: ProtocolError,
    ErrorCode.UNKNOWN_IMAGE: ProtocolError,
    ErrorCode.UNKNOWN_JOB: ProtocolError,
    ErrorCode.JOB_ID_IN_USE: ProtocolError,
    ErrorCode.LIMIT_EXCEEDED: LimitExceeded,
    ErrorCode.RATE_LIMITED: LimitExceeded,
    ErrorCode.QUEUE_FULL: LimitExceeded,
    ErrorCode.IMAGE_TOO_LARGE: LimitExceeded,
    ErrorCode.IMAGE_INVALID: JobFailed,
    ErrorCode.SIZE_MISMATCH: JobFailed,
    ErrorCode.EMPTY_SELECTION: JobFailed,
    ErrorCode.INVALID_REQUEST: JobFailed,
    ErrorCode.OUT_OF_MEMORY: JobFailed,
    ErrorCode.ENGINE_FAILED: JobFailed,
    ErrorCode.SHUTTING_DOWN: ConnectionClosed,
    ErrorCode.ENGINE_UNAVAILABLE: EngineUnavailable,
    ErrorCode.MODEL_NOT_FOUND: EngineUnavailable,
    ErrorCode.WEIGHTS_NOT_INSTALLED: EngineUnavailable,
    ErrorCode.UNSUPPORTED: Unsupported,
    ErrorCode.REMOTE_AUTH_FAILED: JobFailed,
    ErrorCode.REMOTE_QUOTA_EXCEEDED: JobFailed,
    ErrorCode.MODERATED: JobFailed,
    ErrorCode.REMOTE_UNAVAILABLE: JobFailed,
    ErrorCode.REMOTE_TIMEOUT: JobFailed,
}


def error_for_code(code: str, message: str, *, job_id: str | None = None) -> GenfillError:
    """Builds the exception for a server error code; unknown codes become ``GenfillError``."""
    try:
        cls = _CLASS_BY_CODE[ErrorCode(code)]
    except ValueError:
        cls = GenfillError
    return cls(message, code=code, job_id=job_id)
