"""The ``powermail`` command, run as a real process on a copy of the default.

Each edit is checked by loading the result as the server would; each refusal
by its exact message and exit status, and by the file being left byte for
byte as it was.
"""

from __future__ import annotations

import fcntl
import os
import select
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from powermail.cli import main
from powermail.config import load_config
from powermail.passwords import verify_password

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "conf" / "powermail.toml"


class Cli:
    """Runs ``python -m powermail.cli -c FILE ...`` against one copied file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __call__(
        self, *args: str, stdin: str = "", config: bool = True
    ) -> subprocess.CompletedProcess[str]:
        options = ["-c", str(self.path)] if config else []
        return subprocess.run(
            [sys.executable, "-m", "powermail.cli", *options, *args],
            input=stdin,
            capture_output=True,
            text=True,
            cwd=self.path.parent.parent,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8")

    def load(self):
        return load_config(self.path)

    def ok(self, *args: str, stdin: str = "") -> str:
        """Run a command that must succeed; its standard output."""
        done = self(*args, stdin=stdin)
        assert (done.returncode, done.stderr) == (0, ""), done
        return done.stdout

    def refused(self, *args: str, stdin: str = "pw\n", status: int = 1) -> str:
        """Run a command that must fail without touching the file; its stderr."""
        before = self.path.read_bytes()
        done = self(*args, stdin=stdin)
        assert done.returncode == status, done
        assert done.stdout == ""
        assert self.path.read_bytes() == before
        assert done.stderr.count("\n") == 1, done.stderr
        return done.stderr


@pytest.fixture
def cli(tmp_path: Path) -> Cli:
    path = tmp_path / "conf" / "powermail.toml"
    path.parent.mkdir()
    shutil.copyfile(DEFAULT, path)
    return Cli(path)


def comments(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.lstrip().startswith("#")]


def password_of(cli: Cli, address: str) -> str:
    return cli.load().directory.mailboxes[address].password_hash


# -- check --------------------------------------------------------------------


def test_check_counts_what_the_file_holds(cli: Cli) -> None:
    assert cli.ok("check") == (f"{cli.path}: OK (1 domain, 2 mailboxes, 2 aliases)\n")


def test_check_prints_the_config_error_and_fails(cli: Cli) -> None:
    cli.path.write_text(cli.text().replace('"local"', '"remote"', 1))

    assert cli.refused("check") == (
        f'powermail: {cli.path}: mailboxes."alice@example.test".mode: '
        "'remote' is not one of: local, redirect\n"
    )


def test_check_of_a_missing_file_names_it(cli: Cli) -> None:
    cli.path.unlink()

    done = cli("check")

    assert done.returncode == 1
    assert done.stderr == f"powermail: {cli.path}: (file): no such file\n"


def test_edit_of_a_missing_file_names_it(cli: Cli) -> None:
    missing = cli.path.with_name("missing") / "powermail.toml"

    done = cli(
        *("-c", str(missing), "alias", "add", "sales@example.test", "bob@example.test"),
        config=False,
    )

    assert done.returncode == 1
    assert done.stderr == f"powermail: {missing}: (file): no such file\n"
    assert not missing.parent.exists()


def test_config_defaults_to_conf_powermail_toml_in_the_current_folder(
    cli: Cli,
) -> None:
    done = cli("check", config=False)

    assert done.returncode == 0, done
    assert done.stdout == f"{cli.path}: OK (1 domain, 2 mailboxes, 2 aliases)\n"


def test_main_returns_the_exit_status(cli: Cli, capsys) -> None:
    assert main(["-c", str(cli.path), "check"]) == 0
    assert main(["-c", str(cli.path), "mailbox", "remove", "x@y.test"]) == 1
    assert main(["-c", str(cli.path), "frobnicate"]) == 2
    assert main(["--help"]) == 0
    capsys.readouterr()


# -- usage --------------------------------------------------------------------


def test_missing_command_is_a_one_line_usage_error(cli: Cli) -> None:
    assert cli.refused(status=2) == (
        "powermail: the following arguments are required: COMMAND "
        "(see 'powermail --help')\n"
    )


def test_domain_add_requires_postmaster(cli: Cli) -> None:
    assert cli.refused("domain", "add", "new.test", status=2) == (
        "powermail: domain add: the following arguments are required: "
        "--postmaster (see 'powermail domain add --help')\n"
    )


def test_unknown_mode_is_a_usage_error(cli: Cli) -> None:
    stderr = cli.refused(
        "mailbox", "add", "carol@example.test", "--mode", "remote", status=2
    )

    assert stderr.startswith("powermail: mailbox add: argument --mode: invalid ")


# -- Layout -------------------------------------------------------------------


def test_edits_keep_every_comment(cli: Cli) -> None:
    original = comments(cli.text())

    cli.ok("domain", "add", "new.test", "--postmaster", "pm@new.test", stdin="a\n")
    cli.ok("mailbox", "add", "carol@example.test", stdin="b\n")
    cli.ok("alias", "add", "sales@example.test", "carol@example.test")
    cli.ok("alias", "add", "sales@example.test", "pm@new.test")
    cli.ok("mailbox", "passwd", "bob@example.test", stdin="c\n")
    cli.ok("alias", "add", "postmaster@example.test", "bob@example.test")
    cli.ok("alias", "add", "abuse@example.test", "bob@example.test")
    cli.ok("mailbox", "remove", "alice@example.test")
    cli.ok("alias", "remove", "sales@example.test", "carol@example.test")
    cli.ok("domain", "remove", "new.test")

    assert comments(cli.text()) == original


def test_comment_above_a_header_stays_above_it(cli: Cli) -> None:
    demo = "# Demo passwords (see README.md): alice-demo and bob-demo.\n"

    cli.ok("domain", "add", "new.test", "--postmaster", "pm@new.test", stdin="a\n")
    assert demo + '[mailboxes."alice@example.test"]\n' in cli.text()

    cli.ok("alias", "add", "postmaster@example.test", "bob@example.test")
    cli.ok("alias", "add", "abuse@example.test", "bob@example.test")
    cli.ok("mailbox", "remove", "alice@example.test")
    assert demo + '[mailboxes."bob@example.test"]\n' in cli.text()


def test_adding_then_removing_a_domain_restores_the_file(cli: Cli) -> None:
    original = cli.text()

    cli.ok("domain", "add", "new.test", "--postmaster", "pm@new.test", stdin="a\n")
    cli.ok("mailbox", "add", "carol@new.test", stdin="b\n")
    cli.ok("alias", "add", "abuse@example.test", "carol@new.test")
    cli.ok("domain", "remove", "new.test")

    assert cli.text() == original


def test_adding_then_removing_a_mailbox_restores_the_file(cli: Cli) -> None:
    original = cli.text()

    cli.ok("mailbox", "add", "carol@example.test", stdin="b\n")
    cli.ok("mailbox", "remove", "carol@example.test")

    assert cli.text() == original


# -- domain -------------------------------------------------------------------


def test_domain_add_creates_domain_postmaster_mailbox_and_aliases(
    cli: Cli,
) -> None:
    done = cli(
        "domain", "add", "New.TEST", "--postmaster", "Admin@New.Test", stdin="s3cret\n"
    )

    assert done.returncode == 0, done
    assert done.stdout == (
        "added domain new.test\n"
        "added mailbox Admin@new.test (local)\n"
        "added alias postmaster@new.test -> Admin@new.test\n"
        "added alias abuse@new.test -> Admin@new.test\n"
    )
    directory = cli.load().directory
    assert list(directory.domains) == ["example.test", "new.test"]
    admin = directory.mailboxes["admin@new.test"]
    assert admin.mode == "local"
    assert verify_password(admin.password_hash, "s3cret")
    assert directory.aliases["postmaster@new.test"] == ("admin@new.test",)
    assert directory.aliases["abuse@new.test"] == ("admin@new.test",)
    assert "s3cret" not in cli.text()
    assert "s3cret" not in done.stdout + done.stderr
    assert admin.password_hash not in done.stdout + done.stderr


def test_domain_add_with_a_postmaster_elsewhere_asks_no_password(
    cli: Cli,
) -> None:
    output = cli.ok("domain", "add", "new.test", "--postmaster", "alice@example.test")

    assert output == (
        "added domain new.test\n"
        "added alias postmaster@new.test -> alice@example.test\n"
        "added alias abuse@new.test -> alice@example.test\n"
    )
    directory = cli.load().directory
    assert len(directory.mailboxes) == 2
    assert directory.aliases["abuse@new.test"] == ("alice@example.test",)


def test_domain_add_postmaster_mailbox_is_not_also_an_alias(
    cli: Cli,
) -> None:
    cli.ok(
        "domain", "add", "new.test", "--postmaster", "postmaster@new.test", stdin="x\n"
    )

    directory = cli.load().directory
    assert "postmaster@new.test" in directory.mailboxes
    assert directory.aliases["abuse@new.test"] == ("postmaster@new.test",)


def test_domain_add_refuses_an_existing_domain(cli: Cli) -> None:
    assert cli.refused(
        "domain", "add", "Example.TEST", "--postmaster", "alice@example.test"
    ) == ("powermail: domain example.test already exists\n")


def test_domain_add_refuses_a_postmaster_in_another_unknown_domain(
    cli: Cli,
) -> None:
    assert cli.refused(
        "domain", "add", "new.test", "--postmaster", "pm@elsewhere.test"
    ) == ("powermail: pm@elsewhere.test is not in a configured domain\n")


def test_domain_add_refuses_a_postmaster_that_does_not_exist(
    cli: Cli,
) -> None:
    assert cli.refused(
        "domain", "add", "new.test", "--postmaster", "carol@example.test"
    ) == ("powermail: carol@example.test is not a mailbox or alias\n")


def test_domain_add_refuses_an_invalid_name(cli: Cli) -> None:
    assert cli.refused(
        "domain", "add", "bad_name.test", "--postmaster", "alice@example.test"
    ) == (
        "powermail: invalid domain 'bad_name.test': invalid domain label 'bad_name'\n"
    )


def test_domain_add_refuses_an_empty_password(cli: Cli) -> None:
    assert cli.refused(
        "domain", "add", "new.test", "--postmaster", "pm@new.test", stdin=""
    ) == ("powermail: empty password refused\n")


def test_domain_remove_drops_its_entries_and_targets_pointing_into_it(
    cli: Cli,
) -> None:
    cli.ok("domain", "add", "new.test", "--postmaster", "pm@new.test", stdin="a\n")
    cli.ok("mailbox", "add", "carol@new.test", stdin="b\n")
    cli.ok("alias", "add", "abuse@example.test", "carol@new.test")
    cli.ok("alias", "add", "sales@example.test", "carol@new.test")

    output = cli.ok("domain", "remove", "new.test")

    assert output == (
        "removed domain new.test with 2 mailboxes and 2 aliases\n"
        "removed alias sales@example.test\n"
        "abuse@example.test no longer goes to carol@new.test\n"
        "mail stored on disk for new.test was left in place\n"
    )
    directory = cli.load().directory
    assert list(directory.domains) == ["example.test"]
    assert list(directory.mailboxes) == ["alice@example.test", "bob@example.test"]
    assert dict(directory.aliases) == {
        "postmaster@example.test": ("alice@example.test",),
        "abuse@example.test": ("alice@example.test",),
    }


def test_domain_remove_refuses_to_empty_another_domains_abuse(
    cli: Cli,
) -> None:
    cli.ok("domain", "add", "new.test", "--postmaster", "pm@new.test", stdin="a\n")
    cli.ok("alias", "add", "abuse@example.test", "pm@new.test")
    cli.ok("alias", "remove", "abuse@example.test", "alice@example.test")

    assert cli.refused("domain", "remove", "new.test") == (
        "powermail: removing domain new.test would leave abuse@example.test "
        "without a target\n"
    )


def test_domain_remove_refuses_an_unknown_domain(cli: Cli) -> None:
    assert cli.refused("domain", "remove", "nope.test") == (
        "powermail: no such domain nope.test\n"
    )


def test_domain_remove_refuses_the_last_domain(cli: Cli) -> None:
    assert cli.refused("domain", "remove", "example.test") == (
        f"powermail: {cli.path}: domains: at least one domain must be configured\n"
    )


def test_domain_list_prints_one_domain_a_line(cli: Cli) -> None:
    assert cli.ok("domain", "list") == "example.test\n"

    cli.ok("domain", "add", "Zed.Test", "--postmaster", "alice@example.test")

    assert cli.ok("domain", "list") == "example.test\nzed.test\n"


# -- mailbox ------------------------------------------------------------------


def test_mailbox_add_stores_a_verifiable_hash_of_stdins_first_line(
    cli: Cli,
) -> None:
    done = cli("mailbox", "add", "carol@example.test", stdin="s3cret\nignored\n")

    assert done.returncode == 0, done
    assert done.stdout == "added mailbox carol@example.test (local)\n"
    assert done.stderr == ""
    carol = cli.load().directory.mailboxes["carol@example.test"]
    assert carol.mode == "local"
    assert verify_password(carol.password_hash, "s3cret")
    assert f'password = "{carol.password_hash}"' in cli.text()
    assert "s3cret" not in cli.text()
    assert carol.password_hash not in done.stdout


def test_mailbox_password_keeps_everything_but_the_newline(
    cli: Cli,
) -> None:
    cli.ok("mailbox", "add", "carol@example.test", stdin=" two words \r\n")

    password_hash = password_of(cli, "carol@example.test")
    assert verify_password(password_hash, " two words ")


def test_mailbox_password_without_a_final_newline_is_whole(
    cli: Cli,
) -> None:
    cli.ok("mailbox", "add", "carol@example.test", stdin="no-newline")

    assert verify_password(password_of(cli, "carol@example.test"), "no-newline")


def test_mailbox_add_normalises_the_domain_and_compares_without_case(
    cli: Cli,
) -> None:
    cli.ok("mailbox", "add", "Carol@EXAMPLE.test", stdin="x\n")

    assert '[mailboxes."Carol@example.test"]' in cli.text()
    assert cli.refused("mailbox", "add", "CAROL@example.test") == (
        "powermail: CAROL@example.test is already a mailbox\n"
    )


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("bob@example.test", "bob@example.test is already a mailbox"),
        ("Postmaster@example.test", "Postmaster@example.test is already an alias"),
        ("carol@nope.test", "no such domain nope.test"),
        ("carol", "invalid address 'carol': address has no domain"),
        ("carol@[192.0.2.1]", "'carol@[192.0.2.1]' needs a domain name"),
    ],
)
def test_mailbox_add_refusals(cli: Cli, address: str, message: str) -> None:
    assert cli.refused("mailbox", "add", address) == f"powermail: {message}\n"


def test_mailbox_add_refuses_an_empty_password(cli: Cli) -> None:
    assert cli.refused("mailbox", "add", "carol@example.test", stdin="\n") == (
        "powermail: empty password refused\n"
    )


def test_mailbox_add_is_refused_when_the_loader_refuses_the_result(
    cli: Cli,
) -> None:
    assert cli.refused("mailbox", "add", "a/b@example.test") == (
        f'powermail: {cli.path}: mailboxes."a/b@example.test": '
        "local part may not contain '/' or start with '.'\n"
    )


def test_mailbox_remove_takes_it_out_of_aliases(cli: Cli) -> None:
    cli.ok("alias", "add", "team@example.test", "alice@example.test")
    cli.ok("alias", "add", "team@example.test", "bob@example.test")
    cli.ok("alias", "add", "bobby@example.test", "bob@example.test")

    output = cli.ok("mailbox", "remove", "Bob@Example.test")

    assert output == (
        "removed mailbox bob@example.test\n"
        "removed alias bobby@example.test\n"
        "team@example.test no longer goes to bob@example.test\n"
        "mail stored on disk for bob@example.test was left in place\n"
    )
    directory = cli.load().directory
    assert list(directory.mailboxes) == ["alice@example.test"]
    assert directory.aliases["team@example.test"] == ("alice@example.test",)
    assert "bobby@example.test" not in directory.aliases


def test_mailbox_remove_refuses_to_leave_postmaster_without_a_target(
    cli: Cli,
) -> None:
    assert cli.refused("mailbox", "remove", "alice@example.test") == (
        "powermail: removing alice@example.test would leave postmaster@example.test "
        "without a target\n"
    )


def test_mailbox_remove_refuses_when_an_emptied_alias_empties_abuse(
    cli: Cli,
) -> None:
    cli.ok("alias", "add", "team@example.test", "bob@example.test")
    cli.ok("alias", "add", "abuse@example.test", "team@example.test")
    cli.ok("alias", "remove", "abuse@example.test", "alice@example.test")

    assert cli.refused("mailbox", "remove", "bob@example.test") == (
        "powermail: removing bob@example.test would leave abuse@example.test "
        "without a target\n"
    )


def test_mailbox_remove_refuses_the_catch_all(cli: Cli) -> None:
    text = cli.text().replace(
        '[domains."example.test"]\n',
        '[domains."example.test"]\ncatch_all = "bob@example.test"\n',
    )
    cli.path.write_text(text)

    assert cli.refused("mailbox", "remove", "bob@example.test") == (
        "powermail: bob@example.test is the catch_all of example.test; "
        'change domains."example.test".catch_all first\n'
    )


def test_mailbox_remove_refuses_an_unknown_mailbox(cli: Cli) -> None:
    assert cli.refused("mailbox", "remove", "carol@example.test") == (
        "powermail: no such mailbox carol@example.test\n"
    )


def test_mailbox_list_prints_address_and_mode(cli: Cli) -> None:
    cli.ok("domain", "add", "new.test", "--postmaster", "pm@new.test", stdin="a\n")

    assert cli.ok("mailbox", "list") == (
        "alice@example.test  local\nbob@example.test    local\npm@new.test         local\n"
    )
    assert cli.ok("mailbox", "list", "New.Test") == "pm@new.test  local\n"


def test_mailbox_list_refuses_an_unknown_domain(cli: Cli) -> None:
    assert cli.refused("mailbox", "list", "nope.test") == (
        "powermail: no such domain nope.test\n"
    )


def test_mailbox_passwd_replaces_the_hash(cli: Cli) -> None:
    done = cli("mailbox", "passwd", "bob@example.test", stdin="new-pass\n")

    assert (done.returncode, done.stdout) == (
        0,
        "changed the password of bob@example.test\n",
    )
    password_hash = password_of(cli, "bob@example.test")
    assert verify_password(password_hash, "new-pass")
    assert not verify_password(password_hash, "bob-demo")
    assert "new-pass" not in cli.text()
    assert password_hash not in done.stdout + done.stderr


def test_mailbox_passwd_refuses_an_unknown_mailbox(cli: Cli) -> None:
    assert cli.refused("mailbox", "passwd", "carol@example.test") == (
        "powermail: no such mailbox carol@example.test\n"
    )


def test_mailbox_passwd_refuses_an_empty_password(cli: Cli) -> None:
    assert cli.refused("mailbox", "passwd", "bob@example.test", stdin="") == (
        "powermail: empty password refused\n"
    )


def on_terminal(cli: Cli, *args: str, answers: list[str]) -> tuple[int, str]:
    """Run with a terminal as stdin, typing each answer after its prompt.

    A new session has no /dev/tty, so getpass prompts on stderr and reads
    the terminal given as stdin.  Returns the exit status and stderr.
    """
    master, slave = os.openpty()
    process = subprocess.Popen(
        [sys.executable, "-m", "powermail.cli", "-c", str(cli.path), *args],
        stdin=slave,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
        env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    os.close(slave)
    stderr = b""
    try:
        for prompt, answer in zip(
            ["New password for ", "Repeat it: "], answers, strict=True
        ):
            deadline = time.monotonic() + 30
            while prompt.encode() not in stderr.rsplit(b"\n", 1)[-1]:
                ready, _, _ = select.select(
                    [process.stderr], [], [], deadline - time.monotonic()
                )
                assert ready, f"no prompt {prompt!r} in {stderr!r}"
                stderr += os.read(process.stderr.fileno(), 1024)
            os.write(master, answer.encode() + b"\n")
        rest = process.communicate(timeout=30)[1]
    finally:
        os.close(master)
        if process.poll() is None:
            process.kill()
            process.wait()
    return process.returncode, (stderr + rest).decode()


def test_mailbox_passwd_on_a_terminal_asks_twice(cli: Cli) -> None:
    status, stderr = on_terminal(
        cli,
        "mailbox",
        "passwd",
        "bob@example.test",
        answers=["tty-pass", "tty-pass"],
    )

    assert status == 0, stderr
    assert stderr.startswith("New password for bob@example.test: ")
    assert "tty-pass" not in stderr
    assert verify_password(password_of(cli, "bob@example.test"), "tty-pass")


def test_mailbox_add_on_a_terminal_refuses_differing_passwords(
    cli: Cli,
) -> None:
    before = cli.path.read_bytes()

    status, stderr = on_terminal(
        cli, "mailbox", "add", "carol@example.test", answers=["one", "two"]
    )

    assert status == 1
    assert stderr.endswith("\npowermail: the two passwords differ\n")
    assert cli.path.read_bytes() == before


# -- Redirect mailboxes and catch-alls -------------------------------------------

HOP = "[mx.other.test]:2525"


def mailbox_table(cli: Cli, address: str) -> str:
    """The lines of ``address``'s table in the file, up to the next header."""
    text = cli.text()
    start = text.index(f'[mailboxes."{address}"]\n')
    end = text.find("\n[", start + 1)
    return text[start : end if end >= 0 else len(text)]


