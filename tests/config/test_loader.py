"""parse_config and load_config: what a valid file yields, and how a bad one fails.

Every refusal is pinned as the whole message, ``FILE: KEY: reason``, because
that line is all an administrator sees when the server will not start.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from powermail.address import parse_address
from powermail.config import ConfigError, Listen, load_config, parse_config
from powermail.passwords import hash_password, verify_password

REPO = Path(__file__).resolve().parents[2]

HASH = hash_password("test-password")

# The smallest valid file: one domain, one mailbox, the two required aliases.
SERVER = """\
[server]
hostname = "mx.example.test"
data_dir = "var"
"""
DOMAIN = """\
[domains."example.test"]
"""
ALICE = """\
[mailboxes."alice@example.test"]
"""
ALIASES = """\
[aliases]
"postmaster@example.test" = ["alice@example.test"]
"abuse@example.test" = ["alice@example.test"]
"""


@pytest.fixture
def path(tmp_path: Path) -> Path:
    return tmp_path / "powermail.toml"


def refusal(text: str, path: Path) -> str:
    """The message parse_config refuses ``text`` with."""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, path)
    return str(caught.value)


def test_the_smallest_file_is_valid(path: Path) -> None:
    config = parse_config(SERVER + DOMAIN + ALICE + ALIASES, path)

    assert list(config.directory.domains) == ["example.test"]
    assert list(config.directory.mailboxes) == ["alice@example.test"]
    assert config.mx.listen == (Listen("127.0.0.1", 25),)
    assert config.server.data_dir == path.parent / "var"


def test_config_error_carries_file_key_and_reason(path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        parse_config(SERVER + "[mx]\nmax_errors = 0\n" + DOMAIN + ALICE + ALIASES, path)

    error = caught.value
    assert (error.path, error.key, error.reason) == (
        str(path),
        "mx.max_errors",
        "must be at least 1",
    )
    assert str(error) == f"{path}: mx.max_errors: must be at least 1"


def test_unknown_key_is_named_with_the_known_ones(path: Path) -> None:
    text = SERVER + 'greeting = "hi"\n' + DOMAIN + ALICE + ALIASES

    assert refusal(text, path) == (
        f"{path}: server.greeting: unknown key "
        "(known: data_dir, hostname, recipient_delimiter, reload_interval)"
    )


def test_unknown_key_in_a_mailbox_is_refused(path: Path) -> None:
    text = SERVER + DOMAIN + ALICE + "quota = 10\n" + ALIASES

    assert refusal(text, path) == (
        f'{path}: mailboxes."alice@example.test".quota: unknown key '
        "(known: mode, next_hop, next_hop_tls, password, verify_recipients)"
    )


def test_unknown_section_is_refused(path: Path) -> None:
    text = SERVER + "[smtp]\n" + DOMAIN + ALICE + ALIASES

    assert refusal(text, path) == (
        f"{path}: smtp: unknown section "
        "(known: aliases, dns, domains, imap, mailboxes, mx, queue, server, tls)"
    )


def test_string_where_an_integer_belongs_is_refused(path: Path) -> None:
    text = SERVER + '[mx]\nmax_recipients = "100"\n' + DOMAIN + ALICE + ALIASES

    assert refusal(text, path) == (
        f"{path}: mx.max_recipients: must be an integer, not a string"
    )


def test_boolean_is_not_taken_for_an_integer(path: Path) -> None:
    text = SERVER + "[mx]\nmax_recipients = true\n" + DOMAIN + ALICE + ALIASES

    assert refusal(text, path) == (
        f"{path}: mx.max_recipients: must be an integer, not a boolean"
    )


def test_integer_where_a_string_belongs_is_refused(path: Path) -> None:
    text = '[server]\nhostname = 25\ndata_dir = "var"\n' + DOMAIN + ALICE + ALIASES

    assert refusal(text, path) == (
        f"{path}: server.hostname: must be a string, not an integer"
    )


def test_mailboxes_differing_only_in_case_are_duplicates(path: Path) -> None:
    text = SERVER + DOMAIN + ALICE + '[mailboxes."ALICE@Example.TEST"]\n' + ALIASES

    assert refusal(text, path) == (
        f'{path}: mailboxes."ALICE@Example.TEST": '
        "duplicate mailbox (same as alice@example.test)"
    )


def test_mailbox_with_an_invalid_address_is_refused(path: Path) -> None:
    text = SERVER + DOMAIN + ALICE + '[mailboxes."bob@@example.test"]\n' + ALIASES

    assert refusal(text, path) == (
        f'{path}: mailboxes."bob@@example.test": '
        "invalid address 'bob@@example.test': address has more than one @"
    )


def test_alias_target_with_an_invalid_address_is_refused(path: Path) -> None:
    aliases = ALIASES + '"sales@example.test" = ["alice@example.test", "alice"]\n'

    assert refusal(SERVER + DOMAIN + ALICE + aliases, path) == (
        f'{path}: aliases."sales@example.test"[1]: '
        "invalid address 'alice': address has no domain"
    )


def test_missing_certificate_file_is_named(tmp_path: Path, path: Path) -> None:
    (tmp_path / "key.pem").write_text("not checked here")
    tls = '[tls]\ncertificate = "cert.pem"\nprivate_key = "key.pem"\n'

    assert refusal(SERVER + tls + DOMAIN + ALICE + ALIASES, path) == (
        f"{path}: tls.certificate: {(tmp_path / 'cert.pem').resolve()}: no such file"
    )


def test_certificate_without_private_key_is_refused(tmp_path: Path, path: Path) -> None:
    (tmp_path / "cert.pem").write_text("not checked here")
    tls = '[tls]\ncertificate = "cert.pem"\n'

    assert refusal(SERVER + tls + DOMAIN + ALICE + ALIASES, path) == (
        f"{path}: tls.private_key: "
        "give both tls.certificate and tls.private_key, or neither"
    )


def test_port_listed_twice_is_refused(path: Path) -> None:
    mx = '[mx]\nlisten = ["127.0.0.1:2525", "127.0.0.1:2525"]\n'

    assert refusal(SERVER + mx + DOMAIN + ALICE + ALIASES, path) == (
        f"{path}: mx.listen[1]: port 2525 is already used by mx.listen[0]"
    )


def test_domain_without_postmaster_is_refused(path: Path) -> None:
    text = SERVER + DOMAIN + '[domains."other.test"]\n' + ALICE + ALIASES

    assert refusal(text, path) == (
        f'{path}: domains."other.test": postmaster@other.test must be a mailbox '
        'or an alias to one (add aliases."postmaster@other.test")'
    )


def test_domain_without_abuse_is_refused(path: Path) -> None:
    aliases = '[aliases]\n"postmaster@example.test" = ["alice@example.test"]\n'

    assert refusal(SERVER + DOMAIN + ALICE + aliases, path) == (
        f'{path}: domains."example.test": abuse@example.test must be a mailbox '
        'or an alias to one (add aliases."abuse@example.test")'
    )


def test_unknown_mode_is_refused(path: Path) -> None:
    text = SERVER + DOMAIN + ALICE + 'mode = "forward"\n' + ALIASES

    assert refusal(text, path) == (
        f"{path}: mailboxes.\"alice@example.test\".mode: 'forward' is not one of: "
        "local, redirect"
    )


def test_redirect_needs_a_valid_next_hop(path: Path) -> None:
    base = SERVER + DOMAIN + ALICE + 'mode = "redirect"\n'
    where = f'{path}: mailboxes."alice@example.test"'
    assert refusal(base + ALIASES, path) == (
        f"{where}.next_hop: a redirect mailbox needs a next hop"
    )
    assert refusal(base + 'next_hop = "[mx.test]:99999"\n' + ALIASES, path).startswith(
        f"{where}.next_hop: '[mx.test]:99999': "
    )
    assert refusal(
        base + 'next_hop = "[mx.test]"\nnext_hop_tls = "always"\n' + ALIASES, path
    ) == (
        f"{where}.next_hop_tls: 'always' is not one of: none, opportunistic, required"
    )


def test_next_hop_on_a_local_mailbox_is_refused(path: Path) -> None:
    text = SERVER + DOMAIN + ALICE + 'next_hop = "[mx.test]"\n' + ALIASES
    assert refusal(text, path) == (
        f'{path}: mailboxes."alice@example.test".next_hop: '
        "only a redirect mailbox has a next hop"
    )


def test_verify_recipients_only_on_a_redirect_catch_all(path: Path) -> None:
    text = (
        SERVER
        + DOMAIN
        + ALICE
        + 'mode = "redirect"\nnext_hop = "[mx.test]"\nverify_recipients = true\n'
        + ALIASES
    )
    assert refusal(text, path) == (
        f'{path}: mailboxes."alice@example.test".verify_recipients: '
        "applies only to a domain's catch-all in redirect mode"
    )


def test_password_that_is_not_a_hash_is_refused_without_echoing_it(
    path: Path,
) -> None:
    text = SERVER + DOMAIN + ALICE + 'password = "hunter2"\n' + ALIASES

    message = refusal(text, path)

    assert message == (
        f'{path}: mailboxes."alice@example.test".password: '
        "must be an argon2 hash (set it with `powermail mailbox passwd`)"
    )
    assert "hunter2" not in message


def test_mailbox_in_an_unknown_domain_is_refused(path: Path) -> None:
    text = SERVER + DOMAIN + ALICE + '[mailboxes."carol@other.test"]\n' + ALIASES

    assert refusal(text, path) == (
        f'{path}: mailboxes."carol@other.test": domain other.test is not configured'
    )


def test_alias_to_an_unknown_address_is_refused(path: Path) -> None:
    aliases = ALIASES + '"sales@example.test" = ["nobody@example.test"]\n'

    assert refusal(SERVER + DOMAIN + ALICE + aliases, path) == (
        f'{path}: aliases."sales@example.test": '
        "alias target nobody@example.test is not a mailbox or alias"
    )


def test_alias_to_an_unhosted_domain_is_refused(path: Path) -> None:
    aliases = ALIASES + '"sales@example.test" = ["someone@elsewhere.test"]\n'

    assert refusal(SERVER + DOMAIN + ALICE + aliases, path) == (
        f'{path}: aliases."sales@example.test"[0]: '
        "someone@elsewhere.test is not in a configured domain"
    )


def test_alias_loop_is_refused(path: Path) -> None:
    aliases = ALIASES + (
        '"sales@example.test" = ["team@example.test"]\n'
        '"team@example.test" = ["sales@example.test"]\n'
    )

    assert refusal(SERVER + DOMAIN + ALICE + aliases, path) == (
        f'{path}: aliases."sales@example.test": '
        "alias chain from sales@example.test is too long or loops"
    )


def test_syntax_error_is_reported_as_such(path: Path) -> None:
    message = refusal(SERVER + "[domains.\n", path)

    assert message.startswith(f"{path}: (syntax): ")


def test_missing_file_is_named(path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(path)

    assert str(caught.value) == f"{path}: (file): no such file"


# -- The embedded default -----------------------------------------------------


@pytest.fixture(scope="module")
def default():
    return load_config(REPO / "conf" / "powermail.toml")


def test_embedded_default_loads(default) -> None:
    conf = REPO / "conf"
    assert default.server.hostname == "mx.example.test"
    assert default.server.data_dir == (conf / ".." / "var").resolve()
    assert default.server.recipient_delimiter == "+"
    assert default.tls.certificate is None and default.tls.private_key is None
    assert default.mx.listen == (Listen("127.0.0.1", 2525),)
    assert list(default.directory.domains) == ["example.test"]
    assert list(default.directory.mailboxes) == [
        "alice@example.test",
        "bob@example.test",
    ]
    assert dict(default.directory.aliases) == {
        "postmaster@example.test": ("alice@example.test",),
        "abuse@example.test": ("alice@example.test",),
    }


def test_embedded_default_demo_passwords_are_the_documented_ones(default) -> None:
    mailboxes = default.directory.mailboxes
    assert verify_password(mailboxes["alice@example.test"].password_hash, "alice-demo")
    assert verify_password(mailboxes["bob@example.test"].password_hash, "bob-demo")


# -- Resolution ---------------------------------------------------------------


def resolved(directory, text: str) -> list[str] | None:
    found = directory.resolve(parse_address(text))
    return None if found is None else [mailbox.key for mailbox in found]


def test_bare_postmaster_reaches_the_first_domains_postmaster(default) -> None:
    assert resolved(default.directory, "postmaster") == ["alice@example.test"]
    assert resolved(default.directory, "PostMaster") == ["alice@example.test"]


def test_local_parts_and_domains_compare_without_case(default) -> None:
    assert resolved(default.directory, "BOB@Example.TEST") == ["bob@example.test"]
    assert resolved(default.directory, "Abuse@example.test") == ["alice@example.test"]


def test_plus_addressing_reaches_the_base_mailbox(default) -> None:
    assert resolved(default.directory, "bob+lists@example.test") == ["bob@example.test"]
    assert resolved(default.directory, "nobody+x@example.test") is None


def test_plus_addressing_can_be_switched_off(path: Path) -> None:
    text = SERVER + 'recipient_delimiter = ""\n' + DOMAIN + ALICE + ALIASES
    directory = parse_config(text, path).directory

    assert resolved(directory, "alice+lists@example.test") is None
    assert resolved(directory, "alice@example.test") == ["alice@example.test"]


def test_unknown_local_part_goes_to_the_catch_all(path: Path) -> None:
    domain = '[domains."example.test"]\ncatch_all = "alice@example.test"\n'
    directory = parse_config(SERVER + domain + ALICE + ALIASES, path).directory

    assert resolved(directory, "anything@example.test") == ["alice@example.test"]
    assert resolved(directory, "anything@elsewhere.test") is None


def test_unknown_local_part_without_catch_all_is_unknown(default) -> None:
    assert resolved(default.directory, "nobody@example.test") is None


def test_catch_all_must_be_a_configured_mailbox(path: Path) -> None:
    domain = '[domains."example.test"]\ncatch_all = "nobody@example.test"\n'

    assert refusal(SERVER + domain + ALICE + ALIASES, path) == (
        f'{path}: domains."example.test".catch_all: '
        "nobody@example.test is not a configured mailbox"
    )


def test_alias_expands_through_aliases_to_distinct_mailboxes(path: Path) -> None:
    bob = f'[mailboxes."bob@example.test"]\npassword = "{HASH}"\n'
    aliases = ALIASES + (
        '"team@example.test" = ["alice@example.test", "bob@example.test",'
        ' "postmaster@example.test"]\n'
    )
    directory = parse_config(SERVER + DOMAIN + ALICE + bob + aliases, path).directory

    assert resolved(directory, "team@example.test") == [
        "alice@example.test",
        "bob@example.test",
    ]
    assert verify_password(
        directory.mailboxes["bob@example.test"].password_hash, "test-password"
    )
