"""The client commands of ``audience-server``: ``upload``, ``status``, ``sessions``, and the
operator's ``retry`` and ``abort``, their printing and exit codes. They read only their own
flags (and AUDIENCE_URL, AUDIENCE_API_KEY), never the server's settings; ``cli.py`` mounts
them beside the server commands."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import IO, Any

from .. import states
from ..retry import RetryPolicy
from ..states import SessionState
from .errors import InputError, Rejected, Unreachable, UploadError
from .http import DEFAULT_URL, AudienceClient
from .progress import WaitProgress
from .readers import FORMATS, Source
from .session import DEFAULT_BATCH_SIZE, Plan, upload_source, wait
from .spool import chunks_of, spool
from .state import default_state_path

EXIT_OK = 0  # every batch acknowledged; the session complete (or delivered, when waited for)
EXIT_FAILED = 1  # the server refused a batch (4xx), or the session ended badly
EXIT_USAGE = 2  # bad arguments, unreadable input, or input that differs from its state file
EXIT_UNREACHABLE = 3  # transient failures outlasted the retries: re-run the command to resume
EXIT_WAIT_TIMEOUT = 4  # uploaded, but --wait saw no progress for --wait-timeout s: not ended
EXIT_INTERRUPTED = 130  # Ctrl-C: re-run the same command to resume


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get("AUDIENCE_URL", DEFAULT_URL),
        help=f"server base URL (AUDIENCE_URL; default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("AUDIENCE_API_KEY"),
        help="bearer key when the server has API keys (AUDIENCE_API_KEY)",
    )


def _make_client(args: argparse.Namespace) -> AudienceClient:
    retry = RetryPolicy(
        base=getattr(args, "retry_base", 0.5),
        cap=30.0,
        max_attempts=getattr(args, "max_attempts", 10),
    )
    return AudienceClient(args.url, api_key=args.api_key, retry=retry)


def _cell(value: object) -> str:
    return "-" if value is None else str(value)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(row[i]) for row in [headers, *rows]) for i in range(len(headers))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        for row in [headers, *rows]
    ]
    return "\n".join(line.rstrip() for line in lines)


def _describe(status: dict[str, Any]) -> str:
    fields = [
        ("session", status["sessionId"]),
        ("name", status["name"]),
        ("type", status["type"]),
        ("state", status["state"] + (f" ({status['reason']})" if status.get("reason") else "")),
        ("batches", f"{status['receivedBatches']:,}/{status['totalBatches']:,}"),
        ("users", f"{status['receivedUsers']:,}/{status['totalUsers']:,}"),
    ]
    if status.get("assembledUsers") is not None:
        fields.append(("assembled", f"{status['assembledUsers']:,}/{status['totalUsers']:,}"))
    if status.get("uniqueUsers") is not None:
        fields.append(("unique", f"{status['uniqueUsers']:,}"))
    missing = status.get("missingSequences")
    if missing:
        shown = ", ".join(str(n) for n in missing[:20]) + (" ..." if len(missing) > 20 else "")
        fields.append(("missing", f"{len(missing)}: {shown}"))
    fields += [("created", status.get("createdAt")), ("updated", status.get("updatedAt"))]
    if status.get("expiresAt"):
        fields.append(("expires", status["expiresAt"]))
    text = "\n".join(f"{key:<9} {_cell(value)}" for key, value in fields)
    deliveries = status.get("deliveries") or []
    if deliveries:
        rows = [
            [
                d["destination"],
                d["kind"],
                d["state"],
                str(d["attempts"]),
                f"{d['usersSent']:,}",
                f"{d['invalidUsers']:,}",
                _cell(d.get("lastError")),
            ]
            for d in deliveries
        ]
        headers = ["DESTINATION", "KIND", "STATE", "ATTEMPTS", "SENT", "INVALID", "LAST ERROR"]
        text += "\n\n" + _table(rows, headers)
    return text


def _print_json(body: object) -> None:
    print(json.dumps(body, indent=2))


def _client_errors(run: Callable[[], int]) -> int:
    try:
        return run()
    except KeyboardInterrupt:
        print("audience-server: interrupted; re-run the same command to resume.", file=sys.stderr)
        return EXIT_INTERRUPTED
    except InputError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except Unreachable as exc:
        print(f"audience-server: {exc}; re-run to resume.", file=sys.stderr)
        return EXIT_UNREACHABLE
    except UploadError as exc:  # Rejected, SessionFailed
        print(f"audience-server: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:
        print(f"audience-server: {exc}", file=sys.stderr)
        return EXIT_USAGE


def _upload(args: argparse.Namespace) -> int:
    def run() -> int:
        if args.batch_size < 1 or args.concurrency < 1:
            print("audience-server: --batch-size and --concurrency must be >= 1", file=sys.stderr)
            return EXIT_USAGE
        if not args.wait_timeout > 0:  # NaN too
            print("audience-server: --wait-timeout must be > 0", file=sys.stderr)
            return EXIT_USAGE
        # The upload command's options are named as the plan's fields.
        plan = Plan(**{option.name: getattr(args, option.name) for option in fields(Plan)})
        spooled: IO[bytes] | None = None
        path: Source
        try:
            if args.file == "-":
                spooled = path = spool(chunks_of(sys.stdin.buffer))
                state_path = Path(args.state) if args.state else None
            else:
                path = Path(args.file)
                if not path.is_file():
                    print(f"audience-server: {path} is not a file", file=sys.stderr)
                    return EXIT_USAGE
                state_path = Path(args.state) if args.state else default_state_path(path)
            with _make_client(args) as client:
                result = upload_source(
                    client,
                    path,
                    plan,
                    fmt=args.format,
                    state_path=state_path,
                    progress_stream=sys.stderr,
                    progress_interval=args.progress_interval,
                )
                status = result.status
                if args.wait:
                    shown = WaitProgress(sys.stderr)
                    try:
                        status = wait(
                            client, result.session_id, args.wait_timeout, on_progress=shown.show
                        )
                    finally:
                        shown.close()
        finally:
            if spooled is not None:
                spooled.close()
        print(
            f"sent {result.sent_batches} of {result.total_batches} batches "
            f"({result.skipped_batches} the server already had)"
        )
        print(_describe(status))
        if args.sync or args.wait:
            if status["state"] not in states.ENDED:
                gave_up = (
                    f"--wait gave up after {args.wait_timeout:g} s without progress"
                    if args.wait
                    else "--sync returned"
                )
                print(
                    f"audience-server: uploaded; the deliveries had not ended when {gave_up}; "
                    f"follow with `audience-server status {result.session_id}`",
                    file=sys.stderr,
                )
                return EXIT_WAIT_TIMEOUT
            if status["state"] != SessionState.DELIVERED:
                print(f"audience-server: session ended {status['state']}", file=sys.stderr)
                return EXIT_FAILED
        return EXIT_OK

    return _client_errors(run)


def _status_command(args: argparse.Namespace) -> int:
    def run() -> int:
        with _make_client(args) as client:
            status = client.status(args.session_id)
        if status is None:
            print(f"audience-server: session {args.session_id} does not exist", file=sys.stderr)
            return EXIT_FAILED
        if args.json:
            _print_json(status)
        else:
            print(_describe(status))
        return EXIT_OK

    return _client_errors(run)


def _sessions_command(args: argparse.Namespace) -> int:
    def run() -> int:
        with _make_client(args) as client:
            page = client.sessions(
                state=args.state, name=args.name, limit=args.limit, cursor=args.cursor
            )
        if args.json:
            _print_json(page)
            return EXIT_OK
        rows = [
            [
                s["sessionId"],
                s["name"],
                s["type"],
                s["state"],
                f"{s['receivedBatches']:,}/{s['totalBatches']:,}",
                f"{s['receivedUsers']:,}/{s['totalUsers']:,}",
                ",".join(f"{d['destination']}:{d['state']}" for d in s["deliveries"]) or "-",
                _cell(s.get("updatedAt")),
            ]
            for s in page["sessions"]
        ]
        headers = ["SESSION", "NAME", "TYPE", "STATE", "BATCHES", "USERS", "DELIVERIES", "UPDATED"]
        print(_table(rows, headers) if rows else "no sessions")
        if page.get("nextCursor"):
            print(f"\nmore: --cursor {page['nextCursor']}")
        return EXIT_OK

    return _client_errors(run)


YES = frozenset({"y", "yes"})


def _refused(exc: Rejected) -> int:
    """The server's own words (404 no such session, 409 nothing to retry), then exit 1."""
    print(f"audience-server: {' '.join(exc.messages)}", file=sys.stderr)
    return EXIT_FAILED