def redirect_catch_all(cli: Cli, address: str = "bob@example.test") -> None:
    """Make ``address`` a redirect mailbox and example.test's verifying catch-all."""
    cli.ok(
        *("mailbox", "set", address, "--mode", "redirect", "--next-hop", HOP),
        *("--catch-all", "--verify-recipients"),
    )


def test_redirect_add_needs_a_next_hop(cli: Cli) -> None:
    assert cli.refused(
        "mailbox", "add", "carol@example.test", "--mode", "redirect", status=2
    ) == (
        "powermail: mailbox add: a redirect mailbox needs --next-hop HOP "
        "(see 'powermail mailbox add --help')\n"
    )


def test_local_add_refuses_a_next_hop(cli: Cli) -> None:
    assert cli.refused(
        "mailbox", "add", "carol@example.test", "--next-hop", HOP, status=2
    ) == (
        "powermail: mailbox add: --next-hop and --next-hop-tls need --mode redirect "
        "(see 'powermail mailbox add --help')\n"
    )


def test_redirect_add_stores_the_next_hop_and_no_password(cli: Cli) -> None:
    done = cli(
        *("mailbox", "add", "carol@example.test", "--mode", "redirect"),
        *("--next-hop", HOP),
        stdin="not-read\n",
    )

    assert (done.returncode, done.stderr) == (0, ""), done
    assert done.stdout == f"added mailbox carol@example.test (redirect to {HOP})\n"
    carol = cli.load().directory.mailboxes["carol@example.test"]
    assert (carol.mode, carol.next_hop, carol.next_hop_tls) == (
        "redirect",
        HOP,
        "opportunistic",
    )
    assert carol.password_hash is None
    assert mailbox_table(cli, "carol@example.test") == (
        f'[mailboxes."carol@example.test"]\nmode = "redirect"\nnext_hop = "{HOP}"\n'
    )


