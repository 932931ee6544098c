"""Generated webhook ids: RFC 9562 version-8 UUIDs that carry the tenant's tag and the
sequence they were first given, so they are unique per tenant without being stored, and one
sent back as a producer id is known: `duplicate`, with its first sequence.

    tttttttt-tttt-8000-vsss-ssssssssssss   t: tag, v: variant 10xx, s: sequence (62 bits)

Pure functions of their inputs: the store gives ids out with them, and the service refuses
a producer id in their form that was never given out.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache


@lru_cache(maxsize=65536)
def id_tag(tenant: str) -> str:
    """48 bits naming the tenant in its generated ids."""
    return hashlib.sha256(b"webhookd-id:" + tenant.encode()).hexdigest()[:12]


def generated_id(tag: str, sequence: int) -> str:
    tail = f"{(1 << 63) | sequence:016x}"
    return f"{tag[:8]}-{tag[8:]}-8000-{tail[:4]}-{tail[4:]}"


def generated_sequence(tag: str, webhook_id: str) -> int | None:
    """The sequence a generated id of this tenant was given; None for any other id."""
    if len(webhook_id) != 36 or webhook_id[14:19] != "8000-":
        return None  # the fast refusal: most producer ids end here
    text = webhook_id.lower()
    if text[:14] != f"{tag[:8]}-{tag[8:]}-" or text[23] != "-":
        return None
    digits = text[19:23] + text[24:]
    if not _HEX.fullmatch(digits):
        return None
    value = int(digits, 16)
    return value & ((1 << 62) - 1) if value >> 62 == 0b10 else None


_HEX = re.compile(r"[0-9a-f]{16}")