def _ask(prompt: str) -> str:
    """The prompt on stderr (stdout stays the result); end of input counts as no."""
    print(prompt, end="", file=sys.stderr, flush=True)
    return sys.stdin.readline()


def _abort_command(
    args: argparse.Namespace,
    *,
    ask: Callable[[str], str] = _ask,
    is_terminal: Callable[[], bool] | None = None,
) -> int:
    """Abort purges a session's users for good, so a person at a terminal confirms it with
    the session's name and state in front of them; a script must say ``--yes``, since a
    prompt nobody can answer would hang or, worse, read its answer from piped data."""
    terminal = (is_terminal or sys.stdin.isatty)()

    def run() -> int:
        if not args.yes and not terminal:
            print(
                "audience-server: abort asks for confirmation on a terminal; "
                "pass --yes to abort without one",
                file=sys.stderr,
            )
            return EXIT_USAGE
        with _make_client(args) as client:
            if not args.yes:
                status = client.status(args.session_id)
                if status is None:
                    print(
                        f"audience-server: session {args.session_id} does not exist.",
                        file=sys.stderr,
                    )
                    return EXIT_FAILED
                question = f"abort session {args.session_id} ({status['name']}, {status['state']})?"
                if ask(f"{question} [y/N] ").strip().lower() not in YES:
                    print("audience-server: not aborted", file=sys.stderr)
                    return EXIT_FAILED
            try:
                body = client.abort(args.session_id)
            except Rejected as exc:
                return _refused(exc)
        if args.json:
            _print_json(body)
        else:
            print(_describe(body))
        if body["state"] != SessionState.ABORTED:
            print(
                f"audience-server: session {args.session_id} had already ended "
                f"{body['state']}; it keeps that state (its stored users are purged)",
                file=sys.stderr,
            )
            return EXIT_FAILED
        return EXIT_OK

    return _client_errors(run)


