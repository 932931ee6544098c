"""The pure delivery policy (backoff, Retry-After, success, batch timing, queue words)
and the event catalogue, tested exactly: no clock, no I/O."""

from __future__ import annotations

import pytest

from webhookd import policy
from webhookd.events import CURRENT, DEPRECATED, Catalogue, UnknownEvent

# 2025-11-25T16:00:00Z, the "now" every Retry-After date below is measured from.
NOW = 1764086400.0


def spec_delay(attempts: int, status: int | None, retry_after: float | None) -> float:
    """next_delay with the docs/delivery.md#retries-and-backoff defaults: 30 s, 12 doublings, then
    a day."""
    return policy.next_delay(
        attempts, status, retry_after, base=30.0, doublings=12, after_doublings=86400.0
    )


# -- backoff_delay -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("attempts", "expected"),
    [
        (1, 30.0),
        (2, 60.0),
        (3, 120.0),
        (4, 240.0),
        (5, 480.0),
        (6, 960.0),
        (7, 1920.0),
        (8, 3840.0),
        (9, 7680.0),
        (10, 15360.0),
        (11, 30720.0),
        (12, 61440.0),
        (13, 86400.0),
        (14, 86400.0),
        (1000, 86400.0),
    ],
)
def test_backoff_delay_spec_schedule(attempts: int, expected: float) -> None:
    assert policy.backoff_delay(attempts, 30.0, 12, 86400.0) == expected


@pytest.mark.parametrize("attempts", [0, -1, -100])
def test_backoff_delay_is_zero_before_any_failure(attempts: int) -> None:
    assert policy.backoff_delay(attempts, 30.0, 12, 86400.0) == 0.0


def test_backoff_delay_custom_base_and_doublings() -> None:
    delays = [policy.backoff_delay(n, 0.5, 3, 7.0) for n in range(1, 7)]
    assert delays == [0.5, 1.0, 2.0, 7.0, 7.0, 7.0]


def test_backoff_delay_without_doublings_goes_straight_to_the_daily_retry() -> None:
    assert policy.backoff_delay(1, 30.0, 0, 86400.0) == 86400.0


def test_backoff_delay_is_a_float_even_for_integer_inputs() -> None:
    delay = policy.backoff_delay(3, 2, 5, 100)
    assert delay == 8.0
    assert isinstance(delay, float)
    assert isinstance(policy.backoff_delay(9, 2, 5, 100), float)


# -- retry_after_seconds -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("120", 120.0),
        ("0", 0.0),
        (" 120 ", 120.0),  # surrounding whitespace is not part of the value
        ("86400", 86400.0),
    ],
)
def test_retry_after_delta_seconds(header: str, expected: float) -> None:
    assert policy.retry_after_seconds(header, NOW) == expected


def test_retry_after_http_date_in_the_future() -> None:
    assert policy.retry_after_seconds("Tue, 25 Nov 2025 16:02:00 GMT", NOW) == 120.0


def test_retry_after_http_date_in_the_past_means_now() -> None:
    assert policy.retry_after_seconds("Tue, 25 Nov 2025 15:02:00 GMT", NOW) == 0.0
    assert policy.retry_after_seconds("Sun, 06 Nov 1994 08:49:37 GMT", NOW) == 0.0


def test_retry_after_obsolete_rfc850_date() -> None:
    assert policy.retry_after_seconds("Tuesday, 25-Nov-25 16:00:30 GMT", NOW) == 30.0


def test_retry_after_obsolete_asctime_date() -> None:
    # RFC 9110 §5.6.7: a recipient MUST accept all three HTTP-date formats. asctime carries
    # no zone because it is GMT by definition.
    assert policy.retry_after_seconds("Tue Nov 25 16:02:00 2025", NOW) == 120.0


@pytest.mark.parametrize(
    "header",
    [
        "",
        "soon",
        "-5",  # delta-seconds has no sign
        "1.5",  # nor a fraction
        "120s",
        "Tue, 32 Nov 2025 16:02:00 GMT",
        "Tue, 25 Nov 2025 99:02:00 GMT",
    ],
)
def test_retry_after_garbage_is_ignored(header: str) -> None:
    assert policy.retry_after_seconds(header, NOW) is None


@pytest.mark.parametrize(
    "header",
    [
        "²",  # str.isdigit() says yes, float() says no
        "Tue, 25 Nov 99999999999 16:02:00 GMT",  # a year too big for datetime
    ],
)
def test_retry_after_hostile_values_are_ignored_not_raised(header: str) -> None:
    # The header comes from the tenant's endpoint: whatever it says must not raise, or the
    # failure is never recorded (no backoff, no entry in recent failures).
    assert policy.retry_after_seconds(header, NOW) is None


