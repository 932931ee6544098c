"""The event catalogue: which event types exist, which are deprecated, what replaces them."""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from functools import cached_property

# As named by the reference product, in its own order.
CURRENT: tuple[str, ...] = (
    "PRODUCT_STATUS_CHANGED",
    "TASK_CREATED",
    "CHECK_COMPLETED",
    "PRODUCT_BADGE_CHANGED",
    "RISK_LEVEL_CHANGED",
    "RISK_SCORE_CHANGED",
    "TASK_STATE_CHANGED",
    "COLLECTED_DATA_CHANGED",
    "FORM_STATE_CHANGED",
    "MANUAL_ACTION_REQUIRED",
    "CUSTOMER_REQUEST_CHANGED",
    "EVENTS_CREATED",
    "EVENTS_UPDATED",
)

# Deprecated type -> its replacement (None: no replacement, just going away).
DEPRECATED: dict[str, str | None] = {
    "PROFILE_STATUS_CHANGED": None,
    "TASK_IS_COMPLETE_CHANGED": None,
    "COLLECTION_STEPS_COMPLETED": None,
    "COLLECTED_DATA_UPDATED": "COLLECTED_DATA_CHANGED",
}

ALL_EVENTS = "*"
MAX_NAME = 64
EVENT_NAME = re.compile(r"[A-Z][A-Z0-9_]{0,63}")  # for fullmatch


class UnknownEvent(ValueError):
    """An event type that is neither built in nor declared in `[events] custom`."""


@dataclass(frozen=True)
class Catalogue:
    """Built-in types plus the deployment's custom ones."""

    custom: tuple[str, ...] = ()

    @cached_property
    def current(self) -> frozenset[str]:
        """Every type a new subscription may name: built-in current plus custom."""
        return frozenset(CURRENT) | frozenset(self.custom)

    def is_known(self, event: str) -> bool:
        return event in DEPRECATED or event in self.current

    def near_miss(self, event: str) -> str | None:
        """The known type `event` was most likely meant to be, if one is close: the same
        name in capitals (`check_completed`), or one a typo away (`CHECK_COMPLETD`)."""
        if len(event) > 2 * MAX_NAME:  # no type is that long; spare difflib the work
            return None
        known = sorted(self.current | DEPRECATED.keys())
        wanted = event.strip().upper().replace("-", "_").replace(" ", "_")
        if wanted in known:
            return wanted
        close = difflib.get_close_matches(wanted, known, n=1, cutoff=0.8)
        return close[0] if close else None

    def unknown_hint(self, event: str) -> str:
        """` (did you mean X?)` for an unknown type with a near miss, else nothing."""
        match = self.near_miss(event)
        return f" (did you mean {match}?)" if match else ""

    @staticmethod
    def is_deprecated(event: str) -> bool:
        return event in DEPRECATED

    def resolve(self, events: Iterable[str]) -> frozenset[str]:
        """The set of types a subscription list covers; `*` means every current type."""
        subscribed: set[str] = set()
        for event in events:
            if event == ALL_EVENTS:
                subscribed |= self.current
            elif self.is_known(event):
                subscribed.add(event)
            else:
                raise UnknownEvent(event)
        return frozenset(subscribed)

    @staticmethod
    def modernise(events: Iterable[str]) -> tuple[list[str], list[str]]:
        """For tenants made through the API: swap replaceable deprecated types, list the rest.

        Returns (events with replacements applied, deprecated types that have no replacement).
        """
        modern: list[str] = []
        refused: list[str] = []
        for given in events:
            event = given
            if given in DEPRECATED:
                replacement = DEPRECATED[given]
                if replacement is None:
                    refused.append(given)
                    continue
                event = replacement
            if event not in modern:
                modern.append(event)
        return modern, refused
