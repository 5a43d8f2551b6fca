"""AdaptiveLimit: one halving per congestion event, and Retry-After in both RFC 9110 forms."""

from __future__ import annotations

import datetime as dt
import time
from email.utils import format_datetime

import pytest
from globus_sdk.transport import RetryCheckResult, RetryContext

from syncer.globus.auth import MAX_RETRY_SLEEP
from syncer.globus.globus_groups import AdaptiveLimit


class _Response:
    def __init__(self, headers: dict[str, str]) -> None:
        self.status_code, self.headers = 429, headers


class _Context:
    def __init__(self, retry_after: str | None) -> None:
        self.response = _Response({} if retry_after is None else {"Retry-After": retry_after})


def answer_429(limit: AdaptiveLimit, retry_after: str | None) -> float:
    """Feed the limit one 429 as the SDK would; return the pause it set, in seconds."""
    began = time.monotonic()
    ctx: RetryContext = _Context(retry_after)  # type: ignore[assignment]
    assert limit.retry_check(ctx) is RetryCheckResult.no_decision
    return limit._resume_at - began


def test_a_burst_of_429s_halves_the_limit_once() -> None:
    limit = AdaptiveLimit(8)
    for _ in range(8):  # the answers to the eight reads in flight, all at once
        answer_429(limit, "1")
    assert (limit.limit, limit.rate_limited) == (4, 8)


def test_a_429_during_the_pause_only_extends_it() -> None:
    limit = AdaptiveLimit(8)
    assert answer_429(limit, "2") == pytest.approx(2, abs=0.1)
    assert answer_429(limit, "1") == pytest.approx(2, abs=0.1)  # a shorter pause does not cut it short
    assert answer_429(limit, "5") == pytest.approx(5, abs=0.1)  # a longer one extends it
    assert limit.limit == 4


def test_a_429_after_the_pause_is_a_new_event() -> None:
    limit = AdaptiveLimit(8)
    limit.throttled(0.05)
    time.sleep(0.06)
    limit.throttled(0.05)
    assert limit.limit == 2


def test_retry_after_as_an_http_date() -> None:
    limit = AdaptiveLimit(8)
    soon = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=6)
    # the header has whole seconds: the pause is 5 to 6 s
    assert 4.9 <= answer_429(limit, format_datetime(soon, usegmt=True)) <= 6.1
    assert limit.limit == 4


@pytest.mark.parametrize(
    "header, seconds",
    [
        ("3", 3.0),
        (" 3 ", 3.0),
        ("3600", MAX_RETRY_SLEEP),  # capped: the SDK sleeps no longer before its retry
        ("Fri, 31 Dec 9999 23:59:59 GMT", MAX_RETRY_SLEEP),
        ("Sun, 06 Nov 1994 08:49:37 GMT", 0.0),  # already past
        ("Sun Nov  6 08:49:37 1994", 0.0),  # the obsolete asctime form, which names no zone
        ("Sunday, 06-Nov-94 08:49:37 GMT", 0.0),  # the obsolete RFC 850 form
        ("", 1.0),
        ("soon", 1.0),
        ("2.5", 1.0),  # not delay-seconds (digits only)
        ("\u00b2", 1.0),  # a digit to str.isdigit, but not to float()
        ("Sun, 31 Feb 1994 08:49:37 GMT", 1.0),
        ("Sun, 06 Nov 1994 08:49:37 99999999999999999999", 1.0),  # overflows the zone offset
    ],
)
def test_retry_after_values(header: str, seconds: float) -> None:
    assert answer_429(AdaptiveLimit(8), header) == pytest.approx(seconds, abs=0.1)


def test_no_retry_after_pauses_one_second() -> None:
    assert answer_429(AdaptiveLimit(8), None) == pytest.approx(1, abs=0.1)
