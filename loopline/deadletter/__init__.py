"""The dead-letter store and the hooks that fill it: poison jobs, exhausted retries, undecodable messages.

The worker's consumer (loopline/worker/consumer.py) and hooks.py fill it; ``loopline dlq list|show|replay|purge``
manages it (loopline/cli/dlq.py); :func:`size` gives its size.
"""

from __future__ import annotations

from loopline.deadletter.store import DeadLetter, DeadLettered, DeadLetterStore, Reason, size

__all__ = ["DeadLetter", "DeadLetterStore", "DeadLettered", "Reason", "size"]