def test_redirect_add_writes_a_tls_policy_other_than_the_default(cli: Cli) -> None:
    output = cli.ok(
        *("mailbox", "add", "carol@example.test", "--mode", "redirect"),
        *("--next-hop", "mx.other.test", "--next-hop-tls", "required"),
    )

    assert output == (
        "added mailbox carol@example.test (redirect to mx.other.test, TLS required)\n"
    )
    assert 'next_hop_tls = "required"\n' in mailbox_table(cli, "carol@example.test")
    carol = cli.load().directory.mailboxes["carol@example.test"]
    assert carol.next_hop_tls == "required"


def test_redirect_add_with_password_reads_one(cli: Cli) -> None:
    cli.ok(
        *("mailbox", "add", "carol@example.test", "--mode", "redirect"),
        *("--next-hop", HOP, "--password"),
        stdin="s3cret\n",
    )

    assert verify_password(password_of(cli, "carol@example.test"), "s3cret")


def test_redirect_add_passes_on_the_loaders_next_hop_refusal(cli: Cli) -> None:
    assert cli.refused(
        *("mailbox", "add", "carol@example.test", "--mode", "redirect"),
        *("--next-hop", "mx.other.test:99999"),
    ) == (
        f'powermail: {cli.path}: mailboxes."carol@example.test".next_hop: '
        "'mx.other.test:99999': next hop 'mx.other.test:99999' has a bad port "
        "'99999'\n"
    )


