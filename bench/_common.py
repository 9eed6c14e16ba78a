"""What the benchmarks in bench/ share: server processes, messages, the client.

``smtp_delivery.py`` and ``forwarding.py`` import this module by its plain
name (the folder of a script run as ``python bench/X.py`` is on
``sys.path``).  See bench/README.md.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import smtplib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"
DOMAIN = "example.test"
MAILBOX = f"bench@{DOMAIN}"
SENDER = "newsletter@sender.example"
MESSAGE_SIZE = 5 * 1024

# Fixed-width field in the message template, replaced per message so every
# message has its own Message-ID and the size never changes.
ID_WIDTH = 16
ID_FIELD = b"#" * ID_WIDTH

# A session's recipient for its message number ``number``: (session index,
# number) -> address.  None sends everything to MAILBOX.
RecipientFor = Callable[[int, int], str]


# The servers under test, as subprocesses.

# What the venv's ``twistd`` script does, run by this interpreter.  Not
# ``python -m twisted``: that is the newer ``twist`` runner, which knows
# neither ``-n`` nor ``--pidfile``.
TWISTD = (
    "import sys; from twisted.scripts.twistd import run; "
    "sys.argv[0] = 'twistd'; sys.exit(run())"
)


def powermail_argv(config: Path) -> list[str]:
    """The command line that runs PowerMail in the foreground on ``config``."""
    return [
        sys.executable,
        "-c",
        TWISTD,
        "-n",
        "--pidfile=",
        "powermail",
        "--config",
        str(config),
    ]


def free_port(*taken: int) -> int:
    """A TCP port on loopback that nothing listens on, and not in ``taken``."""
    while True:
        with socket.socket() as sock:
            sock.bind((HOST, 0))
            port = sock.getsockname()[1]
        if port not in taken:
            return port


def server_env() -> dict[str, str]:
    """The environment of a server process: the checkout first on the path."""
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
    new_dir: Path | None
    log_file: object = field(repr=False)

    def cpu_seconds(self) -> float:
        """User plus system CPU time the process has used so far."""
        fields = Path(f"/proc/{self.process.pid}/stat").read_text().rsplit(")", 1)[1]
        utime, stime = fields.split()[11:13]
        return (int(utime) + int(stime)) / os.sysconf("SC_CLK_TCK")

    def memory(self) -> dict[str, int]:
        """The process's ``Vm*``/``Rss*`` lines of /proc/PID/status, in octets."""
        sizes = {}
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.startswith(("Vm", "Rss")) and value.strip().endswith("kB"):
                sizes[key] = int(value.split()[0]) * 1024
        return sizes

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
    name: str,
    argv: Sequence[str],
    *,
    port: int,
    folder: Path,
    new_dir: Path | None = None,
) -> Server:
    """Start ``argv`` in ``folder`` with its output in ``folder/<name>.log``."""
    log_path = folder / f"{name.lower()}.log"
    log_file = open(log_path, "wb")  # noqa: SIM115 (closed by Server.stop)
    process = subprocess.Popen(
        argv,
        cwd=folder,
        env=server_env(),
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
    markers = (
        "#warn",
        "#error",
        "#critical",
        "Traceback",
        "Unhandled",
        "WARNING",
        "ERROR",
    )
    lines = path.read_text(errors="replace").splitlines()
    return [line for line in lines if any(m in line for m in markers)]


def which_powermail() -> str:
    """Where the server's ``powermail`` package will be imported from."""
    out = subprocess.run(
        [sys.executable, "-c", "import powermail; print(powermail.__file__)"],
        cwd=tempfile.gettempdir(),
        env=server_env(),
        capture_output=True,
        text=True,
        check=True,
    )
    return out.stdout.strip()


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
        f"Message-ID: <{ID_FIELD.decode()}@sender.example>\r\n"
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


def message_id(tag: str, number: int) -> str:
    """The id that message ``number`` of the session tagged ``tag`` carries."""
    return f"{tag}.{number}"


def _session_worker(
    port: int,
    count: int,
    index: int,
    tag: str,
    template: bytes,
    recipient_for: RecipientFor | None,
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
            text = message_id(tag, number).rjust(ID_WIDTH).encode()
            rcpt = recipient_for(index, number) if recipient_for else MAILBOX
            client.sendmail(SENDER, [rcpt], template.replace(ID_FIELD, text))
            sent += 1
    except (OSError, smtplib.SMTPException) as exc:
        error = f"message {sent + 1}: {exc!r}"
    end = time.monotonic()
    cpu = time.process_time() - cpu_before
    results.put(("done", tag, sent, error, end, cpu))
    try:
        client.quit()
    except (OSError, smtplib.SMTPException):
        pass


@dataclass
class RoundResult:
    """What one server did in one round.

    ``began`` and ``ended`` are ``time.monotonic()`` values (one clock for
    every process on the machine): the release of the sessions and the last
    ``250`` any of them got.
    """

    sent: int
    began: float
    ended: float
    server_cpu: float
    client_cpu: float
    errors: list[str]

    @property
    def seconds(self) -> float:
        return self.ended - self.began

    @property
    def rate(self) -> float:
        return self.sent / self.seconds if self.seconds else 0.0


def session_tag(tag: str, index: int) -> str:
    """The tag of session ``index`` in a load tagged ``tag``."""
    return f"{tag}s{index}"


def session_counts(messages: int, sessions: int) -> list[int]:
    """How many of ``messages`` each of ``sessions`` sessions sends."""
    share, extra = divmod(messages, sessions)
    return [share + (1 if index < extra else 0) for index in range(sessions)]


def run_load(
    server: Server,
    *,
    messages: int,
    sessions: int,
    tag: str,
    recipient_for: RecipientFor | None = None,
) -> RoundResult:
    """Send ``messages`` mails over ``sessions`` parallel connections.

    Each session is its own process, so the client is not held back by the
    GIL.  Timing starts once every session has connected and said EHLO.
    ``recipient_for`` names each message's one recipient (default MAILBOX).
    """
    context = multiprocessing.get_context("fork")
    start = context.Event()
    results = context.Queue()
    template = message_template()
    workers = []
    for index, count in enumerate(session_counts(messages, sessions)):
        worker = context.Process(
            target=_session_worker,
            args=(
                server.port,
                count,
                index,
                session_tag(tag, index),
                template,
                recipient_for,
                start,
                results,
            ),
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
    began = time.monotonic()
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
    return RoundResult(sent, began, ended, server_cpu, client_cpu, errors)


def serve_aiosmtpd(
    handler, *, name: str, port: int, threads: int | None = None
) -> None:
    """Run an aiosmtpd server for ``handler`` on HOST:port until SIGTERM.

    ``threads`` sizes the executor its handler's blocking work runs in;
    warnings go to stdout, which the benchmark keeps as the server's log.
    """
    import asyncio
    import logging
    from concurrent.futures import ThreadPoolExecutor

    from aiosmtpd.smtp import SMTP

    logging.basicConfig(
        level=logging.WARNING,
        stream=sys.stdout,
        format="%(asctime)s [%(name)s#%(levelname)s] %(message)s",
    )

    async def serve() -> None:
        loop = asyncio.get_running_loop()
        if threads:
            loop.set_default_executor(ThreadPoolExecutor(max_workers=threads))
        stop = loop.create_future()
        loop.add_signal_handler(signal.SIGTERM, stop.set_result, None)
        server = await loop.create_server(
            lambda: SMTP(
                handler,
                hostname=f"{name}.example.test",
                enable_SMTPUTF8=True,
                loop=loop,
            ),
            HOST,
            port,
            backlog=128,
        )
        print(f"aiosmtpd {name} listening on {HOST}:{port}", flush=True)
        await stop
        server.close()
        await server.wait_closed()

    asyncio.run(serve())
