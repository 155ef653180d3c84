"""client/http.py: the API client's retries, give-ups and refusals, over a mock transport."""

from __future__ import annotations

import httpx2
import pytest

from audience_server.client.errors import Rejected, Unreachable
from audience_server.client.http import AudienceClient, Batch
from audience_server.retry import RetryPolicy


def flaky(failures: int, final: int) -> tuple[httpx2.MockTransport, list[int]]:
    calls: list[int] = []

    def handle(request: httpx2.Request) -> httpx2.Response:
        calls.append(1)
        if len(calls) <= failures:
            if len(calls) == 1:
                raise httpx2.ConnectError("refused", request=request)
            return httpx2.Response(503, json={"success": False, "errors": ["busy"]})
        if final == 200:
            return httpx2.Response(200, json={"success": True})
        return httpx2.Response(final, json={"success": False, "errors": ["name differs."]})

    return httpx2.MockTransport(handle), calls


def send(client: AudienceClient) -> None:
    batch = Batch(4, 1, b'[{"email": "a@x.com"}]')
    client.send_batch(
        name="S", type="custom", session_id="s", total_batches=5, total_users=5, batch=batch
    )


def test_transient_failures_are_retried_then_given_up_and_4xx_stop() -> None:
    sleeps: list[float] = []
    policy = RetryPolicy(base=1.0, cap=4.0, max_attempts=4)
    transport, calls = flaky(3, 200)
    send(AudienceClient(transport=transport, retry=policy, sleep=sleeps.append))
    assert len(calls) == 4 and len(sleeps) == 3
    transport, calls = flaky(9, 200)
    with pytest.raises(Unreachable, match="batch 4 failed 4 times; last: 503 busy"):
        send(AudienceClient(transport=transport, retry=policy, sleep=sleeps.append))
    transport, calls = flaky(0, 409)
    with pytest.raises(Rejected, match=r"refused batch 4 with 409: name differs\.") as caught:
        send(AudienceClient(transport=transport, retry=policy, sleep=sleeps.append))
    assert (caught.value.status, caught.value.sequence, len(calls)) == (409, 4, 1)


def test_retry_after_is_honoured_and_a_missing_session_is_none() -> None:
    sleeps: list[float] = []
    answers = [httpx2.Response(429, headers={"retry-after": "7"}), httpx2.Response(404)]
    transport = httpx2.MockTransport(lambda request: answers.pop(0))
    client = AudienceClient(transport=transport, sleep=sleeps.append)
    assert client.status("nope") is None
    assert len(sleeps) == 1 and sleeps[0] >= 7.0
