"""Unit tests of the destinations file loader: pure, no HTTP, no database."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping
from pathlib import Path

import pytest

from audience_server.destinations import (
    DestinationConfig,
    DestinationsError,
    OptionError,
    Validator,
    load_destinations,
)


def require_url_and_secret(config: DestinationConfig) -> None:
    url = config.options.get("url")
    if url is None:
        raise OptionError("url", "is required")
    if not str(url).startswith("https://"):
        raise OptionError("url", "must start with https://")
    if "secret" not in config.options:
        raise OptionError("secret", "is required")


def accept(config: DestinationConfig) -> None:
    pass


VALIDATORS: dict[str, Validator] = {
    "webhook": require_url_and_secret,
    "facebook": accept,
    "file": accept,
}


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "destinations.toml"
    path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
    return path


def load(
    path: Path, environ: Mapping[str, str] | None = None, *, explicit: bool = True
) -> list[DestinationConfig]:
    return load_destinations(path, explicit=explicit, environ=environ or {}, validators=VALIDATORS)


def error_of(path: Path, environ: Mapping[str, str] | None = None) -> str:
    with pytest.raises(DestinationsError) as info:
        load(path, environ)
    return str(info.value)


def test_missing_file_not_named_gives_the_default_file_destination(tmp_path: Path) -> None:
    configs = load(tmp_path / "destinations.toml", explicit=False)
    assert configs == [
        DestinationConfig(id="file", kind="file", options={"dir": "./deliveries"}, line=0)
    ]


def test_missing_file_named_by_the_environment_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "nowhere.toml"
    with pytest.raises(DestinationsError) as info:
        load(path, explicit=True)
    assert str(info.value) == f"AUDIENCE_DESTINATIONS names {path}, which does not exist"


def test_two_destinations_of_one_kind(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        # two ad accounts
        [[destinations]]
        id = "meta-main"
        kind = "facebook"
        ad_account_id = "act_1"

        [[destinations]]
        id = "meta.second_2"
        kind = "facebook"
        ad_account_id = "act_2"
        """,
    )
    configs = load(path)
    assert configs == [
        DestinationConfig("meta-main", "facebook", {"ad_account_id": "act_1"}, line=2),
        DestinationConfig("meta.second_2", "facebook", {"ad_account_id": "act_2"}, line=7),
    ]


def test_environment_variables_are_substituted_everywhere(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "crm-hook"
        kind = "webhook"
        url = "https://crm.example.com/${TENANT}/audiences"
        secret = "${CRM_SECRET}"
        headers = { Authorization = "Bearer ${TOKEN}" }
        extra = ["${TENANT}", 3, ["x-${TENANT}"]]
        literal = "$${NOT_A_VARIABLE} and $${TOKEN}"
        sneaky = "${SNEAKY}"
        port = 443
        """,
    )
    environ = {"TENANT": "acme", "CRM_SECRET": "s3cr3t", "TOKEN": "tok", "SNEAKY": "${TOKEN}"}
    [config] = load(path, environ)
    assert config.options == {
        "url": "https://crm.example.com/acme/audiences",
        "secret": "s3cr3t",
        "headers": {"Authorization": "Bearer tok"},
        "extra": ["acme", 3, ["x-acme"]],
        "literal": "${NOT_A_VARIABLE} and ${TOKEN}",
        "sneaky": "${TOKEN}",  # a value is inserted as it is, never expanded again
        "port": 443,
    }


def test_unset_variable_names_line_field_and_variable_but_no_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "crm-hook"
        kind = "webhook"
        url = "https://crm.example.com/"
        secret = "${CRM_SECRET}"

        [[destinations]]
        id = "meta-main"
        kind = "facebook"
        ad_account_id = "${META_ACCOUNT}"
        access_token = "${META_TOKEN}"
        """,
    )
    environ = {"CRM_SECRET": "hunter2-crm", "META_ACCOUNT": "act_hunter2", "PATH": "/usr/bin"}
    message = error_of(path, environ)
    assert message == (
        f'{path} line 11: destination "meta-main" field access_token: '
        "environment variable META_TOKEN is not set"
    )
    for value in environ.values():
        assert value not in message


def test_unset_variable_nested_in_an_array_names_the_item(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "f"
        kind = "file"
        tags = [
          "a",
          "${MISSING}",
        ]
        """,
    )
    message = error_of(path)
    assert message == (
        f'{path} line 4: destination "f" field tags[1]: environment variable MISSING is not set'
    )


def test_dangling_reference_is_an_error_that_quotes_no_value(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "f"
        kind = "file"
        dir = "p4ssw0rd${"
        """,
    )
    message = error_of(path)
    assert message.startswith(f'{path} line 4: destination "f" field dir: has "${{"')
    assert "p4ssw0rd" not in message


