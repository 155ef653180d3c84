"""The delivery benchmark's baseline: the least a delivery of a stored session must do.

It reads the session's stored batches straight from the database in sequence order
(one row at a time), unpacks and decodes each as the server does (``store.unpack_users``,
``parsing.decode_users``), and then either

- ``file``: writes every user as one NDJSON line to ``--out`` and fsyncs it once, or
- ``webhook``: POSTs chunks of ``--chunk-size`` users in the webhook provider's body shape,
  signed the same way, one after another on one keep-alive connection.

No duplicate detection, no leases, no progress records. It prints one JSON line:
``{"users": <users written or sent>, "seconds": <time after imports>}``.
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import os
import sys
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgspec
import orjson

from audience_server.cli import tune_gc
from audience_server.parsing import decode_users
from audience_server.store import unpack_users

_BATCHES = "SELECT users FROM batches WHERE tenant = %s AND session_key = %s ORDER BY sequence"


def stored_batches(database_url: str, tenant: str, session_key: str) -> Iterator[bytes | None]:
    """The stored ``users`` column of each batch, in sequence order, read one by one."""
    if database_url.startswith("sqlite:///"):
        import sqlite3

        path = database_url.removeprefix("sqlite:///")
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            rows = conn.execute(_BATCHES.replace("%s", "?"), (tenant, session_key))
            for (users,) in rows:
                yield users
        finally:
            conn.close()
        return
    import psycopg

    conninfo = database_url.replace("postgresql+psycopg://", "postgresql://", 1)
    with psycopg.connect(conninfo) as pg, pg.cursor(name="batches") as cursor:
        cursor.itersize = 1  # a server-side cursor: one batch in memory at a time
        cursor.execute(_BATCHES, (tenant, session_key))
        for (users,) in cursor:
            yield None if users is None else bytes(users)


def stored_users(database_url: str, tenant: str, session_key: str) -> Iterator[list[Any]]:
    """Each batch's users, decoded."""
    for stored in stored_batches(database_url, tenant, session_key):
        if stored is None:
            raise SystemExit("baseline: the session's users were purged")
        yield decode_users(unpack_users(stored))


def write_file(batches: Iterator[list[Any]], out: Path) -> int:
    encode = msgspec.json.Encoder().encode
    count = 0
    with out.open("wb") as handle:
        for users in batches:
            handle.write(b"".join(encode(user) + b"\n" for user in users))
            count += len(users)
        handle.flush()
        os.fsync(handle.fileno())
    return count


def chunks(batches: Iterator[list[Any]], size: int) -> Iterator[tuple[list[Any], bool]]:
    """Lists of ``size`` users (the last may be shorter), each with whether it is the last."""
    pending: list[Any] = []
    ready: list[Any] | None = None
    for users in batches:
        pending.extend(users)
        while len(pending) >= size:
            if ready is not None:
                yield ready, False
            ready, pending = pending[:size], pending[size:]
    if pending:
        if ready is not None:
            yield ready, False
        yield pending, True
    elif ready is not None:
        yield ready, True


def post_chunks(
    batches: Iterator[list[Any]],
    url: str,
    secret: bytes,
    size: int,
    meta: dict[str, str],
) -> int:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=60)
    count = 0
    try:
        for index, (users, last) in enumerate(chunks(batches, size), start=1):
            body = orjson.dumps({**meta, "chunk": {"index": index, "last": last}, "users": users})
            timestamp = int(time.time())
            mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
            headers = {
                "Content-Type": "application/json",
                "X-Audience-Signature": f"t={timestamp},v1={mac}",
            }
            conn.request("POST", parts.path or "/", body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status != 200:
                raise SystemExit(f"baseline: chunk {index}: HTTP {response.status}")
            count += len(users)
    finally:
        conn.close()
    return count


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.baseline_delivery", description=__doc__)
    parser.add_argument("mode", choices=["file", "webhook"])
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--session", required=True, help="the session's key")
    parser.add_argument("--tenant", default="default")
    parser.add_argument("--out", type=Path, help="file: the NDJSON file to write")
    parser.add_argument("--url", help="webhook: where to POST")
    parser.add_argument("--secret", default="", help="webhook: the signing key")
    parser.add_argument("--chunk-size", type=int, default=1_000, help="webhook: users per POST")
    parser.add_argument("--segment-name", default="", help="webhook: segmentName in each body")
    parser.add_argument("--name", default="", help="webhook: name in each body")
    parser.add_argument("--type", default="custom", help="webhook: type in each body")
    args = parser.parse_args(argv)
    tune_gc()  # the same collector settings as the worker: only the work differs
    started = time.perf_counter()
    batches = stored_users(args.database_url, args.tenant, args.session)
    if args.mode == "file":
        if args.out is None:
            parser.error("file needs --out")
        count = write_file(batches, args.out)
    else:
        if not args.url:
            parser.error("webhook needs --url")
        meta = {
            "segmentName": args.segment_name,
            "name": args.name,
            "type": args.type,
            "sessionId": args.session,
        }
        count = post_chunks(batches, args.url, args.secret.encode(), args.chunk_size, meta)
    seconds = time.perf_counter() - started
    sys.stdout.write(orjson.dumps({"users": count, "seconds": seconds}).decode() + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