def _retry_command(args: argparse.Namespace) -> int:
    """No confirmation: a retry only re-queues deliveries that failed, from their start."""

    def run() -> int:
        with _make_client(args) as client:
            try:
                body = client.retry_deliveries(args.session_id)
            except Rejected as exc:
                return _refused(exc)
        if args.json:
            _print_json(body)
        else:
            print(f"re-queued: {', '.join(body['retried'])}")
        return EXIT_OK

    return _client_errors(run)


OPERATOR_EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    done
  {EXIT_FAILED}    the server refused (no such session, nothing to retry, already ended)
       or the confirmation was declined
  {EXIT_USAGE}    bad arguments (abort without a terminal needs --yes)
  {EXIT_UNREACHABLE}    the server stayed unreachable through the retries
  {EXIT_INTERRUPTED}  interrupted
"""


UPLOAD_EXIT_CODES = f"""\
exit codes:
  {EXIT_OK}    every batch acknowledged and the session complete (delivered, with --sync/--wait)
  {EXIT_FAILED}    the server refused a batch, or the session ended badly
  {EXIT_USAGE}    bad arguments, unreadable input, or input changed since its state file
  {EXIT_UNREACHABLE}    the server stayed unreachable through the retries (re-run to resume)
  {EXIT_WAIT_TIMEOUT}    uploaded; the deliveries had not ended when --wait gave up (no progress
       for --wait-timeout s); follow with `audience-server status ID`
  {EXIT_INTERRUPTED}  interrupted (re-run to resume)