def test_retry_after_missing_header() -> None:
    assert policy.retry_after_seconds(None, NOW) is None


# -- next_delay ----------------------------------------------------------------------------------


@pytest.mark.parametrize("status", [429, 503])
def test_next_delay_honours_retry_after_on_429_and_503(status: int) -> None:
    assert spec_delay(1, status, 600.0) == 600.0


@pytest.mark.parametrize("status", [None, 400, 500, 502, 504])
def test_next_delay_ignores_retry_after_on_other_outcomes(status: int | None) -> None:
    assert spec_delay(1, status, 600.0) == 30.0


@pytest.mark.parametrize("status", [429, 503])
def test_next_delay_never_shorter_than_the_backoff(status: int) -> None:
    assert spec_delay(3, status, 5.0) == 120.0
    assert spec_delay(3, status, 0.0) == 120.0


def test_next_delay_caps_retry_after_at_the_daily_retry() -> None:
    assert spec_delay(1, 503, 10 * 86400.0) == 86400.0
    assert spec_delay(1, 429, float("inf")) == 86400.0
    assert policy.next_delay(2, 429, 50.0, base=1.0, doublings=3, after_doublings=20.0) == 20.0


def test_next_delay_without_retry_after_is_the_backoff() -> None:
    for attempts in range(1, 15):
        expected = policy.backoff_delay(attempts, 30.0, 12, 86400.0)
        assert spec_delay(attempts, 503, None) == expected
        assert spec_delay(attempts, 500, None) == expected


# -- is_success ----------------------------------------------------------------------------------


def test_is_success_only_listed_statuses() -> None:
    assert policy.is_success(200, (200,))
    for status in (201, 202, 204, 301, 302, 304, 400, 429, 500, 503):
        assert not policy.is_success(status, (200,)), status
    assert policy.is_success(204, (200, 202, 204))
    assert not policy.is_success(201, (200, 202, 204))
    assert policy.is_success(202, frozenset({202}))


# -- batch_due_at --------------------------------------------------------------------------------


def test_batch_due_at_full_batch_is_due_at_once() -> None:
    assert policy.batch_due_at(100, 100, NOW, 10.0) == 0.0
    assert policy.batch_due_at(250, 100, NOW, 10.0) == 0.0
    assert policy.batch_due_at(1, 1, NOW, 10.0) == 0.0


def test_batch_due_at_partial_batch_waits_for_the_oldest() -> None:
    assert policy.batch_due_at(99, 100, NOW, 10.0) == NOW + 10.0
    assert policy.batch_due_at(1, 100, NOW - 4.0, 10.0) == NOW + 6.0
    assert policy.batch_due_at(5, 10, NOW, 0.0) == NOW
    assert policy.batch_due_at(5, 10, NOW, 2.5) == NOW + 2.5


# -- classify_queue ------------------------------------------------------------------------------

HEALTHY = {"configured": True, "enabled": True, "paused": False, "waiting": 0, "attempts": 0}


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        ({}, "empty"),
        ({"waiting": 3}, "waiting"),
        ({"waiting": 3, "attempts": 2}, "stalled"),
        # attempts without anything waiting is not a stall (the head was parked meanwhile)
        ({"attempts": 2}, "empty"),
        ({"paused": True}, "paused"),
        ({"enabled": False}, "disabled"),
        ({"configured": False}, "orphaned"),
        # first match wins: orphaned > disabled > paused > stalled > waiting > empty
        (
            {"configured": False, "enabled": False, "paused": True, "waiting": 3, "attempts": 1},
            "orphaned",
        ),
        ({"configured": False, "enabled": False}, "orphaned"),
        ({"enabled": False, "paused": True, "waiting": 3, "attempts": 1}, "disabled"),
        ({"enabled": False, "paused": True}, "disabled"),
        ({"paused": True, "waiting": 3, "attempts": 1}, "paused"),
        ({"paused": True, "waiting": 3}, "paused"),
        ({"waiting": 1, "attempts": 1}, "stalled"),
        # a retry asked for ends the backoff: the attempt is due now
        ({"waiting": 3, "attempts": 2, "retry_due": True}, "waiting"),
        ({"paused": True, "waiting": 3, "attempts": 2, "retry_due": True}, "paused"),
    ],
)
def test_classify_queue(changes: dict[str, object], expected: str) -> None:
    arguments = {**HEALTHY, **changes}
    assert policy.classify_queue(**arguments) == expected  # type: ignore[arg-type]


# -- the event catalogue -------------------------------------------------------------------------


