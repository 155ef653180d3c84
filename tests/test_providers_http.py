"""The HTTP edge the adapters share (providers/http.py): excerpts that mask personal data,
statuses and ``Retry-After``, transport errors translated with their cause kept, the lazy
client; and the same edge seen through each of the five HTTP adapters."""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import time
from collections.abc import Callable
from typing import Any

import httpx2
import pytest

from audience_server.destinations import DestinationConfig
from audience_server.providers import provider_class
from audience_server.providers.base import (
    Chunk,
    DeliveryError,
    PermanentError,
    RetryableError,
    Segment,
)
from audience_server.providers.http import (
    HttpAdapter,
    excerpt,
    parse_retry_after,
    redact,
    retryable_status,
    status_error,
    transport_errors,
)
from audience_server.providers.webhook import sign, signature_problem, verify_signature

Handler = Callable[[httpx2.Request], httpx2.Response]

# -- excerpts --------------------------------------------------------------------------------


def test_excerpt_is_one_line_and_short() -> None:
    assert excerpt("  an\n\terror   body ") == "an error body"
    assert excerpt({"error": 1}) == "{'error': 1}"
    assert excerpt("x" * 200) == "x" * 200
    assert excerpt("x" * 201) == "x" * 199 + "…"
    assert excerpt("abcdef", 4) == "abc…"


def test_excerpt_masks_emails_and_phones() -> None:
    text = 'bad "jane.doe+vip@example.com" and <a@b.co>, phone +1 (415) 555-0100; +44\n20 7946 0958'
    assert excerpt(text) == 'bad "<email>" and <<email>>, phone <phone>; <phone>'
    # what is not a person's: codes, ids, digests, field paths, "@type" keys
    kept = "code 80004 fbtrace_id AbC12 request_id 2024010112 @type data[0].email 5f4dcc3b5aa7"
    assert excerpt(kept) == kept
    assert redact("call +1 415 555 0100 now") == "call <phone> now"


def test_excerpt_masks_before_cutting() -> None:
    # A cut address is still masked, not shown in part.
    assert excerpt("x" * 190 + " jane@example.com") == "x" * 190 + " <email>"
    assert "jane" not in excerpt("x" * 195 + " jane@example.com", 200)


# -- statuses --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "retryable"),
    [(400, False), (401, False), (404, False), (408, True), (429, True), (500, True), (503, True)],
)
def test_retryable_status(status: int, retryable: bool) -> None:
    assert retryable_status(status) is retryable
    error = status_error(f"HTTP {status}", status, {"retry-after": "7"})
    assert isinstance(error, RetryableError if retryable else PermanentError)
    assert (str(error), error.status) == (f"HTTP {status}", status)
    if isinstance(error, RetryableError):
        assert error.retry_after == 7.0


def test_parse_retry_after() -> None:
    now = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
    assert parse_retry_after("120", now) == 120.0
    assert parse_retry_after(" 5 ", now) == 5.0
    assert parse_retry_after("Sun, 01 Mar 2026 12:01:30 GMT", now) == 90.0
    assert parse_retry_after("Sun, 01 Mar 2026 11:00:00 GMT", now) == 0.0  # already past
    assert parse_retry_after("soon", now) is None
    assert parse_retry_after("-3", now) is None
    assert parse_retry_after("", now) is None
    assert parse_retry_after(None, now) is None


# -- transport errors ------------------------------------------------------------------------


def test_transport_errors_become_retryable_with_their_cause() -> None:
    request = httpx2.Request("GET", "http://127.0.0.1/")
    timeout = httpx2.ReadTimeout("read timed out", request=request)
    with pytest.raises(RetryableError) as caught, transport_errors("Meta", 0.5):
        raise timeout
    assert str(caught.value) == "Meta: no answer within 0.5 s"
    assert caught.value.__cause__ is timeout
    refused = httpx2.ConnectError("refused", request=request)
    with pytest.raises(RetryableError) as caught, transport_errors("Klaviyo", 30, "find list"):
        raise refused
    assert str(caught.value) == "Klaviyo: connection failed: ConnectError (find list)"
    assert caught.value.__cause__ is refused
    closed = httpx2.RemoteProtocolError("closed", request=request)
    with pytest.raises(RetryableError) as caught, transport_errors("", 30):
        raise closed
    assert str(caught.value) == "connection failed: RemoteProtocolError"  # the webhook's


def test_other_errors_pass_through() -> None:
    with pytest.raises(ValueError, match="not ours"), transport_errors("Meta", 1):
        raise ValueError("not ours")
    with pytest.raises(httpx2.InvalidURL), transport_errors("Meta", 1):
        raise httpx2.InvalidURL("a programming error, not the network's")


class Adapter(HttpAdapter):
    platform = "Test"

    def __init__(self, handler: Handler) -> None:
        self.timeout = 2.0
        self.transport = httpx2.MockTransport(handler)