"""


def add_client_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """``upload``, ``status``, ``sessions``, ``retry`` and ``abort``: the HTTP client side."""
    upload = commands.add_parser(
        "upload",
        help="upload a CSV / NDJSON / JSON file of users as one session (resumable)",
        description="Upload a file of users as one session; re-run the command to resume.",
        epilog=UPLOAD_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    upload.add_argument(
        "file", help="the users: CSV with a header row, NDJSON, a JSON array; - is stdin"
    )
    upload.add_argument("--name", required=True, help="segment name")
    upload.add_argument("--type", choices=("custom", "primary"), default="custom")
    upload.add_argument(
        "--batch-size", type=int, default=DEFAULT_BATCH_SIZE, help="users per batch"
    )
    upload.add_argument("--session-id", help="session id (default: new, or the state file's)")
    upload.add_argument(
        "--sync", action="store_true", help="the completing batch waits for delivery"
    )
    upload.add_argument(
        "--wait",
        action="store_true",
        help="follow the server's progress until deliveries have ended",
    )
    upload.add_argument(
        "--wait-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="with --wait: give up (exit 4) after this long without progress (default 600)",
    )
    upload.add_argument("--disable-prefix", action="store_true", help="no segment name prefix")
    upload.add_argument("--concurrency", type=int, default=1, help="batches in flight at once")
    upload.add_argument("--format", choices=FORMATS, help="default: detected")
    upload.add_argument(
        "--state", help="resume state file (default FILE.upload-state.json; none for stdin)"
    )
    upload.add_argument("--max-attempts", type=int, default=10, help="attempts per request")
    upload.add_argument("--retry-base", type=float, default=0.5, help="first retry delay, s")
    upload.add_argument(
        "--progress-interval", type=float, default=5.0, help="seconds between progress lines"
    )
    _client_options(upload)
    upload.set_defaults(run=_upload)

    status = commands.add_parser("status", help="show one session and its deliveries")
    status.add_argument("session_id", metavar="ID")
    status.add_argument("--json", action="store_true", help="print the API's JSON")
    _client_options(status)
    status.set_defaults(run=_status_command)

    sessions = commands.add_parser("sessions", help="list sessions, newest activity first")
    sessions.add_argument("--state", help="only sessions in this state")
    sessions.add_argument("--name", help="only sessions of this name")
    sessions.add_argument("--limit", type=int, default=50)
    sessions.add_argument("--cursor", help="the next page, as printed after a full page")
    sessions.add_argument("--json", action="store_true", help="print the API's JSON")
    _client_options(sessions)
    sessions.set_defaults(run=_sessions_command)

    retry = commands.add_parser(
        "retry",
        help="re-queue a session's failed deliveries",
        description="Re-queue a session's failed deliveries, each with a fresh attempt budget.",
        epilog=OPERATOR_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    retry.add_argument("session_id", metavar="ID")
    retry.add_argument("--json", action="store_true", help="print the API's JSON")
    _client_options(retry)
    retry.set_defaults(run=_retry_command)

    abort = commands.add_parser(
        "abort",
        help="abort a session and purge its stored users (asks on a terminal)",
        description="Abort a session and purge its stored users; a session already\n"
        "delivered or expired keeps its state. Asks for confirmation on a terminal.",
        epilog=OPERATOR_EXIT_CODES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    abort.add_argument("session_id", metavar="ID")
    abort.add_argument("--yes", action="store_true", help="do not ask (needed without a terminal)")
    abort.add_argument("--json", action="store_true", help="print the API's JSON")
    _client_options(abort)
    abort.set_defaults(run=_abort_command)