def test_set_makes_a_local_mailbox_redirect(cli: Cli) -> None:
    output = cli.ok(
        *("mailbox", "set", "Bob@Example.test", "--mode", "redirect"),
        *("--next-hop", HOP, "--next-hop-tls", "none"),
    )

    assert output == (
        "changed the mode of bob@example.test to redirect\n"
        f"changed the next hop of bob@example.test to {HOP}\n"
        "changed the next hop TLS policy of bob@example.test to none\n"
    )
    bob = cli.load().directory.mailboxes["bob@example.test"]
    assert (bob.mode, bob.next_hop, bob.next_hop_tls) == ("redirect", HOP, "none")
    # The password is kept: only what was given changes.
    assert verify_password(bob.password_hash, "bob-demo")


def test_set_makes_a_redirect_mailbox_local_and_drops_its_next_hop(
    cli: Cli,
) -> None:
    original = mailbox_table(cli, "bob@example.test")
    redirect_catch_all(cli)
    cli.ok("mailbox", "set", "bob@example.test", "--next-hop-tls", "required")

    output = cli.ok("mailbox", "set", "bob@example.test", "--mode", "local")

    assert output == (
        "changed the mode of bob@example.test to local\n"
        "removed the next hop of bob@example.test\n"
        "removed the next hop TLS policy of bob@example.test\n"
        "bob@example.test no longer verifies recipients\n"
    )
    bob = cli.load().directory.mailboxes["bob@example.test"]
    assert (bob.mode, bob.next_hop, bob.verify_recipients) == ("local", None, False)
    assert mailbox_table(cli, "bob@example.test") == original
    # A local mailbox may stay the catch-all.
    assert cli.load().directory.domains["example.test"].catch_all == (
        "bob@example.test"
    )


