"""Domain errors the routes raise. `app.api.errors` maps each to an HTTP answer (one place).

ServiceError
├── BadRequest          a request the service refuses outright          400 (a key in the URL)
├── Unauthorized        no or wrong bearer key                          401
├── NotFound            unknown id, or one that belongs to another key  404
├── Conflict            the resource's state forbids the action         409
├── Invalid             a well-formed request the service cannot use    422 (names the field)
├── TooLarge            an upload over the cap                          413
├── TooManyJobs         the key has its limit of active jobs            429 (Retry-After)
└── Unavailable         Redis or the queue cannot be reached            503
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = [
    "BadRequest",
    "Conflict",
    "Invalid",
    "NotFound",
    "ServiceError",
    "TooLarge",
    "TooManyJobs",
    "Unauthorized",
    "Unavailable",
]


class ServiceError(Exception):
    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(ServiceError):
    pass


class Unauthorized(ServiceError):
    pass


class NotFound(ServiceError):
    pass


class Conflict(ServiceError):
    def __init__(self, message: str, state: str | None = None) -> None:
        super().__init__(message)
        self.state = state


class Invalid(ServiceError):
    """`loc` is the field path in the request, as in FastAPI's own 422 answers."""

    def __init__(self, message: str, loc: Sequence[str | int], type_: str = "value_error") -> None:
        super().__init__(message)
        self.loc = list(loc)
        self.type = type_


class TooLarge(ServiceError):
    pass


class TooManyJobs(ServiceError):
    """A per-key limit was reached; `retry_after` (seconds) goes into the Retry-After header."""

    def __init__(self, message: str, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Unavailable(ServiceError):
    pass
