"""Run one ``queue.client.deliver`` on the real reactor, for the client tests.

Arguments come as one JSON object on the command line (``deliver``'s keyword
arguments, ``message`` a path, ``trust_root`` a PEM file); the outcome is
printed on stdout as JSON, and every log event, debug included, goes to
stderr one line each, so tests can read what was logged.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

from twisted.internet import reactor, ssl
from twisted.logger import formatEvent, globalLogBeginner


def _log_to_stderr(event: dict) -> None:
    level = event.get("log_level")
    text = formatEvent(event)
    if event.get("log_failure") is not None:
        text += "\n" + event["log_failure"].getTraceback()
    sys.stderr.write(f"{level.name if level else '-'} {text}\n")


def main() -> None:
    arguments = json.loads(sys.argv[1])
    arguments["message"] = Path(arguments["message"])
    if arguments.get("trust_root"):
        pem = Path(arguments["trust_root"]).read_bytes()
        arguments["trust_root"] = ssl.Certificate.loadPEM(pem)
    globalLogBeginner.beginLoggingTo([_log_to_stderr], redirectStandardIO=False)

    from powermail.queue.client import deliver

    result = {}

    def done(outcome):
        result["outcome"] = dataclasses.asdict(outcome)

    def failed(failure):
        result["error"] = failure.getTraceback()

    def start():
        d = deliver(reactor, **arguments)
        d.addCallbacks(done, failed)
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(start)
    reactor.run()
    print(json.dumps(result))


if __name__ == "__main__":
    main()