def test_set_changes_only_what_is_given(cli: Cli) -> None:
    redirect_catch_all(cli)
    before = cli.text()

    assert cli.ok("mailbox", "set", "bob@example.test", "--next-hop", "mx2.test") == (
        "changed the next hop of bob@example.test to mx2.test\n"
    )
    assert cli.text() == before.replace(HOP, "mx2.test")


def test_set_default_tls_policy_leaves_the_key_out(cli: Cli) -> None:
    redirect_catch_all(cli)
    cli.ok("mailbox", "set", "bob@example.test", "--next-hop-tls", "required")

    output = cli.ok(
        "mailbox", "set", "bob@example.test", "--next-hop-tls", "opportunistic"
    )

    assert output == (
        "changed the next hop TLS policy of bob@example.test to opportunistic\n"
    )
    assert "next_hop_tls" not in cli.text()


def test_set_reports_when_nothing_changes(cli: Cli) -> None:
    assert cli.ok("mailbox", "set", "bob@example.test", "--mode", "local") == (
        "bob@example.test already has those settings\n"
    )
    assert cli.ok("mailbox", "set", "bob@example.test", "--no-catch-all") == (
        "bob@example.test already has those settings\n"
    )


def test_set_without_a_change_is_a_usage_error(cli: Cli) -> None:
    assert cli.refused("mailbox", "set", "bob@example.test", status=2) == (
        "powermail: mailbox set: nothing to change: give --mode, --next-hop, "
        "--next-hop-tls, --[no-]catch-all or --[no-]verify-recipients "
        "(see 'powermail mailbox set --help')\n"
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--mode", "redirect"],
            "bob@example.test needs a next hop to be a redirect mailbox",
        ),
        (
            ["--next-hop", HOP],
            "only a redirect mailbox has a next hop, and bob@example.test is local",
        ),
        (
            ["--next-hop-tls", "required"],
            "only a redirect mailbox has a next hop TLS policy, and "
            "bob@example.test is local",
        ),
        (
            ["--catch-all", "--verify-recipients"],
            "only a redirect mailbox has recipient verification, and "
            "bob@example.test is local",
        ),
        (["--mode", "redirect", "--next-hop", ""], "the next hop may not be empty"),
        (["--mode", "redirect", "--next-hop", " "], "the next hop may not be empty"),
    ],
)
def test_set_refusals_on_a_local_mailbox(
    cli: Cli, args: list[str], message: str
) -> None:
    assert cli.refused("mailbox", "set", "bob@example.test", *args) == (
        f"powermail: {message}\n"
    )


