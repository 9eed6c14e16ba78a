"""Forwarding through PowerMail's redirect mailboxes: throughput and memory.

Run by hand, never by the test suite::

    .venv/bin/python bench/forwarding.py [--messages N] [--sessions 20]
        [--rounds 3] [--queued 10000]

Part 1, throughput.  A domain's catch-all is a redirect mailbox whose next
hop is an aiosmtpd sink on loopback (a separate process that only notes the
time of each 250 in a file, without fsync).  Round A sends N 5 KiB messages
to various recipients of the domain through PowerMail's MX, which queues
each durably and forwards it to the sink; the rate is N over the time from
the first message sent to the sink's last 250.  Round B sends the same
messages straight to the sink.  The rounds alternate; the median of the A/B
ratios is printed.

Part 2, memory with a full queue.  The sink is stopped, a second PowerMail
(retry_delays = [3600]) takes --queued messages for the dead next hop, and
the RSS of its process is read after 1,000 queued messages and after all of
them (with --settle, also once every message was tried and after a restart
on the full queue).  See bench/README.md.

The same script is the sink when started as
``forwarding.py --sink-server PORT RECORDS``.
"""

from __future__ import annotations

import argparse
import os
import queue
import re
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from _common import (
    DOMAIN,
    HOST,
    MESSAGE_SIZE,
    RoundResult,
    Server,
    free_port,
    log_problems,
    log_tail,
    message_id,
    message_template,
    powermail_argv,
    run_load,
    serve_aiosmtpd,
    session_counts,
    session_tag,
    start_server,
    wait_until_listening,
    which_powermail,
)

CATCH_ALL = f"fwd@{DOMAIN}"
# Local parts the client writes to; none is a configured mailbox, so each
# message goes to the catch-all and is forwarded with its own recipient.
_LOCAL_PARTS = ("alice", "bob.smith", "sales", "info-desk", "j.doe", "orders")
# Seconds without a new message at the sink before a round counts as stuck.
STALL_TIMEOUT = 60.0
# Lines of PowerMail's log that tell of a next hop that did not take a message.
DEFERRED = "powermail.queue.runner#info] deferred "


def recipient_for(index: int, number: int) -> str:
    """The recipient of message ``number`` of session ``index``: 300 in all."""
    k = index * 31 + number
    return f"{_LOCAL_PARTS[k % len(_LOCAL_PARTS)]}{k % 50}@{DOMAIN}"


def expected_messages(tag: str, messages: int, sessions: int) -> dict[str, str]:
    """Message id -> recipient for a load ``run_load`` sends with ``tag``."""
    return {
        message_id(session_tag(tag, index), number): recipient_for(index, number)
        for index, count in enumerate(session_counts(messages, sessions))
        for number in range(count)
    }


# The sink: the far end of the forwarding.

_MESSAGE_ID = re.compile(rb"^Message-ID: <\s*([^@>\s]+)@", re.MULTILINE | re.IGNORECASE)


class RecordingSink:
    """An aiosmtpd handler that takes every message for the domain, no fsync.

    For each message it appends one line to the records file, in one
    ``write``, just before it answers 250: ``time.monotonic()``, the
    Message-ID's local part, the recipients, ``ok`` when the message ends
    with the body that was sent (``bad`` otherwise) and its size.
    """

    def __init__(self, records: int, body: bytes) -> None:
        self.records = records
        self.body = body

    async def handle_RCPT(  # noqa: N802 (aiosmtpd's hook names)
        self, server, session, envelope, address: str, rcpt_options
    ) -> str:
        if not address.lower().endswith(f"@{DOMAIN}"):
            return "550 5.1.1 not a recipient of this sink"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    async def handle_DATA(self, server, session, envelope) -> str:  # noqa: N802
        data = envelope.original_content or envelope.content
        found = _MESSAGE_ID.search(data, 0, 8192)
        msg_id = found.group(1).decode("ascii", "replace") if found else "-"
        intact = "ok" if data.endswith(self.body) else "bad"
        line = (
            f"{time.monotonic():.6f} {msg_id} {','.join(envelope.rcpt_tos)} "
            f"{intact} {len(data)}\n"
        )
        os.write(self.records, line.encode())
        return "250 OK"


