"""``powermail queue ...``: the command's half of the control socket protocol.

The command runs as a real process against a small stand-in for the server:
a UNIX socket server in a thread that records each request line and answers
with a canned line.  What is pinned here is what the command sends, how it
prints each answer and how it reports a server that is not there or says no.
The real server's half is tested end to end elsewhere.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import socketserver
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
DEFAULT = REPO / "conf" / "powermail.toml"


def greylisted(now: float) -> dict[str, Any]:
    """A message two attempts in, one recipient delivered, one greylisted."""
    return {
        "id": "a1b2c3",
        "sender": "alice@example.test",
        "size": 2150,
        "created": now - (3 * 3600 + 12 * 60 + 20),
        "next_attempt": now + (4 * 60 + 40),
        "attempts": 2,
        "held": False,
        "recipients": [
            {
                "address": "bob@other.test",
                "next_hop": "other.test",
                "state": "pending",
                "last": "451 4.7.1 greylisted, try later",
                "remote_mta": None,
                "tls": "opportunistic",
            },
            {
                "address": "carol@other.test",
                "next_hop": "other.test",
                "state": "delivered",
                "last": "250 2.0.0 queued as 77",
                "remote_mta": "mx.other.test",
                "tls": "opportunistic",
            },
        ],
    }


def held_bounce(now: float) -> dict[str, Any]:
    """A held delivery report, due now, to two recipients."""
    return {
        "id": "d4e5f6",
        "sender": "",
        "size": 512,
        "created": now - (45 * 60 + 20),
        "next_attempt": now - 5,
        "attempts": 0,
        "held": True,
        "recipients": [
            {"address": "dave@far.test", "next_hop": "far.test", "state": "pending"},
            {"address": "erin@far.test", "next_hop": "far.test", "state": "pending"},
        ],
    }


class FakeControl(socketserver.UnixStreamServer):
    """Answers each request line with ``answers[command]`` and records it.

    An answer is an object to send as JSON, bytes to send as they are, or
    None to hang up without answering.
    """

    def __init__(self, path: Path, answers: dict[str, Any]) -> None:
        self.answers = answers
        self.requests: list[bytes] = []
        super().__init__(str(path), _Answer)

    def start(self) -> None:
        threading.Thread(target=self.serve_forever, daemon=True).start()


class _Answer(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        line = self.rfile.readline()
        self.server.requests.append(line)
        answer = self.server.answers[json.loads(line)["command"]]
        if answer is None:
            return
        if not isinstance(answer, bytes):
            answer = json.dumps(answer).encode("utf-8") + b"\n"
        self.wfile.write(answer)


class Site:
    """A config file whose data_dir is ``data``, and the stand-in server."""

    def __init__(self, base: Path) -> None:
        self.config = base / "powermail.toml"
        self.config.write_text(
            DEFAULT.read_text().replace('data_dir = "../var"', 'data_dir = "data"')
        )
        (base / "data").mkdir()
        self.socket = (base / "data").resolve() / "control.sock"
        self.server: FakeControl | None = None

    def serve(self, **answers: Any) -> FakeControl:
        """Start answering; keyword ``queue_list`` answers ``queue.list``."""
        self.server = FakeControl(
            self.socket,
            {name.replace("_", ".", 1): answer for name, answer in answers.items()},
        )
        self.server.start()
        return self.server

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    def run(self, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "powermail.cli", "-c", str(self.config), *args],
            capture_output=True,
            text=True,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "PYTHONPATH": str(REPO)},
            timeout=60,
        )

    def ok(self, *args: str) -> str:
        done = self.run(*args)
        assert (done.returncode, done.stderr) == (0, ""), done
        return done.stdout

    def fails(self, *args: str) -> str:
        done = self.run(*args)
        assert (done.returncode, done.stdout) == (1, ""), done
        return done.stderr


@pytest.fixture
def site(tmp_path: Path) -> Iterator[Site]:
    # A UNIX socket path holds at most 107 octets; a long tmp_path would not do.
    short = len(os.fsencode(tmp_path / "data" / "control.sock")) <= 100
    base = tmp_path if short else Path(tempfile.mkdtemp(dir="/tmp"))
    site = Site(base)
    yield site
    site.stop()
    if not short:
        shutil.rmtree(base)


def ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def request(command: str, **fields: str) -> bytes:
    """The exact line the command must send."""
    return json.dumps({"command": command, **fields}).encode() + b"\n"


def stamp(epoch: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S %z", time.localtime(epoch))


# -- list ---------------------------------------------------------------------


def test_list_prints_one_line_per_message(site: Site) -> None:
    now = time.time()
    server = site.serve(queue_list=ok([greylisted(now), held_bounce(now)]))

    output = site.ok("queue", "list")

    assert server.requests == [request("queue.list")]
    assert output == (
        "a1b2c3  2.1 KiB  age 3h12m  next in 4m        <alice@example.test>  "
        "bob@other.test\n"
        "d4e5f6  512 B    age 45m    next now    held  <>                    "
        "dave@far.test, erin@far.test\n"
    )


def test_list_leaves_out_the_held_column_when_nothing_is_held(site: Site) -> None:
    site.serve(queue_list=ok([greylisted(time.time())]))

    assert site.ok("queue", "list") == (
        "a1b2c3  2.1 KiB  age 3h12m  next in 4m  <alice@example.test>  bob@other.test\n"
    )


def test_list_of_an_empty_queue_says_so(site: Site) -> None:
    site.serve(queue_list=ok([]))

    assert site.ok("queue", "list") == "queue is empty\n"


def test_list_json_prints_the_raw_result(site: Site) -> None:
    messages = [greylisted(time.time()), held_bounce(time.time())]
    site.serve(queue_list=ok(messages))

    assert json.loads(site.ok("queue", "list", "--json")) == messages


# -- show ---------------------------------------------------------------------


def test_show_prints_every_field_and_each_recipients_state(site: Site) -> None:
    message = greylisted(time.time())
    server = site.serve(queue_show=ok(message))

    output = site.ok("queue", "show", "a1b2c3")

    assert server.requests == [request("queue.show", id="a1b2c3")]
    assert output == (
        "id: a1b2c3\n"
        "sender: <alice@example.test>\n"
        "size: 2150 octets (2.1 KiB)\n"
        f"created: {stamp(message['created'])} (3h12m ago)\n"
        f"next attempt: {stamp(message['next_attempt'])} (in 4m)\n"
        "attempts: 2\n"
        "held: no\n"
        "recipient: bob@other.test\n"
        "  next hop: other.test\n"
        "  state: pending\n"
        "  last: 451 4.7.1 greylisted, try later\n"
        "  remote mta: -\n"
        "  tls: opportunistic\n"
        "recipient: carol@other.test\n"
        "  next hop: other.test\n"
        "  state: delivered\n"
        "  last: 250 2.0.0 queued as 77\n"
        "  remote mta: mx.other.test\n"
        "  tls: opportunistic\n"
    )


def test_show_prints_fields_it_does_not_know_as_they_come(site: Site) -> None:
    message = {**held_bounce(time.time()), "delay_warned": True, "hops": [1, 2]}
    site.serve(queue_show=ok(message))

    output = site.ok("queue", "show", "d4e5f6").splitlines()

    assert output[:9] == [
        "id: d4e5f6",
        "sender: <>",
        "size: 512 octets (512 B)",
        f"created: {stamp(message['created'])} (45m ago)",
        f"next attempt: {stamp(message['next_attempt'])} (now)",
        "attempts: 0",
        "held: yes",
        "delay warned: yes",
        "hops: [1, 2]",
    ]


def test_show_json_prints_the_raw_result(site: Site) -> None:
    message = greylisted(time.time())
    site.serve(queue_show=ok(message))

    assert json.loads(site.ok("queue", "show", "a1b2c3", "--json")) == message


def test_show_of_an_unknown_message_prints_the_servers_error(site: Site) -> None:
    site.serve(queue_show={"ok": False, "error": "no queued message zz"})

    assert site.fails("queue", "show", "zz") == "powermail: no queued message zz\n"


@pytest.mark.parametrize(
    ("command", "result"),
    [
        ("list", [{"id": "a1b2c3"}]),
        ("list", {"a1b2c3": {}}),
        ("show", ["a1b2c3"]),
        ("show", {"id": "a1b2c3", "recipients": [{"state": "pending"}]}),
    ],
)
def test_an_answer_of_the_wrong_shape_is_one_error_line(
    site: Site, command: str, result: Any
) -> None:
    site.serve(**{f"queue_{command}": ok(result)})

    stderr = site.fails("queue", command, *(["a1b2c3"] if command == "show" else []))

    assert stderr == (
        f"powermail: unexpected answer from the server: {json.dumps(result)}\n"
    )


# -- retry, hold, release, delete ---------------------------------------------


def test_retry_without_id_retries_everything(site: Site) -> None:
    server = site.serve(queue_retry=ok(["a1b2c3", "d4e5f6"]))

    assert site.ok("queue", "retry") == "retrying a1b2c3\nretrying d4e5f6\n"
    assert server.requests == [request("queue.retry")]


def test_retry_of_one_message_names_it(site: Site) -> None:
    server = site.serve(queue_retry=ok(["a1b2c3"]))

    assert site.ok("queue", "retry", "a1b2c3") == "retrying a1b2c3\n"
    assert server.requests == [request("queue.retry", id="a1b2c3")]


def test_retry_of_an_empty_queue_says_so(site: Site) -> None:
    site.serve(queue_retry=ok([]))

    assert site.ok("queue", "retry") == "queue is empty\n"


@pytest.mark.parametrize(
    ("action", "done"),
    [("hold", "held"), ("release", "released"), ("delete", "deleted")],
)
def test_action_on_one_message_confirms_it(site: Site, action: str, done: str) -> None:
    server = site.serve(**{f"queue_{action}": ok("a1b2c3")})

    assert site.ok("queue", action, "a1b2c3") == f"{done} a1b2c3\n"
    assert server.requests == [request(f"queue.{action}", id="a1b2c3")]


@pytest.mark.parametrize("action", ["hold", "release", "delete", "retry"])
def test_action_refused_by_the_server_prints_its_error(site: Site, action: str) -> None:
    site.serve(**{f"queue_{action}": {"ok": False, "error": "no queued message zz"}})

    assert site.fails("queue", action, "zz") == "powermail: no queued message zz\n"


@pytest.mark.parametrize("action", ["show", "hold", "release", "delete"])
def test_action_without_id_is_a_usage_error(site: Site, action: str) -> None:
    done = site.run("queue", action)

    assert done.returncode == 2
    assert done.stderr == (
        f"powermail: queue {action}: the following arguments are required: ID "
        f"(see 'powermail queue {action} --help')\n"
    )


# -- No server, or a broken one -------------------------------------------------


def test_no_control_socket_means_the_server_is_not_running(site: Site) -> None:
    assert site.fails("queue", "list") == (
        f"powermail: the server is not running (no control socket at {site.socket})\n"
    )


def test_a_socket_nobody_listens_on_means_the_server_is_not_running(
    site: Site,
) -> None:
    # What a server that died leaves behind: the file, and no listener.
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(site.socket))
    stale.close()

    assert site.fails("queue", "retry") == (
        f"powermail: the server is not running (no control socket at {site.socket})\n"
    )


def test_server_hanging_up_without_an_answer_is_reported(site: Site) -> None:
    site.serve(queue_list=None)

    assert site.fails("queue", "list") == (
        "powermail: the server closed the connection without answering\n"
    )


def test_an_answer_that_is_not_json_is_reported(site: Site) -> None:
    site.serve(queue_list=b"garbage\n")

    assert site.fails("queue", "list") == (
        "powermail: unexpected answer from the server: b'garbage'\n"
    )


def test_a_data_dir_too_deep_for_a_unix_socket_is_reported(site: Site) -> None:
    deep = Path("/tmp") / ("d" * 120)
    text = site.config.read_text().replace('data_dir = "data"', f'data_dir = "{deep}"')
    site.config.write_text(text)

    assert site.fails("queue", "list") == (
        "powermail: control socket path too long for a UNIX socket: "
        f"{deep}/control.sock\n"
    )
