"""Errors the I/O tasks raise; each message says what went wrong and with which job."""

from __future__ import annotations

import redis
from kombu.exceptions import OperationalError

__all__ = ["CONNECTION_FAILURES", "BodyTooLarge", "FetchFailed", "GuardRefused", "InvalidJob", "JobTooLarge",
           "RedisUnavailable", "WebhookRejected"]

#: What a broken connection to Redis raises (as opposed to Redis refusing a command).
CONNECTION_FAILURES = (redis.ConnectionError, redis.TimeoutError, OSError)


class InvalidJob(ValueError):
    """A job's arguments are wrong; raised at ``.delay()`` where possible, else as the task's failure."""


class JobTooLarge(InvalidJob):
    """A job's serialized arguments exceed ``LOOPLINE_MAX_ARG_BYTES``."""


class FetchFailed(Exception):
    """The remote end could not be reached or answered in a way the task cannot use."""


class GuardRefused(FetchFailed):
    """The URL guard refused the address at run time (a host that resolves to a private address, a redirect to
    one); asking again will not change that. A host that does not resolve is a plain FetchFailed."""


class BodyTooLarge(FetchFailed):
    """The response body is larger than the job's ``max_bytes``."""


class WebhookRejected(Exception):
    """The receiver refused the delivery with a 4xx status that retrying cannot fix."""


class RedisUnavailable(OperationalError):
    """``.delay()`` could not reach Redis after its retries; the job was not sent.

    A kombu ``OperationalError``, so code that catches the broker's own error keeps working.
    """
