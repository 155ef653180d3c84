"""The destinations file: where completed segments are delivered, read once at startup.

    DestinationsError   the file cannot be used; one sentence naming file, line and field
    OptionError         a kind's validator rejects one option; becomes a DestinationsError

Every problem is reported with the line it is on, and no message ever quotes the value of an
environment variable or of an option after substitution: those hold the secrets.
"""

from __future__ import annotations

import difflib
import re
import tomllib
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ID_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
ID_RULE = "1-64 characters, each a letter, digit, '.', '_' or '-'"
DEFAULT_DELIVERIES_DIR = "./deliveries"

# ``$${`` first, so an escaped reference is never read as a reference; a ``${`` that matches
# neither of the first two is a mistake worth reporting rather than passing through.
_REFERENCE = re.compile(r"\$\$\{|\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)\}|\$\{")
_DESTINATIONS_HEADER = re.compile(
    r"""^\s*\[\[\s*(?:destinations|"destinations"|'destinations')\s*\]\]"""
)
# Any ``[table]`` or ``[[array]]`` header; commas keep a line of a multi-line array out.
_ANY_HEADER = re.compile(r"^\s*\[\[?[^\[\],=]+\]\]?\s*(?:#.*)?$")
_TOML_POSITION = re.compile(
    r"\s*\((?:at line (?P<line>\d+), column (?P<column>\d+)|at end of document)\)$"
)


@dataclass(frozen=True)
class DestinationConfig:
    """One ``[[destinations]]`` table: its id, its kind, and the rest of its keys as options."""

    id: str
    kind: str
    options: Mapping[str, Any]  # every key except id and kind, with ${ENV} substituted
    line: int  # of its [[destinations]] header; 0 for the built-in default


class DestinationsError(ValueError):
    """A destinations file the server cannot use; the message names the file, line and field."""