def test_set_local_refuses_a_next_hop_of_a_redirect_mailbox(cli: Cli) -> None:
    redirect_catch_all(cli)

    assert cli.refused(
        "mailbox", "set", "bob@example.test", "--mode", "local", "--next-hop", HOP
    ) == (
        "powermail: only a redirect mailbox has a next hop, and bob@example.test "
        "would be local\n"
    )


def test_set_refuses_an_unknown_mailbox(cli: Cli) -> None:
    assert cli.refused("mailbox", "set", "carol@example.test", "--catch-all") == (
        "powermail: no such mailbox carol@example.test\n"
    )


def test_catch_all_is_set_and_removed(cli: Cli) -> None:
    original = cli.text()

    assert cli.ok("mailbox", "set", "bob@example.test", "--catch-all") == (
        "bob@example.test is now the catch-all of example.test\n"
    )
    assert cli.load().directory.domains["example.test"].catch_all == (
        "bob@example.test"
    )
    assert '[domains."example.test"]\ncatch_all = "bob@example.test"\n' in cli.text()

    assert cli.ok("mailbox", "set", "bob@example.test", "--no-catch-all") == (
        "bob@example.test is no longer the catch-all of example.test\n"
    )
    assert cli.load().directory.domains["example.test"].catch_all is None
    assert cli.text() == original


def test_catch_all_moves_from_one_mailbox_to_another(cli: Cli) -> None:
    redirect_catch_all(cli)

    output = cli.ok("mailbox", "set", "alice@example.test", "--catch-all")

    assert output == (
        "alice@example.test is now the catch-all of example.test, "
        "replacing bob@example.test\n"
        "bob@example.test no longer verifies recipients\n"
    )
    directory = cli.load().directory
    assert directory.domains["example.test"].catch_all == "alice@example.test"
    assert not directory.mailboxes["bob@example.test"].verify_recipients
    assert cli.text().count("catch_all") == 1
    assert "verify_recipients" not in cli.text()


