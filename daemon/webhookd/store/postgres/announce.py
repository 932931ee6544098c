"""What a commit that queues webhooks tells every instance: `NOTIFY webhookd_queued`.

The payload is `tenant last_sequence`, or `tenant last_sequence [[sequence, id, event,
accepted_at, data], …]` when the webhooks are small enough to travel with it: the owner's
worker then takes them as they are, as a single instance takes its own commits, instead of
reading them back from the table (a query per wake-up, most of what a second instance cost
per webhook). PostgreSQL refuses a payload of 8000 bytes or more; above `CARRIED_MAX` the
short form is sent and the worker reads.

Notifications arrive in commit order, and a tenant's counter stays locked until its commit,
so a tenant's announcements arrive in sequence order. The worker keeps only webhooks that
continue what it holds (`TenantWorker.enqueued`): a repeat, or one after a gap, changes
nothing but the count it knows of, and the gap is read from the table.
"""

from __future__ import annotations

from typing import Any

import orjson

from webhookd.records import Webhook

CHANNEL = "webhookd_queued"
CARRIED_MAX = 6000  # bytes of the whole payload; PostgreSQL's limit is 7999


def announcement(tenant: str, last_sequence: int, webhooks: list[Webhook]) -> str:
    """The payload for `webhooks` (consecutive, ending at `last_sequence`) of `tenant`."""
    head = f"{tenant} {last_sequence}"
    body = orjson.dumps([tuple(w) for w in webhooks])
    if len(head) + 1 + len(body) > CARRIED_MAX:
        return head
    return f"{head} {body.decode()}"


def heard(payload: str) -> tuple[str, str]:
    """The tenant an announcement is for, and the rest (for `webhooks`): cheap, for the
    instances that do not deliver that tenant."""
    tenant, _, rest = payload.partition(" ")
    return tenant, rest


def webhooks(rest: str) -> tuple[int, list[Webhook] | None]:
    """The last sequence an announcement names, and the webhooks it carries (None: read
    them)."""
    last, _, carried = rest.partition(" ")
    if not carried:
        return int(last), None
    rows: list[list[Any]] = orjson.loads(carried)
    return int(last), [Webhook(*row) for row in rows]
