"""Errors raised by the client."""

from __future__ import annotations

from typing import Any, Optional


class LiverecError(Exception):
    """Base class of every error this package raises."""


class ApiError(LiverecError):
    """The server answered with an error status.

    Every liverec error body has the shape ``{"error": {"code", "message", "field"}}``
    (docs/api.md): ``code`` is stable and machine-readable (``invalid_event``,
    ``rate_limited``, ``not_leader``, ...), ``field`` names the offending field when one is to
    blame (``[3].item_id`` in a batch).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        field: Optional[str] = None,
        retry_after: Optional[float] = None,
        body: Any = None,
    ) -> None:
        super().__init__(f"{status} {code}: {message}" + (f" (field {field})" if field else ""))
        #: The HTTP status.
        self.status = status
        #: The stable error code, e.g. ``invalid_event``.
        self.code = code
        #: What went wrong, for people.
        self.message = message
        #: The field to blame, when there is one.
        self.field = field
        #: Seconds the server asked to wait (``Retry-After``), on 429 and 503.
        self.retry_after = retry_after
        #: The decoded body (``None`` when it was not JSON).
        self.body = body

    @property
    def leader(self) -> Optional[dict]:
        """On ``409 not_leader`` (production mode): the instance that leads the loop."""
        if isinstance(self.body, dict):
            leader = self.body.get("leader")
            return leader if isinstance(leader, dict) else None
        return None


class StreamEnded(LiverecError):
    """A recommendation stream ended for good (the user was erased)."""

    def __init__(self, reason: str) -> None:
        super().__init__(f"the stream ended: {reason}")
        #: ``erased``.
        self.reason = reason