def test_no_catch_all_leaves_another_mailboxs_role(cli: Cli) -> None:
    redirect_catch_all(cli)
    before = cli.text()

    assert cli.ok("mailbox", "set", "alice@example.test", "--no-catch-all") == (
        "alice@example.test already has those settings\n"
    )
    assert cli.text() == before


def test_no_catch_all_also_stops_verifying_recipients(cli: Cli) -> None:
    redirect_catch_all(cli)

    assert cli.ok("mailbox", "set", "bob@example.test", "--no-catch-all") == (
        "bob@example.test is no longer the catch-all of example.test\n"
        "bob@example.test no longer verifies recipients\n"
    )
    bob = cli.load().directory.mailboxes["bob@example.test"]
    assert (bob.mode, bob.verify_recipients) == ("redirect", False)


def test_verify_recipients_is_set_and_removed_on_a_redirect_catch_all(
    cli: Cli,
) -> None:
    output = cli.ok(
        *("mailbox", "set", "bob@example.test", "--mode", "redirect"),
        *("--next-hop", HOP, "--catch-all", "--verify-recipients"),
    )

    assert output.splitlines()[-2:] == [
        "bob@example.test is now the catch-all of example.test",
        "bob@example.test now verifies recipients at its next hop",
    ]
    assert cli.load().directory.mailboxes["bob@example.test"].verify_recipients
    assert "verify_recipients = true\n" in mailbox_table(cli, "bob@example.test")

    assert cli.ok("mailbox", "set", "bob@example.test", "--no-verify-recipients") == (
        "bob@example.test no longer verifies recipients\n"
    )
    assert "verify_recipients" not in cli.text()


def test_verify_recipients_is_refused_on_a_redirect_that_is_not_catch_all(
    cli: Cli,
) -> None:
    cli.ok(
        *("mailbox", "set", "bob@example.test", "--mode", "redirect"),
        *("--next-hop", HOP),
    )

    assert cli.refused("mailbox", "set", "bob@example.test", "--verify-recipients") == (
        f'powermail: {cli.path}: mailboxes."bob@example.test".verify_recipients: '
        "applies only to a domain's catch-all in redirect mode\n"
    )


def test_redirect_and_catch_all_edits_keep_every_comment(cli: Cli) -> None:
    original = comments(cli.text())
    demo = "# Demo passwords (see README.md): alice-demo and bob-demo.\n"

    cli.ok(
        *("mailbox", "add", "carol@example.test", "--mode", "redirect"),
        *("--next-hop", HOP, "--next-hop-tls", "required"),
    )
    redirect_catch_all(cli, "carol@example.test")
    assert demo + '[mailboxes."alice@example.test"]\n' in cli.text()
    cli.ok("mailbox", "set", "alice@example.test", "--catch-all")
    cli.ok(
        "mailbox", "set", "alice@example.test", "--mode", "redirect", "--next-hop", HOP
    )
    cli.ok("mailbox", "set", "alice@example.test", "--mode", "local", "--no-catch-all")
    cli.ok("mailbox", "remove", "carol@example.test")

    assert comments(cli.text()) == original
    assert demo + '[mailboxes."alice@example.test"]\n' in cli.text()


def test_mailbox_list_shows_next_hop_and_catch_all(cli: Cli) -> None:
    cli.ok(
        *("mailbox", "add", "carol@example.test", "--mode", "redirect"),
        *("--next-hop", "mx.other.test", "--next-hop-tls", "required"),
    )
    redirect_catch_all(cli)

    assert cli.ok("mailbox", "list") == (
        "alice@example.test  local\n"
        f"bob@example.test    redirect to {HOP}, catch-all, verifies recipients\n"
        "carol@example.test  redirect to mx.other.test, TLS required\n"
    )

    cli.ok("mailbox", "set", "alice@example.test", "--catch-all")

    assert cli.ok("mailbox", "list").splitlines()[:2] == [
        "alice@example.test  local, catch-all",
        f"bob@example.test    redirect to {HOP}",
    ]


# -- alias --------------------------------------------------------------------


def test_alias_add_creates_then_extends_an_alias(cli: Cli) -> None:
    assert cli.ok("alias", "add", "Sales@example.test", "alice@example.test") == (
        "added alias Sales@example.test -> alice@example.test\n"
    )
    assert cli.ok("alias", "add", "sales@example.test", "BOB@example.test") == (
        "Sales@example.test now also goes to BOB@example.test\n"
    )

    directory = cli.load().directory
    assert directory.aliases["sales@example.test"] == (
        "alice@example.test",
        "bob@example.test",
    )


def test_alias_may_point_to_another_alias(cli: Cli) -> None:
    cli.ok("alias", "add", "sales@example.test", "postmaster@example.test")

    mailboxes = cli.load().directory.expand("sales@example.test")
    assert [mailbox.key for mailbox in mailboxes] == ["alice@example.test"]