class OptionError(ValueError):
    """A kind's validator rejects an option; ``message`` must not quote the option's value."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


Validator = Callable[[DestinationConfig], object]


def default_destinations() -> list[DestinationConfig]:
    """What the server delivers to when there is no destinations file."""
    return [
        DestinationConfig(id="file", kind="file", options={"dir": DEFAULT_DELIVERIES_DIR}, line=0)
    ]


def load_destinations(
    path: Path,
    *,
    explicit: bool,
    environ: Mapping[str, str],
    validators: Mapping[str, Validator],
) -> list[DestinationConfig]:
    """Read, substitute and validate the destinations file at ``path``.

    A missing file gives :func:`default_destinations` unless ``explicit`` (the path came from
    ``AUDIENCE_DESTINATIONS``), when it is an error. An empty file, or ``destinations = []``,
    gives no destinations at all: segments still complete, and nothing is delivered.
    ``validators`` maps each known kind to a function that raises :class:`OptionError`.
    """
    text = _read(path, explicit=explicit)
    if text is None:
        return default_destinations()
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise DestinationsError(_syntax_message(path, error)) from None
    lines = _Lines(text)

    for key in document:
        if key != "destinations":
            hint = _did_you_mean(key, ["destinations"])
            raise DestinationsError(
                f"{_at(path, lines.top_level(key))}: unknown top-level key '{key}'{hint}; "
                "the file holds only [[destinations]] tables"
            )
    tables = document.get("destinations", [])
    if not isinstance(tables, list) or not all(isinstance(table, dict) for table in tables):
        raise DestinationsError(
            f"{_at(path, lines.top_level('destinations'))}: destinations must be an array of "
            "tables; write [[destinations]] (double brackets) above each destination"
        )
    lines.expect_tables(len(tables))

    configs: list[DestinationConfig] = []
    id_lines: dict[str, int] = {}
    for index, table in enumerate(tables):
        config = _load_table(path, lines, index, table, environ, validators, id_lines)
        configs.append(config)
    return configs


def _load_table(
    path: Path,
    lines: _Lines,
    index: int,
    table: dict[str, Any],
    environ: Mapping[str, str],
    validators: Mapping[str, Validator],
    id_lines: dict[str, int],
) -> DestinationConfig:
    header = lines.table(index)

    def fail(who: str, field: str, message: str) -> DestinationsError:
        line = lines.field(index, field)
        return DestinationsError(f"{_at(path, line)}: {who} field {field}: {message}")

    who = f"destination #{index + 1}"
    ident = table.get("id")
    if ident is None:
        raise fail(who, "id", f"missing; every destination needs a unique id of {ID_RULE}")
    if not isinstance(ident, str):
        raise fail(who, "id", f"must be a string of {ID_RULE}")
    if not ID_PATTERN.fullmatch(ident):
        raise fail(who, "id", f'"{ident}" is not {ID_RULE}')
    who = f'destination "{ident}"'
    id_line = lines.field(index, "id")
    if ident in id_lines:
        raise fail(
            who, "id", f'"{ident}" is already used on line {id_lines[ident]}; ids must be unique'
        )
    id_lines[ident] = id_line

    known = _known_kinds(validators)
    kind = table.get("kind")
    if kind is None:
        raise fail(who, "kind", f"missing; {known}")
    if not isinstance(kind, str):
        raise fail(who, "kind", f"must be a string; {known}")
    if kind not in validators:
        raise fail(who, "kind", unknown_kind(kind, validators))

    try:
        options = {
            key: _substitute(value, key, environ)
            for key, value in table.items()
            if key not in ("id", "kind")
        }
        config = DestinationConfig(id=ident, kind=kind, options=options, line=header)
        validators[kind](config)
    except OptionError as error:
        raise fail(who, error.field, error.message) from None
    return config


def _read(path: Path, *, explicit: bool) -> str | None:
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        if explicit:
            raise DestinationsError(
                f"AUDIENCE_DESTINATIONS names {path}, which does not exist"
            ) from None
        return None
    except OSError as error:
        raise DestinationsError(f"{path} cannot be read: {error.strerror or error}") from None
    try:
        # utf-8-sig: editors on Windows like to start a file with a byte order mark.
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise DestinationsError(f"{path} line {line}: not UTF-8 text") from None


def _syntax_message(path: Path, error: tomllib.TOMLDecodeError) -> str:
    message = str(error)
    position = _TOML_POSITION.search(message)
    if position is None:
        return f"{path}: not valid TOML: {message}"
    reason = message[: position.start()]
    reason = reason[:1].lower() + reason[1:]
    if position["line"] is None:
        return f"{path} at the end of the file: not valid TOML: {reason}"
    where = f"{path} line {position['line']}, column {position['column']}"
    return f"{where}: not valid TOML: {reason}"


def _substitute(value: Any, field: str, environ: Mapping[str, str]) -> Any:
    """Replace ``${VAR}`` in every string inside ``value``; ``$${`` stands for ``${``."""
    if isinstance(value, str):
        return _substitute_string(value, field, environ)
    if isinstance(value, list):
        return [_substitute(item, f"{field}[{i}]", environ) for i, item in enumerate(value)]
    if isinstance(value, dict):
        return {key: _substitute(item, f"{field}.{key}", environ) for key, item in value.items()}
    return value


def _substitute_string(text: str, field: str, environ: Mapping[str, str]) -> str:
    def replace(match: re.Match[str]) -> str:
        if match[0] == "$${":
            return "${"
        name = match["name"]
        if name is None:
            raise OptionError(
                field, 'has "${" without a variable name and "}"; write "$${" for a literal "${"'
            )
        if name not in environ:
            raise OptionError(field, f"environment variable {name} is not set")
        return environ[name]

    # re.sub never rescans what it inserted, so a value containing "${" stays as it is.
    return _REFERENCE.sub(replace, text)


def unknown_kind(kind: str, known: Collection[str]) -> str:
    """``unknown kind 'x' (did you mean 'y'?); known kinds: ...``: one wording everywhere."""
    return f"unknown kind '{kind}'{_did_you_mean(kind, known)}; {_known_kinds(known)}"


def _known_kinds(known: Iterable[str]) -> str:
    return f"known kinds: {', '.join(sorted(known)) or '(none)'}"


def _did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean '{close[0]}'?)" if close else ""


def _at(path: Path, line: int | None) -> str:
    return f"{path} line {line}" if line is not None else str(path)


class _Lines:
    """Line numbers for tables and fields, found in the raw text since tomllib keeps none."""

    def __init__(self, text: str) -> None:
        self.lines = text.split("\n")
        self.headers = [
            number for number, line in enumerate(self.lines, 1) if _DESTINATIONS_HEADER.match(line)
        ]
        self.exact = True

    def expect_tables(self, count: int) -> None:
        # ``destinations = [{...}]`` has no headers; a header-like line inside a multi-line
        # string adds one. Either way the count disagrees and lines fall back to the key's.
        if count != len(self.headers):
            self.exact = False
            self.headers = [self.top_level("destinations") or 1] * count

    def table(self, index: int) -> int:
        return self.headers[index]

    def field(self, index: int, field: str) -> int:
        """The first line in table ``index`` that sets ``field``, else the table's header."""
        start = self.table(index)
        if not self.exact:
            return start
        key = re.escape(re.split(r"[.\[]", field, maxsplit=1)[0])
        assignment = re.compile(rf"""^\s*(?:{key}|"{key}"|'{key}')\s*[=.]""")
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if _ANY_HEADER.match(line):
                break
            if assignment.match(line):
                return number
        return start

    def top_level(self, key: str) -> int | None:
        """The line that sets a top-level ``key``, as ``key = ...`` or a ``[key]`` header."""
        name = re.escape(key)
        quoted = rf"""(?:{name}|"{name}"|'{name}')"""
        assignment = re.compile(rf"^\s*{quoted}\s*[=.]")
        header = re.compile(rf"^\s*\[\[?\s*{quoted}\s*[\].]")
        in_root = True
        for number, line in enumerate(self.lines, 1):
            if header.match(line) or (in_root and assignment.match(line)):
                return number
            if _ANY_HEADER.match(line):
                in_root = False
        return None
