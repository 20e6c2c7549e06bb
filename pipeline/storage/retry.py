"""One retry policy for every storage call of the job: on the driver and in every task and actor.

Each client retries a failed *request* a few times on its own (botocore's retry mode, as configured in
`storage_options.config_kwargs.retries`, covers throttling, 5xx and dropped connections within a second or
so). `Retry` spans longer outages: it repeats a whole *operation* (a read, a PUT, a listing, loading the
checkpoint) on transient errors, with exponential back-off and full jitter, until its time budget
(`storage.retry_s`) is spent, then raises `StorageUnavailable` naming the URI. Permanent errors (not found,
access denied, a bad request) are raised at once.
"""

from __future__ import annotations

import errno
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

T = TypeVar("T")

DEFAULT_RETRY_S = 300.0
_TRANSIENT_ERRNOS = frozenset(
    {
        errno.EIO,
        errno.EAGAIN,
        errno.EPIPE,
        errno.ETIMEDOUT,
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EHOSTDOWN,
    }
)
# by name, so that no client library need be installed: builtins, botocore, aiohttp, fsspec
_TRANSIENT_TYPES = frozenset(
    {
        "ConnectionError",
        "TimeoutError",
        "HTTPClientError",
        "ClientConnectionError",
        "ClientPayloadError",
        "FSTimeoutError",
        "IncompleteRead",
        "ResponseParserError",
    }
)
_THROTTLING_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestLimitExceeded",
        "TooManyRequests",
        "RequestTimeout",
        "ServiceUnavailable",
        "InternalError",
    }
)


class StorageUnavailable(Exception):
    """Storage kept failing with transient errors for the whole retry budget."""

    def __init__(self, uri: str, budget_s: float, cause: str) -> None:
        super().__init__(uri, budget_s, cause)
        self.uri, self.budget_s, self.cause = uri, budget_s, cause

    def __str__(self) -> str:
        return f"storage unreachable for {self.budget_s:g} s (storage.retry_s) at {self.uri}: {self.cause}"


@dataclass(frozen=True)
class Retry:
    """Call an operation until it succeeds, fails for good, or `budget_s` of transient failures have passed."""

    budget_s: float = DEFAULT_RETRY_S
    first_delay_s: float = 0.25
    max_delay_s: float = 8.0

    def __call__(self, action: Callable[[], T], uri: str) -> T:
        deadline, attempt = self.deadline(), 0
        while True:
            try:
                return action()
            except Exception as error:
                self.wait(error, attempt, deadline, uri)
                attempt += 1

    def deadline(self) -> float:
        """When the budget of retries starting now runs out (`time.monotonic()`)."""
        return time.monotonic() + self.budget_s

    def wait(self, error: Exception, attempt: int, deadline: float, uri: str) -> None:
        """After failed attempt number `attempt` (0-based): raise `error` if it is permanent, `StorageUnavailable`
        if the next try would start past `deadline`, else sleep until then."""
        if not is_transient(error):
            raise error
        delay = random.uniform(0.0, min(self.max_delay_s, self.first_delay_s * 2**attempt))
        if time.monotonic() + delay > deadline:
            raise StorageUnavailable(uri, self.budget_s, describe(error)) from None
        time.sleep(delay)


def is_transient(error: BaseException) -> bool:
    """A storage error worth retrying: the store unreachable, slow, throttling or failing on its side."""
    if any(kind.__name__ in _TRANSIENT_TYPES for kind in type(error).__mro__):
        return True
    response = getattr(error, "response", None)  # botocore's ClientError: the store answered with an error
    if isinstance(response, dict) and "Error" in response:
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0)
        return status >= 500 or status == 429 or response["Error"].get("Code") in _THROTTLING_CODES
    if isinstance(error, OSError) and error.errno in _TRANSIENT_ERRNOS:
        # s3fs turns a ClientError it does not know into OSError(EIO): its cause decides
        return error.__cause__ is None or is_transient(error.__cause__)
    return False


def describe(error: BaseException) -> str:
    """One line: the error's type and message."""
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


def storage_failure(error: BaseException | None) -> StorageUnavailable | None:
    """The `StorageUnavailable` behind `error`, if any: Ray passes on what a task or actor raised as the `cause` of
    its `RayTaskError` (Ray Data with `raise_original_map_exception`, as the job sets it)."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        cause = getattr(error, "cause", None)
        if isinstance(cause, StorageUnavailable):
            return cause
        if isinstance(error, StorageUnavailable):
            return error
        error = error.__cause__ or error.__context__
    return None