@pytest.mark.parametrize(
    ("alias", "target", "message"),
    [
        ("bob@example.test", "alice@example.test", "bob@example.test is a mailbox"),
        (
            "postmaster@example.test",
            "alice@example.test",
            "postmaster@example.test already goes to alice@example.test",
        ),
        (
            "sales@example.test",
            "nobody@example.test",
            "nobody@example.test is not a mailbox or alias",
        ),
        (
            "sales@example.test",
            "someone@elsewhere.test",
            "someone@elsewhere.test is not in a configured domain",
        ),
        ("sales@nope.test", "alice@example.test", "no such domain nope.test"),
        (
            "postmaster@example.test",
            "postmaster@example.test",
            "postmaster@example.test cannot go to itself",
        ),
    ],
)
def test_alias_add_refusals(cli: Cli, alias: str, target: str, message: str) -> None:
    assert cli.refused("alias", "add", alias, target) == f"powermail: {message}\n"


def test_alias_add_refuses_a_loop(cli: Cli) -> None:
    cli.ok("alias", "add", "a@example.test", "alice@example.test")
    cli.ok("alias", "add", "b@example.test", "a@example.test")

    assert cli.refused("alias", "add", "a@example.test", "b@example.test") == (
        f'powermail: {cli.path}: aliases."a@example.test": '
        "alias chain from a@example.test is too long or loops\n"
    )


def test_alias_remove_takes_out_one_target(cli: Cli) -> None:
    cli.ok("alias", "add", "postmaster@example.test", "bob@example.test")

    assert cli.ok(
        "alias", "remove", "postmaster@example.test", "alice@example.test"
    ) == ("postmaster@example.test no longer goes to alice@example.test\n")
    directory = cli.load().directory
    assert directory.aliases["postmaster@example.test"] == ("bob@example.test",)


def test_alias_remove_drops_an_emptied_alias(cli: Cli) -> None:
    cli.ok("alias", "add", "sales@example.test", "bob@example.test")
    cli.ok("alias", "add", "leads@example.test", "sales@example.test")

    output = cli.ok("alias", "remove", "sales@example.test", "bob@example.test")

    assert output == (
        "removed alias sales@example.test\nremoved alias leads@example.test\n"
    )
    aliases = cli.load().directory.aliases
    assert "sales@example.test" not in aliases
    assert "leads@example.test" not in aliases


@pytest.mark.parametrize(
    ("alias", "target", "message"),
    [
        (
            "postmaster@example.test",
            "alice@example.test",
            "that would leave postmaster@example.test without a target",
        ),
        (
            "abuse@example.test",
            "alice@example.test",
            "that would leave abuse@example.test without a target",
        ),
        (
            "sales@example.test",
            "alice@example.test",
            "no such alias sales@example.test",
        ),
        (
            "postmaster@example.test",
            "bob@example.test",
            "postmaster@example.test does not go to bob@example.test",
        ),
    ],
)
def test_alias_remove_refusals(cli: Cli, alias: str, target: str, message: str) -> None:
    assert cli.refused("alias", "remove", alias, target) == (f"powermail: {message}\n")


# -- Writing ------------------------------------------------------------------


def test_edit_replaces_the_file_and_leaves_no_temporary_file(
    cli: Cli,
) -> None:
    inode = cli.path.stat().st_ino

    cli.ok("alias", "add", "sales@example.test", "bob@example.test")

    assert cli.path.stat().st_ino != inode
    assert sorted(os.listdir(cli.path.parent)) == ["powermail.toml"]


def test_refused_edit_leaves_no_temporary_file(cli: Cli) -> None:
    cli.refused("alias", "add", "a@example.test", "a@example.test")
    cli.refused("mailbox", "add", "a/b@example.test")

    assert sorted(os.listdir(cli.path.parent)) == ["powermail.toml"]


def test_edits_of_one_file_wait_for_each_other(cli: Cli) -> None:
    folder = os.open(cli.path.parent, os.O_RDONLY)
    fcntl.flock(folder, fcntl.LOCK_EX)
    try:
        process = subprocess.Popen(
            [sys.executable, "-m", "powermail.cli", "-c", str(cli.path)]
            + ["alias", "add", "sales@example.test", "bob@example.test"],
            stdout=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
        )
        time.sleep(1)
        assert process.poll() is None
        assert "sales@example.test" not in cli.text()
    finally:
        os.close(folder)

    assert process.wait(timeout=30) == 0
    assert "sales@example.test" in cli.load().directory.aliases


def test_edit_keeps_the_file_mode(cli: Cli) -> None:
    cli.path.chmod(0o640)

    cli.ok("mailbox", "add", "carol@example.test", stdin="x\n")

    assert stat.S_IMODE(cli.path.stat().st_mode) == 0o640


def test_edit_through_a_symlink_keeps_the_link(cli: Cli) -> None:
    real = cli.path.with_name("real.toml")
    cli.path.rename(real)
    cli.path.symlink_to(real.name)

    cli.ok("alias", "add", "sales@example.test", "bob@example.test")

    assert cli.path.is_symlink()
    assert "sales@example.test" in real.read_text()


def test_no_hash_is_ever_printed(cli: Cli) -> None:
    runs = [
        cli("domain", "add", "new.test", "--postmaster", "pm@new.test", stdin="a\n"),
        cli("mailbox", "add", "carol@example.test", stdin="b\n"),
        cli("mailbox", "passwd", "carol@example.test", stdin="c\n"),
        cli("mailbox", "list"),
        cli("check"),
        cli("domain", "remove", "new.test"),
    ]

    for done in runs:
        assert done.returncode == 0, done
        assert "$argon2" not in done.stdout + done.stderr
