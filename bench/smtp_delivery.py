"""Messages per second through PowerMail's MX, against aiosmtpd as a yardstick.

Run by hand, never by the test suite::

    .venv/bin/python bench/smtp_delivery.py [--messages N] [--sessions 20]
        [--rounds 3]

Both servers run as separate Python processes on loopback and store every
message durably (file fsynced, renamed or linked into ``new/``, ``new/``
fsynced) before they answer 250.  The client sends the same number of 5 KiB
messages to each, alternately, for several rounds, then prints each round's
rates and the median of the PowerMail/aiosmtpd ratios.  See bench/README.md.

The same script is the aiosmtpd peer when started as
``smtp_delivery.py --peer-server PORT MAILDIR``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import queue
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from _common import (
    DOMAIN,
    HOST,
    MAILBOX,
    MESSAGE_SIZE,
    RoundResult,
    Server,
    free_port,
    log_problems,
    log_tail,
    message_template,
    powermail_argv,
    run_load,
    serve_aiosmtpd,
    start_server,
    wait_until_listening,
    which_powermail,
)

# Twisted's reactor thread pool, which runs PowerMail's fsyncs, holds at most
# ten threads; the peer's executor gets as many so neither waits on fewer.
PEER_THREADS = 10


# The aiosmtpd peer.


class DurableMaildirHandler:
    """An aiosmtpd handler that stores each message the way PowerMail does.

    The message goes to ``tmp/``, is fsynced, renamed into ``new/`` and
    ``new/`` is fsynced, all in the executor, before the 250 goes out.
    """

    def __init__(self, maildir: Path, accepted: set[str]) -> None:
        self.maildir = maildir
        self.accepted = accepted
        self._sequence = 0

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook names)
        self, server, session, envelope, address: str, rcpt_options
    ) -> str:
        """Accept only the benchmark's mailbox and its aliases."""
        if address.lower() not in self.accepted:
            return "550 5.1.1 no such user"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        """Make the message durable off the event loop, then acknowledge it."""
        data = envelope.original_content or envelope.content
        self._sequence += 1
        name = f"{time.time_ns()}.P{os.getpid()}Q{self._sequence}.peer"
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(None, self._store, name, data)
        return "250 OK"

    def _store(self, name: str, data: bytes) -> None:
        tmp = self.maildir / "tmp" / name
        with open(tmp, "xb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.rename(tmp, self.maildir / "new" / name)
        fd = os.open(self.maildir / "new", os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def run_peer(port: int, maildir: Path) -> None:
    """Serve SMTP on ``127.0.0.1:port`` with aiosmtpd until SIGTERM."""
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    accepted = {MAILBOX, f"postmaster@{DOMAIN}", f"abuse@{DOMAIN}"}
    handler = DurableMaildirHandler(maildir, accepted)

    serve_aiosmtpd(handler, name="peer", port=port, threads=PEER_THREADS)


# The server under test.


def write_config(folder: Path, port: int, sessions: int) -> Path:
    """Write a PowerMail configuration shaped like conf/powermail.toml."""
    text = f"""\
# Written by bench/smtp_delivery.py for one benchmark run.

[server]
hostname = "mx.example.test"
data_dir = "{folder / "data"}"

[tls]
certificate = ""
private_key = ""

[mx]
listen = ["{HOST}:{port}"]
max_connections_per_client = {max(sessions, 50)}

[domains."{DOMAIN}"]

[mailboxes."{MAILBOX}"]
mode = "local"

[aliases]
"postmaster@{DOMAIN}" = ["{MAILBOX}"]
"abuse@{DOMAIN}" = ["{MAILBOX}"]
"""
    path = folder / "powermail.toml"
    path.write_text(text)
    return path


def check_and_replace(new_dir: Path, expected: int) -> str | None:
    """Compare the files in ``new_dir`` with ``expected``, then start afresh.

    ``new/`` is swapped for an empty folder, as ext4 never shrinks a folder
    whose files are deleted: every round then starts with the same folder.
    Both servers look ``new/`` up by name for each message, and nothing is
    in flight between rounds.
    """
    names = os.listdir(new_dir) if new_dir.is_dir() else []
    # One file read back shows the body arrived whole, CRLF line ends kept.
    sample = (new_dir / names[0]).read_bytes() if names else b""
    body = message_template().partition(b"\r\n\r\n")[2]
    old = new_dir.with_name("new.old")
    os.rename(new_dir, old)
    new_dir.mkdir()
    shutil.rmtree(old)
    if len(names) != expected:
        return f"{new_dir} holds {len(names)} messages, {expected} were sent"
    if not sample.endswith(b"\r\n\r\n" + body):
        return f"{new_dir}/{names[0]} does not end with the body that was sent"
    return None


# The benchmark.


class RoundError(Exception):
    """A round that lost messages or saw errors from ``server``."""

    def __init__(self, server: Server, problems: list[str]) -> None:
        shown = "; ".join(p for p in problems if p)[:2000]
        super().__init__(f"{server.name}: {shown}")
        self.server = server


def _describe(result: RoundResult) -> str:
    return (
        f"{result.rate:8.1f} msg/s ({result.sent} in {result.seconds:.2f} s, "
        f"server CPU {100 * result.server_cpu / result.seconds:.0f}%, "
        f"client CPU {100 * result.client_cpu / result.seconds:.0f}%)"
    )


def benchmark(args: argparse.Namespace) -> int:
    """Start both servers, run the rounds, print the figures; 0 if all held."""
    folder = Path(tempfile.mkdtemp(prefix="powermail-bench-"))
    print(f"work folder: {folder}")
    print(f"powermail package: {which_powermail()}")
    print(
        f"{args.messages} messages of {MESSAGE_SIZE} octets per server and round, "
        f"{args.sessions} sessions, {args.rounds} rounds"
    )

    pm_port = free_port()
    peer_port = free_port(pm_port)
    config = write_config(folder, pm_port, args.sessions)
    powermail = start_server(
        "PowerMail",
        powermail_argv(config),
        port=pm_port,
        folder=folder,
        new_dir=folder / "data/mail" / DOMAIN / "bench/Maildir/new",
    )
    peer_maildir = folder / "peer/Maildir"
    peer = start_server(
        "aiosmtpd",
        [sys.executable, str(Path(__file__).resolve()), "--peer-server"]
        + [str(peer_port), str(peer_maildir)],
        port=peer_port,
        folder=folder,
        new_dir=peer_maildir / "new",
    )
    servers = (powermail, peer)

    failed = False
    ratios = []
    try:
        for server in servers:
            wait_until_listening(server)

        # One message per session first, so that Maildirs exist and both
        # processes are warm before anything is timed.
        for server in servers:
            warm = run_load(
                server, messages=args.sessions, sessions=args.sessions, tag="w"
            )
            problem = check_and_replace(server.new_dir, warm.sent)
            if warm.errors or problem or warm.sent != args.sessions:
                raise RoundError(server, [*warm.errors, problem or ""])

        for number in range(1, args.rounds + 1):
            results = {}
            for server in servers:
                result = run_load(
                    server,
                    messages=args.messages,
                    sessions=args.sessions,
                    tag=f"r{number}",
                )
                problem = check_and_replace(server.new_dir, result.sent)
                if result.errors or problem or result.sent != args.messages:
                    raise RoundError(server, [*result.errors, problem or ""])
                results[server.name] = result
            ratio = results["PowerMail"].rate / results["aiosmtpd"].rate
            ratios.append(ratio)
            print(f"round {number}:")
            print(f"  PowerMail {_describe(results['PowerMail'])}")
            print(f"  aiosmtpd  {_describe(results['aiosmtpd'])}")
            print(f"  ratio PowerMail/aiosmtpd {ratio:.3f}", flush=True)
        print(f"median ratio PowerMail/aiosmtpd: {statistics.median(ratios):.3f}")
    except (RoundError, RuntimeError, OSError, queue.Empty) as exc:
        failed = True
        sys.stdout.flush()
        print(f"FAILED: {exc}", file=sys.stderr)
        culprit = exc.server if isinstance(exc, RoundError) else None
        for server in servers:
            if culprit in (None, server):
                print(f"--- tail of {server.log_path}", file=sys.stderr)
                print(log_tail(server.log_path), file=sys.stderr)
    finally:
        for server in servers:
            code = server.stop()
            if code not in (0, -signal.SIGTERM):
                print(f"{server.name} exited with {code}", file=sys.stderr)
                failed = True

    for server in servers:
        problems = log_problems(server.log_path)
        size = len(server.log_path.read_bytes())
        print(f"{server.name} log: {size} octets, {len(problems)} warning/error lines")
        for line in problems[:10]:
            print(f"  {line}")
    if failed or args.keep:
        print(f"kept {folder}")
    else:
        shutil.rmtree(folder)
    return 1 if failed else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; ``--peer-server`` runs the aiosmtpd peer instead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--messages",
        type=int,
        default=15000,
        help="messages per server and round (default: %(default)s)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=20,
        help="parallel SMTP sessions, one process each (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds per server (default: %(default)s)"
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder and its logs"
    )
    parser.add_argument(
        "--peer-server",
        nargs=2,
        metavar=("PORT", "MAILDIR"),
        help="run only the aiosmtpd peer (the benchmark starts it this way)",
    )
    args = parser.parse_args(argv)
    if min(args.messages, args.sessions, args.rounds) < 1:
        parser.error("--messages, --sessions and --rounds must be at least 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, or the peer when asked to."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.peer_server:
        port, maildir = args.peer_server
        run_peer(int(port), Path(maildir))
        return 0
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
