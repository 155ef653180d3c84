"""Read a form body (multipart or urlencoded) within the configured size limit."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

from python_multipart.multipart import parse_options_header
from starlette.datastructures import UploadFile
from starlette.formparsers import FormParser, MultiPartException, MultiPartParser
from starlette.requests import Request

from .errors import MalformedBody, PayloadTooLarge

FORM_TYPES = (b"multipart/form-data", b"application/x-www-form-urlencoded")


def _too_large(limit: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"The request body is over the limit of {limit} bytes.")


class _LimitedBody:
    """The request body as a stream, refused past ``limit`` bytes; keeps its last bytes so
    a truncated multipart body (no closing delimiter) can be told apart."""

    def __init__(self, request: Request[Any], limit: int) -> None:
        self.request, self.limit, self.tail = request, limit, b""

    async def stream(self) -> AsyncGenerator[bytes, None]:
        seen = 0
        async for chunk in self.request.stream():
            seen += len(chunk)
            if seen > self.limit:
                raise _too_large(self.limit)
            self.tail = (self.tail + chunk)[-1024:]
            yield chunk


async def read_form(request: Request[Any], max_body_bytes: int) -> dict[str, str]:
    """The form's fields as text (first value of each; file parts are read as UTF-8)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_body_bytes:
        raise _too_large(max_body_bytes)
    header = request.headers.get("content-type")
    if not header:
        raise MalformedBody("the Content-Type header is missing")
    content_type, _ = parse_options_header(header)
    if content_type not in FORM_TYPES:
        raise MalformedBody(
            f"Content-Type is {content_type.decode('latin-1')!s}, expected "
            "multipart/form-data or application/x-www-form-urlencoded"
        )
    body = _LimitedBody(request, max_body_bytes)
    multipart = content_type == b"multipart/form-data"
    parser: MultiPartParser | FormParser
    if multipart:
        parser = MultiPartParser(
            request.headers,
            body.stream(),
            max_files=10,
            max_fields=100,
            max_part_size=max_body_bytes,
        )
    else:
        parser = FormParser(
            request.headers, body.stream(), max_fields=100, max_part_size=max_body_bytes
        )
    try:
        form = await parser.parse()
    except MultiPartException as exc:
        raise MalformedBody(exc.message.rstrip(".")) from None
    except (ValueError, LookupError) as exc:  # e.g. an unknown charset in a part header
        raise MalformedBody(f"the form could not be parsed: {type(exc).__name__}") from None
    if multipart:
        boundary = parse_options_header(header)[1].get(b"boundary", b"")
        if b"--" + boundary + b"--" not in body.tail:
            await form.close()
            raise MalformedBody("the multipart body ends before its closing boundary")
    fields: dict[str, str] = {}
    try:
        for name, value in form.multi_items():
            if name in fields:
                continue
            if isinstance(value, UploadFile):
                data = await value.read()
                try:
                    fields[name] = data.decode("utf-8")
                except UnicodeDecodeError:
                    raise MalformedBody(f"the file part {name!r} is not UTF-8 text") from None
            else:
                fields[name] = value
    finally:
        await form.close()
    return fields
