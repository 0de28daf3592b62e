"""Task ids and delivery tags for bulk sends: ``str(uuid.uuid4())``'s format, many per ``os.urandom`` call."""

from __future__ import annotations

import os

__all__ = ["uuid4_strings"]

# A uuid4's variant field (RFC 4122: binary 10xx) is the 17th hex digit: its two high bits are fixed, the two low
# ones random, so each random digit maps onto 8, 9, a or b.
_VARIANT = {digit: "89ab"[int(digit, 16) & 3] for digit in "0123456789abcdef"}


def uuid4_strings(count: int) -> list[str]:
    """``count`` random version-4 UUIDs as ``str(uuid.uuid4())`` writes them (what kombu's ``uuid()`` returns).

    ``uuid.uuid4`` costs an ``os.urandom`` call, an int and a ``UUID`` object per id (a tenth of a bulk send);
    here one read serves all, and only the version and variant digits are overwritten, as ``uuid4`` overwrites
    those bits: 122 random bits each, the same as Celery's ids.
    """
    digits = os.urandom(16 * count).hex()
    variant = _VARIANT
    return [f"{h[:8]}-{h[8:12]}-4{h[13:16]}-{variant[h[16]]}{h[17:20]}-{h[20:32]}"
            for h in (digits[at:at + 32] for at in range(0, 32 * count, 32))]
