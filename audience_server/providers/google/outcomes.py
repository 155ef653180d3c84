"""Pure: what ``GET /v1/requestStatus:retrieve`` says about one ingest request.

The answer is a ``RetrieveRequestStatusResponse`` in proto3 JSON (googleapis/googleapis
@102d9f92ac6ed649a61efd9b208e4d1de278e9bb ``google/ads/datamanager/v1/ingestion_service.proto``;
its ``RequestStatusPerDestination`` @7d4e6ae6c363b860a4856bc4e74acd8421ae27fc
``request_status_per_destination.proto``, ``ErrorInfo``/``ErrorCount`` in
``processing_errors.proto``): one status per destination of the request, each
``requestStatus`` of ``SUCCESS``, ``PARTIAL_SUCCESS``, ``FAILED``, ``PROCESSING`` or
``REQUEST_STATUS_UNKNOWN``, with ``errorInfo.errorCounts[] {recordCount, reason}`` for the
records Google refused (int64 counts come as JSON strings).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

FINAL = frozenset({"SUCCESS", "PARTIAL_SUCCESS", "FAILED"})


@dataclass(frozen=True)
class RequestOutcome:
    """One request's state: ``done`` once every destination is final; ``rejected`` records
    Google refused; ``failure`` Google's reasons when a destination FAILED."""

    done: bool
    rejected: int = 0
    failure: str | None = None


def read(answer: object) -> RequestOutcome:
    """The outcome of a retrieve answer; an answer without statuses is not done yet."""
    statuses = answer.get("requestStatusPerDestination") if isinstance(answer, dict) else None
    if not isinstance(statuses, list) or not statuses:
        return RequestOutcome(done=False)
    done = True
    rejected = 0
    failures: list[str] = []
    for item in statuses:
        if not isinstance(item, dict):
            continue
        state = item.get("requestStatus")
        if state not in FINAL:
            done = False
            continue
        counts = _error_counts(item.get("errorInfo"))
        if state == "FAILED":
            reasons = ", ".join(f"{reason}: {count}" for reason, count in counts) or "no reason"
            failures.append(reasons)
        else:
            rejected += sum(count for _, count in counts)
    return RequestOutcome(
        done=done, rejected=rejected, failure="; ".join(failures) if failures else None
    )


def _error_counts(info: Any) -> list[tuple[str, int]]:
    counts: list[tuple[str, int]] = []
    items = info.get("errorCounts") if isinstance(info, dict) else None
    for item in items if isinstance(items, list) else []:
        if not isinstance(item, dict):
            continue
        reason = item.get("reason")
        try:
            count = int(item.get("recordCount", 0))
        except (TypeError, ValueError):
            count = 0
        counts.append((reason if isinstance(reason, str) else "UNKNOWN", max(count, 0)))
    return counts