def test_catalogue_star_is_every_current_type_plus_custom_but_not_deprecated() -> None:
    catalogue = Catalogue(custom=("INVOICE_PAID", "INVOICE_VOIDED"))
    resolved = catalogue.resolve(["*"])
    assert resolved == frozenset(CURRENT) | {"INVOICE_PAID", "INVOICE_VOIDED"}
    assert not resolved & set(DEPRECATED)
    assert Catalogue().resolve(["*"]) == frozenset(CURRENT)
    assert len(CURRENT) == 13


@pytest.mark.parametrize(
    ("given", "meant"),
    [
        ("check_completed", "CHECK_COMPLETED"),  # the name, not in capitals
        ("Check-Completed", "CHECK_COMPLETED"),
        ("CHECK_COMPLETD", "CHECK_COMPLETED"),  # a typo
        ("TASK_CREATE", "TASK_CREATED"),
        ("collected_data_updated", "COLLECTED_DATA_UPDATED"),  # deprecated is still known
        ("invoice_paid", "INVOICE_PAID"),  # custom
        ("INVOICE_PAYED", "INVOICE_PAID"),
        ("ORDER_SHIPPED", None),
        ("X", None),
        ("CHECK_COMPLETED" * 20, None),
    ],
)
def test_an_unknown_event_type_near_a_known_one_is_named(given: str, meant: str | None) -> None:
    catalogue = Catalogue(custom=("INVOICE_PAID",))
    assert catalogue.near_miss(given) == meant
    assert catalogue.unknown_hint(given) == (f" (did you mean {meant}?)" if meant else "")


def test_catalogue_resolve_named_types() -> None:
    catalogue = Catalogue(custom=("INVOICE_PAID",))
    assert catalogue.resolve(["CHECK_COMPLETED", "INVOICE_PAID", "CHECK_COMPLETED"]) == {
        "CHECK_COMPLETED",
        "INVOICE_PAID",
    }
    # A deprecated type still delivers for a tenant that lists it by name.
    assert catalogue.resolve(["COLLECTED_DATA_UPDATED"]) == {"COLLECTED_DATA_UPDATED"}
    assert catalogue.resolve(["*", "PROFILE_STATUS_CHANGED"]) == frozenset(CURRENT) | {
        "INVOICE_PAID",
        "PROFILE_STATUS_CHANGED",
    }
    assert catalogue.resolve([]) == frozenset()


def test_catalogue_unknown_types_raise() -> None:
    with pytest.raises(UnknownEvent) as caught:
        Catalogue().resolve(["CHECK_COMPLETED", "INVOICE_PAID"])
    assert caught.value.args == ("INVOICE_PAID",)
    with pytest.raises(UnknownEvent):
        Catalogue().resolve(["check_completed"])
    assert isinstance(UnknownEvent("X"), ValueError)


def test_catalogue_knows_deprecated_and_custom_types() -> None:
    catalogue = Catalogue(custom=("INVOICE_PAID",))
    assert catalogue.is_known("INVOICE_PAID")
    assert catalogue.is_known("TASK_IS_COMPLETE_CHANGED")
    assert not Catalogue().is_known("INVOICE_PAID")
    assert Catalogue.is_deprecated("COLLECTION_STEPS_COMPLETED")
    assert not Catalogue.is_deprecated("COLLECTED_DATA_CHANGED")
    assert "COLLECTED_DATA_UPDATED" not in catalogue.current


def test_modernise_replaces_collected_data_updated() -> None:
    assert Catalogue.modernise(["COLLECTED_DATA_UPDATED", "CHECK_COMPLETED"]) == (
        ["COLLECTED_DATA_CHANGED", "CHECK_COMPLETED"],
        [],
    )
    # The replacement is not listed twice when the tenant already has it.
    assert Catalogue.modernise(["COLLECTED_DATA_CHANGED", "COLLECTED_DATA_UPDATED"]) == (
        ["COLLECTED_DATA_CHANGED"],
        [],
    )


def test_modernise_refuses_deprecated_types_without_replacement() -> None:
    modern, refused = Catalogue.modernise(
        [
            "PROFILE_STATUS_CHANGED",
            "TASK_CREATED",
            "TASK_IS_COMPLETE_CHANGED",
            "COLLECTION_STEPS_COMPLETED",
            "COLLECTED_DATA_UPDATED",
        ]
    )
    assert modern == ["TASK_CREATED", "COLLECTED_DATA_CHANGED"]
    assert refused == [
        "PROFILE_STATUS_CHANGED",
        "TASK_IS_COMPLETE_CHANGED",
        "COLLECTION_STEPS_COMPLETED",
    ]


def test_modernise_keeps_current_and_star_as_given() -> None:
    assert Catalogue.modernise(["*"]) == (["*"], [])
    assert Catalogue.modernise(list(CURRENT)) == (list(CURRENT), [])
