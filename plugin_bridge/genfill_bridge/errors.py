"""What can go wrong in a plug-in, in words a painter can act on.

Every message says what happened and what to do; ``code`` is stable for scripts and tests.
An error code from the server that this bridge does not know (a newer server's) raises the
root ``BridgeError`` with the server's message and code::

    BridgeError
    ├── ServerNotRunning      no server at the url, or no state file (code "server_not_running")
    ├── TokenRejected         the server refused the token (code "token_rejected")
    ├── ConnectionLost        the server went away during a job (code "connection_lost")
    ├── ServerTimeout         the server did not answer or finish in time (code "timeout")
    ├── ProtocolMismatch      plug-in and server speak different versions (code "protocol_mismatch")
    ├── DocumentError         the document cannot be filled as it is
    │   ├── NoSelection       (code "no_selection")
    │   └── UnsupportedDocument   colour model or depth (code "unsupported_document")
    ├── JobFailed             the server answered with an error; ``code`` is the server's code
    └── JobCancelled          (code "cancelled")
"""

from __future__ import annotations


class BridgeError(Exception):
    code = "bridge_error"

    def __init__(self, message: str, code: str | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self)


class ServerNotRunning(BridgeError):
    code = "server_not_running"


class TokenRejected(BridgeError):
    code = "token_rejected"


class ConnectionLost(BridgeError):
    code = "connection_lost"


class ServerTimeout(BridgeError):
    code = "timeout"


class ProtocolMismatch(BridgeError):
    code = "protocol_mismatch"


class DocumentError(BridgeError):
    code = "document_error"


class NoSelection(DocumentError):
    code = "no_selection"


class UnsupportedDocument(DocumentError):
    code = "unsupported_document"


class JobFailed(BridgeError):
    code = "job_failed"


class JobCancelled(BridgeError):
    code = "cancelled"
