"""loopline.app.task_ids: bulk ids in ``str(uuid.uuid4())``'s exact format, all distinct."""

from __future__ import annotations

import re
import uuid

from loopline.app.task_ids import uuid4_strings

UUID4 = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")


def test_ids_are_version_4_uuids_as_str_uuid4_writes_them() -> None:
    ids = uuid4_strings(20_000)
    assert len(ids) == 20_000 and len(set(ids)) == 20_000
    for text in ids:
        parsed = uuid.UUID(text)
        assert str(parsed) == text and parsed.version == 4 and parsed.variant == uuid.RFC_4122
        assert UUID4.fullmatch(text)
    assert UUID4.fullmatch(str(uuid.uuid4()))  # the same pattern holds for the stdlib's


def test_every_variant_digit_occurs() -> None:
    assert {text[19] for text in uuid4_strings(2_000)} == set("89ab")


def test_none_asked_none_given() -> None:
    assert uuid4_strings(0) == []
