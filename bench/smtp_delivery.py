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
import logging
import multiprocessing
import os
import queue
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DOMAIN = "example.test"
MAILBOX = f"bench@{DOMAIN}"
SENDER = "newsletter@sender.example"
MESSAGE_SIZE = 5 * 1024

# Twisted's reactor thread pool, which runs PowerMail's fsyncs, holds at most
# ten threads; the peer's executor gets as many so neither waits on fewer.
PEER_THREADS = 10

# Fixed-width field in the message template, replaced per message so every
# message has its own Message-ID and the size never changes.
_ID_WIDTH = 16
_ID_FIELD = b"#" * _ID_WIDTH


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
    from aiosmtpd.smtp import SMTP

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stdout,
        format="%(asctime)s [%(name)s#%(levelname)s] %(message)s",
    )
    for sub in ("cur", "new", "tmp"):
        (maildir / sub).mkdir(parents=True, exist_ok=True)
    accepted = {MAILBOX, f"postmaster@{DOMAIN}", f"abuse@{DOMAIN}"}
    handler = DurableMaildirHandler(maildir, accepted)

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        loop.set_default_executor(ThreadPoolExecutor(max_workers=PEER_THREADS))
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(
            lambda: SMTP(
                handler, hostname="peer.example.test", enable_SMTPUTF8=True, loop=loop
            ),
            HOST,
            port,
            backlog=128,
        )
        print(f"aiosmtpd peer listening on {HOST}:{port}", flush=True)
        await stop
        server.close()
        await server.wait_closed()

    asyncio.run(serve())


# The servers under test, as subprocesses.

# What the venv's ``twistd`` script does, run by this interpreter.  Not
# ``python -m twisted``: that is the newer ``twist`` runner, which knows
# neither ``-n`` nor ``--pidfile``.
_TWISTD = (
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; sys.exit(run())"
)


def free_port() -> int:
    """A TCP port on loopback that nothing listens on at the moment."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


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


def _server_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p
    )
    # Keep the checkout free of __pycache__ folders made by the servers.
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


@dataclass
class Server:
    """One running server process, its port, log file and Maildir."""

    name: str
    process: subprocess.Popen
    port: int
    log_path: Path
    new_dir: Path
    log_file: object = field(repr=False)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> int | None:
        """SIGTERM, then SIGKILL if it has not exited within 15 seconds."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log_file.close()
        return self.process.returncode


def start_server(
    name: str, argv: Sequence[str], *, port: int, folder: Path, new_dir: Path
) -> Server:
    """Start ``argv`` with its output in ``folder/<name>.log``."""
    log_path = folder / f"{name.lower()}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (closed by Server.stop)
    process = subprocess.Popen(
        argv,
        cwd=folder,
        env=_server_env(),
        stdin=subprocess.DEVNULL,
        stdout=log_file,
        stderr=subprocess.STDOUT,
    )
    return Server(name, process, port, log_path, new_dir, log_file)


