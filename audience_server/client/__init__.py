"""The Python client of an Audience Server, and the client commands of ``audience-server``.

    from audience_server.client import upload, status
    result = upload(users, name="High Value Customers Q1", url="http://127.0.0.1:8000")

It imports no server code (only the shared ``states`` and ``retry``): a machine that uploads
needs neither the database nor the web stack. Its rooms: ``http`` (the API, retries),
``readers`` (CSV, NDJSON, JSON arrays as streams), ``spool`` (one-pass input made
re-readable), ``state`` (the resume file), ``progress``, ``session`` (the upload itself),
``commands`` (``upload``, ``status``, ``sessions``), ``errors`` (what stops an upload).
"""

from .errors import InputError, Rejected, SessionFailed, Unreachable, UploadError
from .http import AudienceClient
from .session import Plan, UploadResult, status, upload, wait

__all__ = [
    "AudienceClient",
    "InputError",
    "Plan",
    "Rejected",
    "SessionFailed",
    "Unreachable",
    "UploadError",
    "UploadResult",
    "status",
    "upload",
    "wait",
]
