"""Generated webhook ids: version-8 UUIDs that carry the tenant's tag and the sequence, so
one sent back is known for what it is."""

from __future__ import annotations

import uuid

from webhookd.ids import generated_id, generated_sequence, id_tag


def test_generated_ids_are_version_8_uuids_that_carry_tenant_and_sequence() -> None:
    tag = id_tag("acme")
    assert tag != id_tag("acme2")
    for sequence in (1, 2, 999, 2**53 + 1, 2**62 - 1):
        text = generated_id(tag, sequence)
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant, str(parsed)) == (8, uuid.RFC_4122, text)
        assert generated_sequence(tag, text) == sequence
        assert generated_sequence(tag, text.upper()) == sequence
        assert generated_sequence(id_tag("acme2"), text) is None
    for other in ("", "evt-1", str(uuid.uuid4()), generated_id(tag, 5).replace("-8000-", "-8001-")):
        assert generated_sequence(tag, other) is None