def wait_until_listening(server: Server, timeout: float = 30.0) -> None:
    """Return once the server's port answers with a 220 greeting."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"{server.name} exited with {server.process.returncode} "
                f"before listening"
            )
        try:
            with socket.create_connection((HOST, server.port), timeout=2) as sock:
                if sock.recv(512).startswith(b"220"):
                    sock.sendall(b"QUIT\r\n")
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{server.name} did not listen on port {server.port}")


def log_tail(path: Path, lines: int = 30) -> str:
    """The last ``lines`` lines of a log file."""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def log_problems(path: Path) -> list[str]:
    """The lines of a log that report a warning, an error or a traceback."""
    markers = ("#warn", "#error", "#critical", "Traceback", "WARNING", "ERROR")
    lines = path.read_text(errors="replace").splitlines()
    return [line for line in lines if any(m in line for m in markers)]


# The client.


def message_template() -> bytes:
    """A realistic 5 KiB message, CRLF line ends, with a field for its id."""
    head = (
        "Received: from mail.sender.example (mail.sender.example [192.0.2.25])\r\n"
        "\tby relay.sender.example with ESMTPS id 4Xk2Lq1Bz9;\r\n"
        "\tMon, 2 Dec 2024 09:14:07 +0000\r\n"
        "DKIM-Signature: v=1; a=rsa-sha256; c=relaxed/relaxed; d=sender.example;\r\n"
        "\ts=mail; h=from:to:subject:date:message-id;\r\n"
        "\tbh=47DEQpj8HBSa+/TImW+5JCeuQeRkm5NMpJWZG3hSuFU=;\r\n"
        "\tb=dGhpcyBpcyBub3QgYSByZWFsIHNpZ25hdHVyZSwganVzdCBmaWxsZXI=\r\n"
        "From: Sender Newsletter <newsletter@sender.example>\r\n"
        f"To: Bench Mailbox <{MAILBOX}>\r\n"
        "Subject: Weekly report, delivery benchmark\r\n"
        "Date: Mon, 2 Dec 2024 09:14:05 +0000\r\n"
        f"Message-ID: <{_ID_FIELD.decode()}@sender.example>\r\n"
        "MIME-Version: 1.0\r\n"
        'Content-Type: text/plain; charset="utf-8"\r\n'
        "Content-Transfer-Encoding: 7bit\r\n"
        "\r\n"
    ).encode()
    words = (
        "the quarterly figures show steady growth in every region while costs "
        "stayed flat and the support queue shrank by a third since the summer"
    ).split()
    lines = []
    size = len(head)
    index = 0
    while True:
        line = " ".join(words[(index + k) % len(words)] for k in range(11))
        if size + len(line) + 2 > MESSAGE_SIZE:
            break
        lines.append(line)
        size += len(line) + 2
        index += 3
    # A shorter last line makes the message exactly MESSAGE_SIZE octets.
    room = MESSAGE_SIZE - size - 2
    lines.append((" ".join(words)[: room - 1].rstrip(" ") + ".").ljust(room, "."))
    message = head + "".join(f"{line}\r\n" for line in lines).encode()
    assert len(message) == MESSAGE_SIZE, len(message)
    return message


def _session_worker(
    port: int,
    count: int,
    tag: str,
    template: bytes,
    start,
    results,
) -> None:
    """One SMTP session: EHLO once, wait for the start, send ``count`` mails."""
    sent = 0
    error = None
    try:
        client = smtplib.SMTP(HOST, port, local_hostname="client.bench", timeout=60)
        client.ehlo()
    except (OSError, smtplib.SMTPException) as exc:
        results.put(("ready", tag, f"connect: {exc!r}"))
        return
    results.put(("ready", tag, None))
    start.wait()
    cpu_before = time.process_time()
    try:
        for number in range(count):
            message_id = f"{tag}.{number}".rjust(_ID_WIDTH).encode()
            client.sendmail(SENDER, [MAILBOX], template.replace(_ID_FIELD, message_id))
            sent += 1
    except (OSError, smtplib.SMTPException) as exc:
        error = f"message {sent + 1}: {exc!r}"
    end = time.perf_counter()
    cpu = time.process_time() - cpu_before
    results.put(("done", tag, sent, error, end, cpu))
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        pass


@dataclass
class RoundResult:
    """What one server did in one round."""

    sent: int
    seconds: float
    server_cpu: float
    client_cpu: float
    errors: list[str]

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def run_load(server: Server, *, messages: int, sessions: int, tag: str) -> RoundResult:
    """Send ``messages`` mails over ``sessions`` parallel connections.

    Each session is its own process, so the client is not held back by the
    GIL.  Timing starts once every session has connected and said EHLO.
    """
    context = multiprocessing.get_context("fork")
    start = context.Event()
    results = context.Queue()
    template = message_template()
    share, extra = divmod(messages, sessions)
    workers = []
    for index in range(sessions):
        count = share + (1 if index < extra else 0)
        worker = context.Process(
            target=_session_worker,
            args=(server.port, count, f"{tag}s{index}", template, start, results),
            daemon=True,
        )
        worker.start()
        workers.append(worker)

    errors = []
    for _ in workers:
        _, worker_tag, error = results.get(timeout=60)
        if error:
            errors.append(f"{worker_tag}: {error}")
    cpu_before = server.cpu_seconds()
    began = time.perf_counter()
    start.set()

    sent = 0
    ended = began
    client_cpu = 0.0
    for _ in range(len(workers) - len(errors)):
        _, worker_tag, worker_sent, error, end, cpu = results.get(timeout=900)
        sent += worker_sent
        ended = max(ended, end)
        client_cpu += cpu
        if error:
            errors.append(f"{worker_tag}: {error}")
    server_cpu = server.cpu_seconds() - cpu_before
    for worker in workers:
        worker.join(30)
    return RoundResult(sent, ended - began, server_cpu, client_cpu, errors)


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


def _which_powermail() -> str:
    """Where the server's ``powermail`` package will be imported from."""
    out = subprocess.run(
        [sys.executable, "-c", "import powermail; print(powermail.__file__)"],
        cwd=tempfile.gettempdir(),
        env=_server_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


def benchmark(args: argparse.Namespace) -> int:
    """Start both servers, run the rounds, print the figures; 0 if all held."""
    folder = Path(tempfile.mkdtemp(prefix="powermail-bench-"))
    print(f"work folder: {folder}")
    print(f"powermail package: {_which_powermail()}")
    print(
        f"{args.messages} messages of {MESSAGE_SIZE} octets per server and round, "
        f"{args.sessions} sessions, {args.rounds} rounds"
    )

    pm_port, peer_port = free_port(), free_port()
    while peer_port == pm_port:
        peer_port = free_port()
    config = write_config(folder, pm_port, args.sessions)
    powermail = start_server(
        "PowerMail",
        [sys.executable, "-c", _TWISTD, "-n", "--pidfile=", "powermail"]
        + ["--config", str(config)],
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