def test_the_client_is_made_on_first_use_and_closed_by_aclose() -> None:
    seen: list[str] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(str(request.url))
        return httpx2.Response(204)

    async def main() -> None:
        adapter = Adapter(handler)
        await adapter.aclose()  # nothing opened yet: nothing to close
        assert (await adapter.request("GET", "http://127.0.0.1/a")).status_code == 204
        first = adapter._client
        assert first is not None
        await adapter.request("GET", "http://127.0.0.1/b")
        assert adapter._client is first  # one client, kept between requests
        await adapter.aclose()
        assert adapter._client is None and first.is_closed
        await adapter.request("GET", "http://127.0.0.1/c")  # a new one after a close
        assert adapter._client is not None and adapter._client is not first
        await adapter.aclose()

    asyncio.run(main())
    assert seen == ["http://127.0.0.1/a", "http://127.0.0.1/b", "http://127.0.0.1/c"]


def test_redirects_are_not_followed() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(302, headers={"location": "http://elsewhere.example/"})

    async def main() -> int:
        adapter = Adapter(handler)
        try:
            return (await adapter.request("GET", "http://127.0.0.1/")).status_code
        finally:
            await adapter.aclose()

    assert asyncio.run(main()) == 302


# -- the edge through each adapter -----------------------------------------------------------

BASE = "http://127.0.0.1:9"
ADAPTERS: dict[str, dict[str, Any]] = {
    "facebook": {"ad_account_id": "act_1", "access_token": "t", "base_url": BASE},
    "tiktok": {"access_token": "t", "advertiser_id": "1", "base_url": BASE},
    "klaviyo": {"api_key": "k", "base_url": BASE},
    "google": {"access_token": "t", "account_id": "1", "base_url": BASE},
    "webhook": {"url": f"{BASE}/hook", "secret": "s"},
}
ECHO = "rejected jane.doe@example.com, +1 415 555 0100"


def send_first_chunk(kind: str, handler: Handler) -> DeliveryError:
    """What one chunk to a ``kind`` destination raises when every request is ``handler``'s."""
    provider = provider_class(kind).from_config(DestinationConfig("d", kind, ADAPTERS[kind], 1))
    assert isinstance(provider, HttpAdapter)
    provider.transport = httpx2.MockTransport(handler)
    segment = Segment("d", "default", "s1", "VIP", "VIP", "custom", 1)
    chunk = Chunk(1, True, [{"email": "jane.doe@example.com", "phone": "+14155550100"}])

    async def main() -> DeliveryError:
        try:
            await provider.send(segment, chunk)
        except DeliveryError as exc:
            return exc
        finally:
            await provider.aclose()
        raise AssertionError("the chunk was accepted")

    return asyncio.run(main())


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_an_error_body_echoing_users_is_masked_in_the_reason(kind: str) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(400, text=ECHO)

    error = send_first_chunk(kind, handler)
    assert isinstance(error, PermanentError) and error.status == 400
    assert "rejected <email>, <phone>" in str(error)
    assert "example.com" not in str(error) and "555" not in str(error)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_each_adapter_keeps_the_transport_error_as_cause(kind: str) -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("refused", request=request)

    def stall(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ReadTimeout("slow", request=request)

    refused = send_first_chunk(kind, refuse)
    assert isinstance(refused, RetryableError) and "connection failed: ConnectError" in str(refused)
    assert isinstance(refused.__cause__, httpx2.ConnectError)
    stalled = send_first_chunk(kind, stall)
    assert isinstance(stalled, RetryableError) and "no answer within 30 s" in str(stalled)
    assert isinstance(stalled.__cause__, httpx2.ReadTimeout)


@pytest.mark.parametrize("kind", sorted(ADAPTERS))
def test_each_adapter_honours_retry_after_on_a_plain_503(kind: str) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(503, text="down", headers={"retry-after": "12"})

    error = send_first_chunk(kind, handler)
    assert isinstance(error, RetryableError)
    assert (error.status, error.retry_after) == (503, 12.0)


# -- the webhook signature, beside sign in the package ----------------------------------------


def test_sign_is_hmac_sha256_of_timestamp_dot_body() -> None:
    body = b'{"a":1}'
    mac = hmac.new(b"k", b"1800000000." + body, hashlib.sha256).hexdigest()
    assert sign(b"k", body, 1_800_000_000) == f"t=1800000000,v1={mac}"


def test_verify_signature_reads_the_wall_clock_when_not_given_now() -> None:
    body = b"{}"
    fresh = sign(b"k", body, int(time.time()))
    stale = sign(b"k", body, int(time.time()) - 600)
    assert verify_signature(b"k", fresh, body)
    assert not verify_signature(b"k", stale, body)
    assert verify_signature(b"k", stale, body, tolerance=900)
    now = time.time()
    assert signature_problem(b"k", stale, body, now, 300) == (
        "signature timestamp is more than 300 s from now"
    )
    assert signature_problem(b"k", None, body, now, 300) == "missing X-Audience-Signature header"
