"""The state rules, without a database."""

from __future__ import annotations

import datetime as dt

import pytest

from audience_server.states import (
    DeliveryState,
    SessionState,
    effective_state,
    segment_name,
    settled_state,
)

NOW = dt.datetime(2026, 12, 1, 12, 0, tzinfo=dt.UTC)
SECOND = dt.timedelta(seconds=1)


@pytest.mark.parametrize(
    ("state", "expires_at", "seen"),
    [
        ("receiving", NOW + SECOND, SessionState.RECEIVING),
        ("receiving", NOW, SessionState.EXPIRED),  # expiry is inclusive
        ("receiving", NOW - SECOND, SessionState.EXPIRED),
        ("complete", NOW - SECOND, SessionState.COMPLETE),  # only receiving sessions expire
        ("delivered", None, SessionState.DELIVERED),
    ],
)
def test_a_receiving_session_past_its_expiry_reads_as_expired(
    state: str, expires_at: dt.datetime | None, seen: SessionState
) -> None:
    assert effective_state(state, expires_at, NOW) is seen


def test_an_unknown_state_is_an_error() -> None:
    with pytest.raises(ValueError, match="'bogus'"):
        effective_state("bogus", None, NOW)


@pytest.mark.parametrize(
    ("deliveries", "session"),
    [
        ([], SessionState.DELIVERED),  # no destination: delivered at once
        (["succeeded", "succeeded"], SessionState.DELIVERED),
        (["failed", "failed"], SessionState.FAILED),
        (["succeeded", "failed"], SessionState.PARTIALLY_DELIVERED),
        (["succeeded", "running"], SessionState.DELIVERING),
        (["pending", "failed"], SessionState.DELIVERING),
    ],
)
def test_a_session_settles_when_every_delivery_ended(
    deliveries: list[str], session: SessionState
) -> None:
    assert settled_state(deliveries) is session


def test_states_are_their_wire_strings() -> None:
    wire: str = SessionState.PARTIALLY_DELIVERED  # a state is a str, equal to its value
    assert wire == "partially_delivered"
    assert f"{DeliveryState.RUNNING}" == "running"
    assert [s.value for s in SessionState][:3] == ["receiving", "complete", "delivering"]


@pytest.mark.parametrize(
    ("name", "prefix", "disable", "expected"),
    [
        ("High Value Customers Q1", "blotout_", False, "blotout_High_Value_Customers_Q1"),
        ("High Value Customers Q1", "blotout_", True, "High Value Customers Q1"),
        ("Lapsed \t\n buyers", "", False, "Lapsed_buyers"),
        ("High Value  Customers\tQ1", "blotout_", False, "blotout_High_Value_Customers_Q1"),
        ("Ünïcode  näme", "x_", False, "x_Ünïcode_näme"),
    ],
)
def test_segment_name(name: str, prefix: str, disable: bool, expected: str) -> None:
    assert segment_name(name, prefix, disable) == expected
