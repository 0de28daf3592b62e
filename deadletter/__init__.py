"""The dead-letter store and the hooks that fill it: poison jobs, exhausted retries, undecodable messages.

``loopline dlq list|show|replay|purge`` manages it (deadletter/cli.py); :func:`size` gives its size.
"""

from __future__ import annotations

from deadletter.store import DeadLetter, DeadLettered, DeadLetterStore, Reason, size

__all__ = ["DeadLetter", "DeadLetterStore", "DeadLettered", "Reason", "size"]