def test_unknown_kind_suggests_the_close_one(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "crm-hook"
        # the kind is misspelt
        kind = "webhok"
        """,
    )
    assert error_of(path) == (
        f"{path} line 4: destination \"crm-hook\" field kind: unknown kind 'webhok' "
        "(did you mean 'webhook'?); known kinds: facebook, file, webhook"
    )


def test_unknown_kind_without_a_close_one_lists_the_known_kinds(tmp_path: Path) -> None:
    path = write(tmp_path, '[[destinations]]\nid = "x"\nkind = "carrier-pigeon"\n')
    message = error_of(path)
    assert "did you mean" not in message
    assert message.endswith("unknown kind 'carrier-pigeon'; known kinds: facebook, file, webhook")


def test_missing_id_names_the_table_by_position_and_header_line(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "one"
        kind = "file"

        [[destinations]]
        kind = "file"
        """,
    )
    message = error_of(path)
    assert message.startswith(f"{path} line 5: destination #2 field id: missing;")


def test_missing_kind(tmp_path: Path) -> None:
    path = write(tmp_path, '[[destinations]]\nid = "one"\ndir = "/tmp"\n')
    assert error_of(path) == (
        f'{path} line 1: destination "one" field kind: missing; '
        "known kinds: facebook, file, webhook"
    )


@pytest.mark.parametrize("bad", ['"meta main"', '"caf\u00e9"', '""', f'"{"a" * 65}"', "7"])
def test_bad_id_is_refused(tmp_path: Path, bad: str) -> None:
    path = write(tmp_path, f'[[destinations]]\nkind = "file"\nid = {bad}\n')
    message = error_of(path)
    assert message.startswith(f"{path} line 3: destination #1 field id: ")
    assert "1-64 characters, each a letter, digit, '.', '_' or '-'" in message


def test_id_of_64_characters_is_accepted(tmp_path: Path) -> None:
    ident = "A.z_0-" + "x" * 58
    path = write(tmp_path, f'[[destinations]]\nid = "{ident}"\nkind = "file"\n')
    assert [config.id for config in load(path)] == [ident]


def test_duplicate_id_names_both_lines(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "same"
        kind = "file"

        [[destinations]]
        kind = "facebook"
        id = "same"
        """,
    )
    assert error_of(path) == (
        f'{path} line 7: destination "same" field id: "same" is already used on line 2; '
        "ids must be unique"
    )


def test_toml_syntax_error_names_the_line_and_column(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "a"
        kind = "file"
        dir = ./deliveries
        """,
    )
    message = error_of(path)
    assert message.startswith(f"{path} line 4, column 7: not valid TOML: ")


def test_unknown_top_level_key_is_named(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "a"
        kind = "file"

        [[destination]]
        id = "b"
        kind = "file"
        """,
    )
    assert error_of(path) == (
        f"{path} line 5: unknown top-level key 'destination' (did you mean 'destinations'?); "
        "the file holds only [[destinations]] tables"
    )


def test_single_brackets_are_refused_with_a_hint(tmp_path: Path) -> None:
    path = write(tmp_path, '[destinations]\nid = "a"\nkind = "file"\n')
    message = error_of(path)
    assert message.startswith(f"{path} line 1: destinations must be an array of tables")
    assert "[[destinations]]" in message


@pytest.mark.parametrize("text", ["", "# nothing yet\n", "destinations = []\n"])
def test_a_file_without_destinations_means_none(tmp_path: Path, text: str) -> None:
    assert load(write(tmp_path, text)) == []


def test_option_error_points_at_the_line_of_the_field(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "file"
        kind = "file"

        [[destinations]]
        id = "crm-hook"
        kind = "webhook"
        secret = "x"
        "url" = "http://crm.example.com/"

        [[destinations]]
        id = "later"
        kind = "file"
        url = "not this one"
        """,
    )
    assert error_of(path) == (
        f'{path} line 9: destination "crm-hook" field url: must start with https://'
    )


def test_option_error_for_an_absent_field_points_at_the_header(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "file"
        kind = "file"

        [[destinations]]  # the CRM
        id = "crm-hook"
        kind = "webhook"
        url = "https://crm.example.com/"

        [[destinations]]
        id = "later"
        kind = "file"
        secret = "not this one"
        """,
    )
    assert error_of(path) == f'{path} line 5: destination "crm-hook" field secret: is required'


def test_validator_sees_substituted_options(tmp_path: Path) -> None:
    seen: list[DestinationConfig] = []
    path = write(
        tmp_path,
        """
        [[destinations]]
        id = "meta-main"
        kind = "facebook"
        access_token = "${META_TOKEN}"
        """,
    )
    load_destinations(
        path,
        explicit=False,
        environ={"META_TOKEN": "tok"},
        validators={"facebook": seen.append},
    )
    assert seen == [DestinationConfig("meta-main", "facebook", {"access_token": "tok"}, line=1)]
