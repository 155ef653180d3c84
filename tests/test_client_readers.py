"""client/readers.py: CSV, NDJSON and JSON arrays streamed; formats detected; fingerprints."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from audience_server.client import readers
from audience_server.client.errors import InputError


def test_csv_cells_are_strings_empty_cells_absent_unknown_columns_kept(tmp_path: Path) -> None:
    path = tmp_path / "u.csv"
    path.write_text('\ufeffemail,phone,tier\na@x.com,,gold\n,+1415,"multi\nline"\n,,\n')
    assert list(readers.read_users(path, "csv")) == [
        {"email": "a@x.com", "tier": "gold"},
        {"phone": "+1415", "tier": "multi\nline"},
    ]


def test_a_json_array_is_decoded_element_by_element(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(readers, "_CHUNK", 7)  # elements straddle every read
    rows = [{"email": f"u{i}@x.com", "n": [i, {"k": "]"}]} for i in range(50)]
    path = tmp_path / "u.json"
    path.write_text(" \n" + json.dumps(rows, indent=2) + "\n")
    assert list(readers.read_users(path, "json")) == rows
    path.write_text('[{"a": "1"}, 2]')
    with pytest.raises(InputError, match="element 1 is not an object"):
        list(readers.read_users(path, "json"))
    path.write_text('[{"a": "1"}, {"b": ')
    with pytest.raises(InputError, match="element 1 is not valid JSON"):
        list(readers.read_users(path, "json"))


def test_a_json_input_must_be_one_array_of_objects(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    for not_an_array in ('{"email": "a@x.com"}', "2", "", "  \n"):
        path.write_text(not_an_array)
        with pytest.raises(InputError, match="must be an array of user objects"):
            list(readers.read_users(path, "json"))
    path.write_text('[{"email": "a@x.com"} {"email": "b@x.com"}]')
    with pytest.raises(InputError, match="element 1 is not valid JSON"):
        list(readers.read_users(path, "json"))
    path.write_text('[{"email": "secret@x.com", "n": NaN}]')
    with pytest.raises(InputError) as caught:
        list(readers.read_users(path, "json"))
    assert str(caught.value) == "JSON array element 0 is not valid JSON."  # no user data


def test_a_json_array_may_start_with_a_bom_and_keeps_floats(tmp_path: Path) -> None:
    path = tmp_path / "u.json"
    path.write_bytes(b'\xef\xbb\xbf [{"email": "a@x.com", "score": 1.5, "n": 2}]')
    assert list(readers.read_users(path, "json")) == [{"email": "a@x.com", "score": 1.5, "n": 2}]
    assert readers.detect_format(path.rename(tmp_path / "u.txt")) == "json"


def test_ndjson_and_csv_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "u.ndjson"
    path.write_text('{"email": "a@x.com"}\n[1]\n')
    with pytest.raises(InputError, match="NDJSON line 2 is not a JSON object"):
        list(readers.read_users(path, "ndjson"))
    path.write_text('{"email": "a@x.com"}\n{"email": \n')
    with pytest.raises(InputError, match="NDJSON line 2 is not JSON"):
        list(readers.read_users(path, "ndjson"))
    csv_path = tmp_path / "u.csv"
    csv_path.write_text("email,phone\na@x.com,1,extra\n")
    with pytest.raises(InputError, match="CSV line 2 has more cells than the header"):
        list(readers.read_users(csv_path, "csv"))
    csv_path.write_text("email,email\na@x.com,b@x.com\n")
    with pytest.raises(InputError, match="must name every column once"):
        list(readers.read_users(csv_path, "csv"))
    csv_path.write_bytes(b"email\n\xff\xfe@x.com\n")
    with pytest.raises(InputError, match="not UTF-8 text"):
        list(readers.read_users(csv_path, "csv"))


def test_formats_are_detected_and_the_fingerprint_follows_the_content(tmp_path: Path) -> None:
    ndjson = tmp_path / "users.txt"
    ndjson.write_text('{"email": "a@x.com"}\n\n{"email": "b@x.com"}\n')
    assert readers.detect_format(ndjson) == "ndjson"
    first = readers.fingerprint(ndjson, "ndjson")
    assert (first.users, first.size) == (2, ndjson.stat().st_size)
    ndjson.write_text('{"email": "a@x.com"}\n\n{"email": "c@x.com"}\n')
    assert readers.fingerprint(ndjson, "ndjson").sha256 != first.sha256