def run_sink(port: int, records: Path) -> None:
    """Serve SMTP on ``127.0.0.1:port`` with aiosmtpd until SIGTERM."""
    fd = os.open(records, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    body = b"\r\n\r\n" + message_template().partition(b"\r\n\r\n")[2]
    handler = RecordingSink(fd, body)

    serve_aiosmtpd(handler, name="sink", port=port)
    os.close(fd)


@dataclass(frozen=True)
class Record:
    """One message the sink took."""

    at: float
    msg_id: str
    recipients: str
    intact: bool
    size: int


class LineReader:
    """Reads the complete lines a file has gained since the last call."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def new_lines(self) -> list[bytes]:
        try:
            with open(self.path, "rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        self._offset += len(chunk)
        *lines, self._partial = (self._partial + chunk).split(b"\n")
        return lines


class SinkRecords:
    """The sink's records file, read as it grows; ``taken`` is not yet checked."""

    def __init__(self, path: Path) -> None:
        self._reader = LineReader(path)
        self.taken: list[Record] = []

    def poll(self) -> int:
        for line in self._reader.new_lines():
            at, msg_id, recipients, intact, size = line.decode().split(" ")
            self.taken.append(
                Record(float(at), msg_id, recipients, intact == "ok", int(size))
            )
        return len(self.taken)

    def take(self) -> list[Record]:
        self.poll()
        records, self.taken = self.taken, []
        return records


class LogCounter:
    """Counts the lines of a growing log that contain ``needle``."""

    def __init__(self, path: Path, needle: str) -> None:
        self._reader = LineReader(path)
        self._needle = needle.encode()
        self.count = 0

    def poll(self) -> int:
        self.count += sum(self._needle in line for line in self._reader.new_lines())
        return self.count


def check_records(records: list[Record], expected: dict[str, str]) -> list[str]:
    """What is wrong with what the sink took, compared with what was sent."""
    problems = []
    counts = Counter(r.msg_id for r in records)
    if len(records) != len(expected):
        problems.append(f"the sink took {len(records)} messages, {len(expected)} sent")
    twice = [m for m, n in counts.items() if n > 1]
    missing = [m for m in expected if m not in counts]
    strange = [m for m in counts if m not in expected]
    if twice:
        problems.append(f"{len(twice)} taken more than once, e.g. {twice[:3]}")
    if missing:
        problems.append(f"{len(missing)} never arrived, e.g. {missing[:3]}")
    if strange:
        problems.append(f"{len(strange)} not sent in this round, e.g. {strange[:3]}")
    wrong = [
        r
        for r in records
        if r.msg_id in expected and r.recipients != expected[r.msg_id]
    ]
    if wrong:
        first = wrong[0]
        problems.append(
            f"{len(wrong)} for the wrong recipient, e.g. {first.msg_id} for "
            f"{first.recipients}, sent to {expected[first.msg_id]}"
        )
    damaged = [r.msg_id for r in records if not r.intact]
    if damaged:
        problems.append(f"{len(damaged)} whose body changed, e.g. {damaged[:3]}")
    return problems


# The PowerMail instances.


def write_config(
    folder: Path, mx_port: int, next_hop_port: int, sessions: int, retry: int
) -> Path:
    """A PowerMail whose domain forwards everything to ``[127.0.0.1]:next_hop_port``."""
    text = f"""\
# Written by bench/forwarding.py for one benchmark run.

[server]
hostname = "mx.example.test"
data_dir = "data"

[mx]
listen = ["{HOST}:{mx_port}"]
max_connections_per_client = {max(sessions, 100)}

[queue]
retry_delays = [{retry}]

[domains."{DOMAIN}"]
catch_all = "{CATCH_ALL}"

[mailboxes."{CATCH_ALL}"]
mode = "redirect"
next_hop = "[{HOST}]:{next_hop_port}"
"""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "powermail.toml"
    path.write_text(text)
    return path


def queue_files(folder: Path) -> list[str]:
    """The files in the outbound queue of the PowerMail run in ``folder``."""
    names = []
    for sub in ("messages", "tmp"):
        path = folder / "data/queue" / sub
        if path.is_dir():
            names += [f"{sub}/{name}" for name in os.listdir(path)]
    return names


class BenchError(Exception):
    """A part of the benchmark that lost messages or saw errors."""

    def __init__(self, server: Server | None, problems: list[str]) -> None:
        shown = "; ".join(p for p in problems if p)[:2000]
        super().__init__(f"{server.name}: {shown}" if server else shown)
        self.server = server


def _check_load(server: Server, result: RoundResult, messages: int) -> None:
    if result.errors or result.sent != messages:
        raise BenchError(
            server, [f"{result.sent} of {messages} accepted", *result.errors]
        )


def _wait_for_sink(sink: SinkRecords, total: int, servers: Sequence[Server]) -> None:
    """Return once the sink holds ``total`` unchecked records."""
    seen, since = sink.poll(), time.monotonic()
    while seen < total:
        time.sleep(0.02)
        count = sink.poll()
        if count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since > STALL_TIMEOUT:
            raise BenchError(
                None,
                [
                    f"the sink has {seen} of {total} messages, nothing new for "
                    f"{STALL_TIMEOUT:.0f} s"
                ],
            )
        for server in servers:
            if server.process.poll() is not None:
                raise BenchError(server, [f"exited with {server.process.returncode}"])


def _wait_for_empty_queue(server: Server, folder: Path, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while names := queue_files(folder):
        if time.monotonic() > deadline:
            raise BenchError(
                server, [f"{len(names)} files left in the queue, e.g. {names[:4]}"]
            )
        time.sleep(0.02)


@dataclass
class Forwarded:
    """Round A or B: when the load began and the sink took each message."""

    load: RoundResult
    last_taken: float
    powermail_cpu: float
    sink_cpu: float
    backlog: int
    deferred: int

    @property
    def seconds(self) -> float:
        return self.last_taken - self.load.began

    @property
    def rate(self) -> float:
        return self.load.sent / self.seconds


def send_and_collect(
    target: Server,
    *,
    powermail: Server,
    pm_folder: Path,
    sink: Server,
    records: SinkRecords,
    deferred: LogCounter,
    messages: int,
    sessions: int,
    tag: str,
) -> Forwarded:
    """Send a load to ``target``, wait until the sink took it all, check it."""
    stray = records.take()
    if stray:
        raise BenchError(None, [f"{len(stray)} messages reached the sink late"])
    deferred.poll()
    deferred_before = deferred.count
    pm_cpu, sink_cpu = powermail.cpu_seconds(), sink.cpu_seconds()
    result = run_load(
        target,
        messages=messages,
        sessions=sessions,
        tag=tag,
        recipient_for=recipient_for,
    )
    _check_load(target, result, messages)
    _wait_for_sink(records, messages, (powermail, sink))
    if target is powermail:
        _wait_for_empty_queue(powermail, pm_folder)
    pm_cpu, sink_cpu = powermail.cpu_seconds() - pm_cpu, sink.cpu_seconds() - sink_cpu
    time.sleep(0.2)  # a copy sent twice would show now
    taken = records.take()
    problems = check_records(taken, expected_messages(tag, messages, sessions))
    if problems:
        raise BenchError(target, problems)
    last = max(r.at for r in taken)
    return Forwarded(
        load=result,
        last_taken=last,
        powermail_cpu=pm_cpu,
        sink_cpu=sink_cpu,
        backlog=sum(r.at > result.ended for r in taken),
        deferred=deferred.poll() - deferred_before,
    )


def _percent(cpu: float, seconds: float) -> str:
    return f"{100 * cpu / seconds:.0f}%"


def throughput(
    args: argparse.Namespace,
    powermail: Server,
    pm_folder: Path,
    sink: Server,
    records: SinkRecords,
) -> list[float]:
    """Part 1: the rounds; the ratios forwarded/direct."""
    deferred = LogCounter(powermail.log_path, DEFERRED)
    common = dict(
        powermail=powermail,
        pm_folder=pm_folder,
        sink=sink,
        records=records,
        deferred=deferred,
        sessions=args.sessions,
    )
    # One message per session each way first, so that the queue's folders
    # exist and every process is warm before anything is timed.
    send_and_collect(powermail, messages=args.sessions, tag="wa", **common)
    send_and_collect(sink, messages=args.sessions, tag="wb", **common)

    ratios = []
    for number in range(1, args.rounds + 1):
        a = send_and_collect(
            powermail, messages=args.messages, tag=f"r{number}a", **common
        )
        b = send_and_collect(sink, messages=args.messages, tag=f"r{number}b", **common)
        ratio = a.rate / b.rate
        ratios.append(ratio)
        rss = powermail.memory().get("VmRSS", 0)
        print(f"round {number}:")
        print(
            f"  A through PowerMail {a.rate:7.1f} msg/s ({a.load.sent} at the sink "
            f"in {a.seconds:.2f} s; the MX accepted them in {a.load.seconds:.2f} s "
            f"= {a.load.rate:.0f} msg/s, {a.backlog} still queued then)"
        )
        print(
            f"      CPU: PowerMail {_percent(a.powermail_cpu, a.seconds)}, "
            f"sink {_percent(a.sink_cpu, a.seconds)}, "
            f"client {_percent(a.load.client_cpu, a.load.seconds)}; "
            f"deferred attempts {a.deferred}; PowerMail RSS {rss / 2**20:.1f} MiB"
        )
        print(
            f"  B straight to sink  {b.rate:7.1f} msg/s ({b.load.sent} in "
            f"{b.seconds:.2f} s; CPU: sink {_percent(b.sink_cpu, b.seconds)}, "
            f"client {_percent(b.load.client_cpu, b.load.seconds)})"
        )
        print(f"  ratio A/B {ratio:.3f}", flush=True)
    print(f"median ratio forwarded/direct: {statistics.median(ratios):.3f}")
    return ratios


def _committed(folder: Path) -> int:
    """How many messages the queue holds with their envelope written."""
    path = folder / "data/queue/messages"
    return sum(name.endswith(".json") for name in os.listdir(path))


def _wait_until_tried(server: Server, deferred: LogCounter, total: int) -> float:
    """Wait until each of ``total`` messages had its first attempt, CPU idle."""
    began = since = time.monotonic()
    seen = deferred.poll()
    while True:
        if server.process.poll() is not None:
            raise BenchError(server, [f"exited with {server.process.returncode}"])
        count = deferred.poll()
        if count != seen:
            seen, since = count, time.monotonic()
        elif time.monotonic() - since > STALL_TIMEOUT:
            raise BenchError(server, [f"only {seen} of {total} messages tried"])
        if count >= total:
            cpu = server.cpu_seconds()
            time.sleep(0.5)
            if server.cpu_seconds() - cpu < 0.02:
                return time.monotonic() - began
        else:
            time.sleep(0.2)


def _mib(octets: float) -> str:
    return f"{octets / 2**20:.1f} MiB"


def memory(args: argparse.Namespace, powermail: Server, folder: Path, restart) -> None:
    """Part 2: RSS of a PowerMail whose queue fills for a next hop that is down.

    ``restart`` stops ``powermail`` and starts it again on the same folder,
    returning the new Server (only used with ``--settle``).
    """
    wait_until_listening(powermail)
    start_rss = powermail.memory()["VmRSS"]
    print(f"  PowerMail RSS at start, queue empty: {_mib(start_rss)}")
    deferred = LogCounter(powermail.log_path, DEFERRED)
    first = max(1, min(1000, args.queued // 10))
    total = 0
    accept = 0.0
    points = []
    for number, count in enumerate((first, args.queued - first)):
        result = run_load(
            powermail,
            messages=count,
            sessions=args.sessions,
            tag=f"q{number}",
            recipient_for=recipient_for,
        )
        _check_load(powermail, result, count)
        total += count
        accept += result.seconds
        sizes = powermail.memory()
        committed = _committed(folder)
        if committed != total:
            raise BenchError(powermail, [f"{committed} of {total} in the queue"])
        points.append((total, sizes["VmRSS"]))
        print(
            f"  {total:6d} queued: RSS {_mib(sizes['VmRSS'])} "
            f"(anon {_mib(sizes.get('RssAnon', 0))}); these {count} accepted "
            f"in {result.seconds:.2f} s = {result.rate:.0f} msg/s "
            f"(server CPU {_percent(result.server_cpu, result.seconds)}); "
            f"{deferred.poll()} of {total} tried once so far",
            flush=True,
        )
    (n1, rss1), (n2, rss2) = points
    growth = rss2 - rss1
    print(
        f"  RSS grew by {_mib(growth)} from {n1} to {n2} queued: "
        f"{growth / (n2 - n1):.0f} octets per queued message "
        f"(a message is {MESSAGE_SIZE} octets)"
    )
    print(
        f"  the MX accepted all {total} in {accept:.2f} s = {total / accept:.0f} msg/s"
    )
    if not args.settle:
        return
    tried = deferred.poll()
    waited = _wait_until_tried(powermail, deferred, total)
    print(
        f"  every message tried once {waited:.1f} s later "
        f"({(deferred.count - tried) / waited:.0f} attempts/s): "
        f"RSS {_mib(powermail.memory()['VmRSS'])}"
    )
    began = time.monotonic()
    powermail = restart()
    wait_until_listening(powermail, timeout=300)
    listening = time.monotonic() - began
    time.sleep(2)
    rss = powermail.memory()["VmRSS"]
    loaded = f"queue: {total} messages to deliver"
    if loaded not in powermail.log_path.read_text(errors="replace"):
        raise BenchError(powermail, [f"no {loaded!r} in its log"])
    print(
        f"  restarted with {total} queued (listening after {listening:.1f} s): "
        f"RSS {_mib(rss)}, {(rss - start_rss) / total:.0f} octets per queued "
        f"message over the empty start"
    )


def _log_report(server: Server) -> None:
    text = server.log_path.read_text(errors="replace")
    lines = text.splitlines()
    problems = log_problems(server.log_path)
    errors = [line for line in lines if "error" in line.lower()]
    print(
        f"{server.name} log {server.log_path.name}: {len(text)} octets, "
        f"{len(problems)} warning/error/traceback lines, "
        f"{len(errors)} lines with 'error'"
    )
    for line in list(dict.fromkeys(problems + errors))[:10]:
        print(f"  {line[:300]}")


def benchmark(args: argparse.Namespace) -> int:
    """Run both parts and print the figures; 0 if everything held."""
    folder = Path(tempfile.mkdtemp(prefix="powermail-fwd-bench-"))
    print(f"work folder: {folder}")
    print(f"powermail package: {which_powermail()}")
    print(
        f"{args.messages} messages of {MESSAGE_SIZE} octets per round and way, "
        f"{args.sessions} sessions, {args.rounds} rounds; {args.queued} queued "
        f"for part 2"
    )
    mx_port = free_port()
    sink_port = free_port(mx_port)
    queued_port = free_port(mx_port, sink_port)
    pm_folder = folder / "forward"
    config = write_config(pm_folder, mx_port, sink_port, args.sessions, 2)
    powermail = start_server(
        "PowerMail-forward", powermail_argv(config), port=mx_port, folder=pm_folder
    )
    records_path = folder / "sink.records"
    sink = start_server(
        "sink",
        [sys.executable, str(Path(__file__).resolve()), "--sink-server"]
        + [str(sink_port), str(records_path)],
        port=sink_port,
        folder=folder,
    )
    servers = [powermail, sink]
    codes: dict[str, int | None] = {}

    def stop(server: Server) -> float:
        began = time.monotonic()
        if server.name not in codes:
            codes[server.name] = server.stop()
        return time.monotonic() - began

    failed = False
    try:
        for server in servers:
            wait_until_listening(server)
        print("part 1: throughput")
        throughput(args, powermail, pm_folder, sink, SinkRecords(records_path))
        stop(powermail)
        stop(sink)
        # Part 2 forwards to the sink's port, where nothing listens now.
        print(f"part 2: a full queue, next hop {HOST}:{sink_port} down")
        queued_folder = folder / "queued"
        config = write_config(
            queued_folder, queued_port, sink_port, args.sessions, 3600
        )

        def start_queued(name: str = "PowerMail-queued") -> Server:
            server = start_server(
                name, powermail_argv(config), port=queued_port, folder=queued_folder
            )
            servers.append(server)
            return server

        def restart() -> Server:
            print(f"  {servers[-1].name} stopped in {stop(servers[-1]):.1f} s")
            return start_queued("PowerMail-restarted")

        memory(args, start_queued(), queued_folder, restart)
        print(f"  {servers[-1].name} stopped in {stop(servers[-1]):.1f} s")
    except (BenchError, RuntimeError, OSError, queue.Empty) as exc:
        failed = True
        sys.stdout.flush()
        print(f"FAILED: {exc}", file=sys.stderr)
        culprit = exc.server if isinstance(exc, BenchError) else None
        for server in servers:
            if culprit in (None, server):
                print(f"--- tail of {server.log_path}", file=sys.stderr)
                print(log_tail(server.log_path), file=sys.stderr)
    finally:
        for server in servers:
            stop(server)
    for name, code in codes.items():
        if code not in (0, -signal.SIGTERM):
            print(f"{name} exited with {code}", file=sys.stderr)
            failed = True

    for server in servers:
        _log_report(server)
    if failed or args.keep:
        print(f"kept {folder}")
    else:
        shutil.rmtree(folder)
    return 1 if failed else 0


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    """The command line; ``--sink-server`` runs the sink instead."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--messages",
        type=int,
        default=5000,
        help="messages per round, each way (default: %(default)s)",
    )
    parser.add_argument(
        "--sessions",
        type=int,
        default=20,
        help="parallel SMTP sessions, one process each (default: %(default)s)",
    )
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of A and B (default: %(default)s)"
    )
    parser.add_argument(
        "--queued",
        type=int,
        default=10000,
        help="messages queued for a dead next hop in part 2 (default: %(default)s)",
    )
    parser.add_argument(
        "--settle",
        action="store_true",
        help="part 2: also wait until every queued message was tried once, "
        "then restart PowerMail on the full queue and read its RSS again",
    )
    parser.add_argument(
        "--keep", action="store_true", help="keep the work folder and its logs"
    )
    parser.add_argument(
        "--sink-server",
        nargs=2,
        metavar=("PORT", "RECORDS"),
        help="run only the sink (the benchmark starts it this way)",
    )
    args = parser.parse_args(argv)
    if min(args.messages, args.sessions, args.rounds) < 1:
        parser.error("--messages, --sessions and --rounds must be at least 1")
    if args.queued < 2:
        parser.error("--queued must be at least 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, or the sink when asked to."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.sink_server:
        port, records = args.sink_server
        run_sink(int(port), Path(records))
        return 0
    return benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
