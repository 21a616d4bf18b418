"""A closed-loop load generator: HTTP scans, milter sessions, fuzzy datagrams.

*Closed loop*: ``concurrency`` clients each send one request, wait for its
answer (or its timeout), then send the next, until the run has started
``requests`` requests or ``duration`` seconds have passed.  Every finished
request records its latency; failures (refused connection, protocol error,
timeout, an answer that says the target could not do the work) are counted,
not timed.  :class:`RunStats` turns the records into req/s, p50/p99/max.

Transports (one request each):

* ``http``: a new TCP connection, ``POST /checkv2`` with the message and
  ``Connection: close`` (Rspamd 3.4 closes after every reply), read the whole
  reply; success is status 200; the outcome is the reply's ``action``.
* ``milter``: a new TCP connection and a full milter session as Postfix runs
  it: negotiate (offering every no-reply flag), connect, helo, mail, rcpt,
  data, headers, end of headers, body in 65535-byte chunks, end of message; wait for
  the final verdict, then quit.  A temporary failure (``t`` or a 4xx reply
  code) counts as an error; the outcome is the verdict's name.
* ``fuzzy``: one plaintext version 4 datagram (CHECK or WRITE) from the
  client's own UDP socket, answered by tag; a refusal code (403, 415, 500,
  503) counts as an error; the outcome is ``hit``/``miss`` for CHECK and
  ``written`` for WRITE.

The generator runs in one Twisted reactor (no process per request).  When one
process cannot drive a target, :func:`run_processes` runs K generator
processes (``python -m bench.loadgen SPEC``) with the concurrency and the
request budget split between them, and merges their records.  Each run also
measures the CPU time the generator itself used: a generator near 100 % of a
core is the bottleneck, and the numbers then describe the generator.
"""

from __future__ import annotations

import json
import math
import os
import random
import resource
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

from twisted.internet import defer, protocol, task
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IReactorTime, ITCPTransport
from twisted.python.failure import Failure

from rspamd_tx.protocols import fuzzy_codec, http_codec, milter_codec
from rspamd_tx.protocols import milter_events as me

__all__ = [
    "FuzzyTarget",
    "HttpTarget",
    "LoadError",
    "MilterTarget",
    "RunStats",
    "TargetSpec",
    "Request",
    "concatenate",
    "make_target",
    "merge",
    "milter_commands",
    "percentile",
    "run_closed_loop",
    "run_processes",
    "run_target",
    "split_message",
]

#: Largest body chunk of one milter ``B`` command, as Postfix sends it.
MILTER_CHUNK = 65535
#: Default per-request timeout (seconds).
DEFAULT_TIMEOUT = 30.0


class LoadError(Exception):
    """A request failed in a way the target reported (bad status, tempfail, refusal)."""


def percentile(ordered: Sequence[float], p: float) -> float:
    """The nearest-rank ``p``-th percentile (0 < p ≤ 100) of sorted ``ordered``.

    The smallest value with at least ``p`` % of the values at or below it;
    ``nan`` for no values.
    """
    if not 0 < p <= 100:
        raise ValueError(f"percentile must be in (0, 100]: {p}")
    if not ordered:
        return math.nan
    rank = math.ceil(p / 100 * len(ordered))
    return ordered[max(rank, 1) - 1]


@dataclass(frozen=True)
class RunStats:
    """The records of one run.

    Attributes:
        latencies: seconds each successful request took, sorted ascending.
        errors: requests that failed or timed out.
        started: clock time the run started; ``ended``: when its last request ended.
        cpu_seconds: CPU time (user + system) the generator used during the run.
        processes: how many generator processes contributed.
        outcomes: successful requests per outcome label (action, verdict, hit/miss).
        error_kinds: failed requests per error label.
    """

    latencies: tuple[float, ...]
    errors: int
    started: float
    ended: float
    cpu_seconds: float = 0.0
    processes: int = 1
    outcomes: Mapping[str, int] = field(default_factory=dict)
    error_kinds: Mapping[str, int] = field(default_factory=dict)

    @property
    def completed(self) -> int:
        """Successful requests."""
        return len(self.latencies)

    @property
    def elapsed(self) -> float:
        """Wall time of the run (seconds)."""
        return max(self.ended - self.started, 0.0)

    @property
    def rate(self) -> float:
        """Successful requests per second of the run (0 for an empty run)."""
        return self.completed / self.elapsed if self.elapsed > 0 else 0.0

    @property
    def p50(self) -> float:
        """Median latency in seconds (``nan`` without successes)."""
        return percentile(self.latencies, 50)

    @property
    def p99(self) -> float:
        """99th-percentile latency in seconds (``nan`` without successes)."""
        return percentile(self.latencies, 99)

    @property
    def max(self) -> float:
        """Largest latency in seconds (``nan`` without successes)."""
        return self.latencies[-1] if self.latencies else math.nan

    @property
    def generator_cpu(self) -> float:
        """Generator CPU use as a fraction of one core per generator process."""
        if self.elapsed <= 0:
            return 0.0
        return self.cpu_seconds / self.elapsed / max(self.processes, 1)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form that :meth:`from_json` reads back exactly."""
        return {
            "latencies": list(self.latencies),
            "errors": self.errors,
            "started": self.started,
            "ended": self.ended,
            "cpu_seconds": self.cpu_seconds,
            "processes": self.processes,
            "outcomes": dict(self.outcomes),
            "error_kinds": dict(self.error_kinds),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunStats:
        """Read :meth:`to_json` output; raises ``KeyError``/``TypeError`` if malformed."""
        return cls(
            latencies=tuple(sorted(float(x) for x in data["latencies"])),
            errors=int(data["errors"]),
            started=float(data["started"]),
            ended=float(data["ended"]),
            cpu_seconds=float(data["cpu_seconds"]),
            processes=int(data["processes"]),
            outcomes={str(k): int(v) for k, v in data["outcomes"].items()},
            error_kinds={str(k): int(v) for k, v in data["error_kinds"].items()},
        )

    def summary(self) -> dict[str, Any]:
        """The numbers a report prints (milliseconds for latencies)."""
        return {
            "requests": self.completed,
            "errors": self.errors,
            "seconds": round(self.elapsed, 3),
            "rps": round(self.rate, 1),
            "p50_ms": _ms(self.p50),
            "p99_ms": _ms(self.p99),
            "max_ms": _ms(self.max),
            "generator_cpu": round(self.generator_cpu, 3),
            "outcomes": dict(self.outcomes),
            "error_kinds": dict(self.error_kinds),
        }


def _ms(seconds: float) -> float | None:
    return None if math.isnan(seconds) else round(seconds * 1000, 3)


def merge(runs: Iterable[RunStats]) -> RunStats:
    """One :class:`RunStats` for runs that went on at the same time (K processes).

    Latencies, errors, CPU time, processes and outcome counts add up; the run
    spans from the earliest start to the latest end.  Raises ``ValueError``
    for no runs.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("nothing to merge")
    outcomes: Counter[str] = Counter()
    kinds: Counter[str] = Counter()
    for run in runs:
        outcomes.update(run.outcomes)
        kinds.update(run.error_kinds)
    return RunStats(
        latencies=tuple(sorted(x for run in runs for x in run.latencies)),
        errors=sum(run.errors for run in runs),
        started=min(run.started for run in runs),
        ended=max(run.ended for run in runs),
        cpu_seconds=sum(run.cpu_seconds for run in runs),
        processes=sum(run.processes for run in runs),
        outcomes=dict(outcomes),
        error_kinds=dict(kinds),
    )


def concatenate(runs: Iterable[RunStats]) -> RunStats:
    """One :class:`RunStats` for runs of one target that went on one after another.

    Latencies, errors, CPU time and outcome counts add up; the run starts
    when the first did and lasts the sum of their durations (time between
    them, spent on other targets, is not counted).  Raises ``ValueError``
    for no runs.
    """
    runs = list(runs)
    if not runs:
        raise ValueError("nothing to concatenate")
    merged = merge(runs)
    return RunStats(
        latencies=merged.latencies,
        errors=merged.errors,
        started=runs[0].started,
        ended=runs[0].started + sum(run.elapsed for run in runs),
        cpu_seconds=merged.cpu_seconds,
        processes=max(run.processes for run in runs),
        outcomes=merged.outcomes,
        error_kinds=merged.error_kinds,
    )


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


Request = Callable[[], "Deferred[str]"]
"""Sends one request; fires with an outcome label, or fails."""


def _error_label(failure: Failure) -> str:
    if failure.check(defer.TimeoutError, defer.CancelledError):
        return "timeout"
    if failure.check(LoadError):
        return str(failure.value)
    return type(failure.value).__name__


async def _client(
    clock: IReactorTime,
    request: Request,
    budget: list[int],
    deadline: float | None,
    timeout: float,
    latencies: list[float],
    outcomes: Counter[str],
    errors: Counter[str],
) -> None:
    """One closed-loop client: request, wait, repeat while budget and time remain."""
    while budget[0] > 0 and (deadline is None or clock.seconds() < deadline):
        budget[0] -= 1
        began = clock.seconds()
        pending = defer.maybeDeferred(request)
        pending.addTimeout(timeout, clock)
        try:
            outcome = await pending
        except Exception:
            errors[_error_label(Failure())] += 1
            continue
        latencies.append(clock.seconds() - began)
        outcomes[str(outcome)] += 1


def run_closed_loop(
    clock: IReactorTime,
    request: Request,
    concurrency: int,
    requests: int | None = None,
    duration: float | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    cpu_seconds: Callable[[], float] = _cpu_seconds,
) -> Deferred[RunStats]:
    """Run ``concurrency`` closed-loop clients of ``request``; fires with the stats.

    The run stops starting requests once ``requests`` have been started or
    ``duration`` seconds (on ``clock``) have passed, whichever comes first;
    at least one bound is required.  Each request is abandoned (counted as a
    ``timeout`` error) after ``timeout`` seconds, so the run always ends.
    """
    if concurrency < 1:
        raise ValueError("concurrency must be at least 1")
    if requests is None and duration is None:
        raise ValueError("a run needs a request count or a duration")
    started = clock.seconds()
    cpu_before = cpu_seconds()
    deadline = None if duration is None else started + duration
    budget = [requests if requests is not None else sys.maxsize]
    latencies: list[float] = []
    outcomes: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    clients = [
        defer.ensureDeferred(
            _client(clock, request, budget, deadline, timeout, latencies, outcomes, errors)
        )
        for _ in range(concurrency)
    ]

    def finish(_: object) -> RunStats:
        return RunStats(
            latencies=tuple(sorted(latencies)),
            errors=sum(errors.values()),
            started=started,
            ended=clock.seconds(),
            cpu_seconds=max(cpu_seconds() - cpu_before, 0.0),
            outcomes=dict(outcomes),
            error_kinds=dict(errors),
        )

    return defer.gatherResults(clients, consumeErrors=True).addCallback(finish)


# -- targets --------------------------------------------------------------------


@dataclass(frozen=True)
class TargetSpec:
    """What to load and how; JSON-able so generator processes can share it.

    Attributes:
        transport: ``http``, ``milter`` or ``fuzzy``.
        host, port: the target's loopback address.
        message: path of the message file (``http`` and ``milter``).
        command: ``check`` or ``write`` (``fuzzy``).
        digests: how many distinct digests a fuzzy client cycles through.
        seed: seed of the fuzzy digest pool (same seed, same digests).
    """

    transport: str
    host: str
    port: int
    message: str | None = None
    command: str = "check"
    digests: int = 1000
    seed: int = 1

    def to_json(self) -> str:
        return json.dumps(self.__dict__, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> TargetSpec:
        return cls(**json.loads(text))


class _Exchange(protocol.Protocol):
    """Writes a request on connect, hands received bytes to ``on_data``."""

    def __init__(self, request: bytes, on_data: Callable[[bytes], bool],
                 on_close: Callable[[], None], done: Deferred[str]) -> None:
        self.request = request
        self.on_data = on_data
        self.on_close = on_close
        self.done = done

    def connectionMade(self) -> None:  # noqa: N802 (Twisted API)
        assert self.transport is not None
        self.transport.write(self.request)

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        assert self.transport is not None
        try:
            finished = self.on_data(data)
        except Exception:
            cast(ITCPTransport, self.transport).abortConnection()
            if not self.done.called:
                self.done.errback(Failure())
            return
        if finished:
            self.transport.loseConnection()

    def connectionLost(self, reason: Failure = protocol.connectionDone) -> None:  # noqa: N802
        if self.done.called:
            return
        try:
            self.on_close()
        except Exception:
            self.done.errback(Failure())
            return
        if not self.done.called:
            self.done.errback(LoadError("connection closed early"))


class _ExchangeFactory(protocol.ClientFactory):
    def __init__(self, build: Callable[[Deferred[str]], _Exchange], done: Deferred[str]) -> None:
        self.build = build
        self.done = done
        self.noisy = False

    def buildProtocol(self, addr: Any) -> _Exchange:  # noqa: N802 (Twisted API)
        return self.build(self.done)

    def clientConnectionFailed(self, connector: Any, reason: Failure) -> None:  # noqa: N802
        if not self.done.called:
            self.done.errback(reason)


def _connect(reactor: Any, host: str, port: int,
             build: Callable[[Deferred[str]], _Exchange]) -> Deferred[str]:
    connector: list[Any] = []

    def cancel(d: Deferred[str]) -> None:
        if connector:
            connector[0].disconnect()

    done: Deferred[str] = Deferred(cancel)
    connector.append(reactor.connectTCP(host, port, _ExchangeFactory(build, done), timeout=30))
    return done


def _read_message(path: str | None) -> bytes:
    if path is None:
        raise ValueError("this transport needs a message file")
    with open(path, "rb") as f:
        return f.read()


class HttpTarget:
    """``POST /checkv2`` of one message per new connection."""

    HEADERS = (
        ("Host", "localhost"),
        ("IP", "127.0.0.1"),
        ("Helo", "client.bench.test"),
        ("Hostname", "client.bench.test"),
        ("From", "<sender@bench.test>"),
        ("Rcpt", "<rcpt@bench.test>"),
        ("Queue-Id", "BENCH"),
        ("Connection", "close"),
    )

    def __init__(self, reactor: Any, host: str, port: int, message: bytes) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.request = http_codec.encode_request("POST", "/checkv2", self.HEADERS, message)

    def __call__(self) -> Deferred[str]:
        return _connect(self.reactor, self.host, self.port, self._exchange)

    def _exchange(self, done: Deferred[str]) -> _Exchange:
        parser = http_codec.ResponseParser()
        state: dict[str, Any] = {"status": None, "body": bytearray()}

        def handle(events: list[http_codec.Event]) -> bool:
            for event in events:
                if isinstance(event, http_codec.Response):
                    state["status"] = event.status
                elif isinstance(event, http_codec.Data):
                    state["body"] += event.chunk
                elif isinstance(event, http_codec.EndOfMessage):
                    if state["status"] != 200:
                        raise LoadError(f"http {state['status']}")
                    done.callback(_action(bytes(state["body"])))
                    return True
            return False

        def received(data: bytes) -> bool:
            return handle(parser.feed(data))

        def closed() -> None:
            handle(parser.feed_eof())

        return _Exchange(self.request, received, closed, done)


def _action(body: bytes) -> str:
    """The ``action`` of a scan reply (``?`` when it has none)."""
    try:
        reply = json.loads(body)
    except ValueError:
        return "?"
    return str(reply.get("action", "?")) if isinstance(reply, dict) else "?"


def split_message(message: bytes) -> tuple[list[tuple[bytes, bytes]], bytes]:
    """Headers as milter sends them (name, value without the leading space) and the body.

    Continuation lines stay in their header's value, line ends inside it
    becoming ``\\n``-joined as Postfix sends them.
    """
    text = message.replace(b"\r\n", b"\n")
    head, sep, body = text.partition(b"\n\n")
    if not sep:
        head, body = text, b""
    headers: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\n"):
        if not line:
            continue
        if line[:1] in (b" ", b"\t") and headers:
            name, value = headers[-1]
            headers[-1] = (name, value + b"\n" + line)
            continue
        name, _, value = line.partition(b":")
        headers.append((name, value[1:] if value.startswith(b" ") else value))
    return headers, body.replace(b"\n", b"\r\n")


_NO_REPLY_FLAG = {
    me.Connect: me.PROTO_NR_CONN,
    me.Helo: me.PROTO_NR_HELO,
    me.MailFrom: me.PROTO_NR_MAIL,
    me.RcptTo: me.PROTO_NR_RCPT,
    me.Data: me.PROTO_NR_DATA,
    me.Header: me.PROTO_NR_HDR,
    me.EndOfHeaders: me.PROTO_NR_EOH,
    me.BodyChunk: me.PROTO_NR_BODY,
}
_VERDICTS = (me.Accept, me.Continue, me.Reject, me.Tempfail, me.Discard, me.ReplyCode,
             me.ConnectionFail)
#: What Postfix offers: every action and every no-reply flag.
MTA_OFFER = me.OptionNegotiation(me.PROTOCOL_VERSION, me.ACTIONS_MASK, me.NOREPLY_MASK)


def milter_commands(message: bytes) -> list[Any]:
    """The commands of one milter session for ``message``, after negotiation."""
    headers, body = split_message(message)
    commands: list[Any] = [
        me.Macro(b"C", ((b"j", b"mx.bench.test"), (b"{daemon_name}", b"smtpd"),
                        (b"v", b"Postfix 3.7"))),
        me.Connect(b"client.bench.test", me.FAMILY_INET, 40000, b"127.0.0.1"),
        me.Macro(b"H", ((b"{tls_version}", b""),)),
        me.Helo(b"client.bench.test"),
        me.Macro(b"M", ((b"i", b"BENCH"), (b"{mail_addr}", b"sender@bench.test"))),
        me.MailFrom(b"<sender@bench.test>"),
        me.Macro(b"R", ((b"{rcpt_addr}", b"rcpt@bench.test"),)),
        me.RcptTo(b"<rcpt@bench.test>"),
        me.Data(),
    ]
    commands += [me.Header(name, value) for name, value in headers]
    commands.append(me.EndOfHeaders())
    commands += [me.BodyChunk(body[i:i + MILTER_CHUNK])
                 for i in range(0, len(body), MILTER_CHUNK)]
    commands.append(me.EndOfMessage())
    return commands


class MilterTarget:
    """One milter session per new connection, lockstep as the negotiation allows."""

    def __init__(self, reactor: Any, host: str, port: int, message: bytes) -> None:
        self.reactor = reactor
        self.host = host
        self.port = port
        self.commands = milter_commands(message)
        self.frames = [command.encode() for command in self.commands]

    def __call__(self) -> Deferred[str]:
        return _connect(self.reactor, self.host, self.port, self._exchange)

    def _exchange(self, done: Deferred[str]) -> _Exchange:
        session = _MilterSession(self.commands, self.frames, done)
        exchange = _Exchange(MTA_OFFER.encode(), session.feed, session.closed, done)
        session.exchange = exchange
        return exchange


class _MilterSession:
    """The MTA side of one session: waits where a reply is owed, sends the rest at once."""

    def __init__(self, commands: Sequence[Any], frames: Sequence[bytes],
                 done: Deferred[str]) -> None:
        self.commands = commands
        self.frames = frames
        self.done = done
        self.decoder = milter_codec.MtaDecoder()
        self.protocol: int | None = None
        self.next = 0
        self.exchange: _Exchange | None = None

    def _send_until_reply(self) -> None:
        assert self.exchange is not None and self.exchange.transport is not None
        assert self.protocol is not None
        out = []
        while self.next < len(self.commands):
            command = self.commands[self.next]
            out.append(self.frames[self.next])
            self.next += 1
            if isinstance(command, me.Macro):
                continue
            if not self.protocol & _NO_REPLY_FLAG.get(type(command), 0):
                break
        self.exchange.transport.write(b"".join(out))

    def feed(self, data: bytes) -> bool:
        self.decoder.feed(data)
        for event in self.decoder:
            if self.protocol is None:
                if not isinstance(event, me.OptionNegotiationReply):
                    raise LoadError(f"milter: {type(event).__name__} before negotiation")
                self.protocol = event.protocol & MTA_OFFER.protocol
                self._send_until_reply()
                continue
            if isinstance(event, me.Progress):
                continue
            last = self.commands[self.next - 1]
            if not isinstance(event, _VERDICTS):
                if isinstance(last, me.EndOfMessage):
                    continue  # header or body changes before the verdict
                raise LoadError(f"milter: unexpected {type(event).__name__}")
            if isinstance(last, me.EndOfMessage) or not isinstance(event, me.Continue):
                return self._verdict(event)
            self._send_until_reply()
        return False

    def _verdict(self, event: Any) -> bool:
        assert self.exchange is not None and self.exchange.transport is not None
        self.exchange.transport.write(me.Quit().encode())
        if isinstance(event, (me.Tempfail, me.ConnectionFail)) or (
                isinstance(event, me.ReplyCode) and event.smtp_code[:1] == b"4"):
            raise LoadError(f"milter {type(event).__name__.lower()}")
        name = type(event).__name__.lower()
        if isinstance(event, me.ReplyCode):
            name = f"reply {event.smtp_code.decode('latin-1')}"
        self.done.callback(name)
        return True

    def closed(self) -> None:
        if not self.done.called:
            raise LoadError("milter: closed before the verdict")


class _FuzzyClient(protocol.DatagramProtocol):
    """One UDP socket; replies are matched to requests by tag."""

    noisy = False

    def __init__(self) -> None:
        self.pending: dict[int, Deferred[fuzzy_codec.FuzzyReply]] = {}

    def datagramReceived(self, datagram: bytes, addr: Any) -> None:  # noqa: N802
        try:
            reply = fuzzy_codec.decode_reply(datagram)
        except fuzzy_codec.FuzzyProtocolError:
            return
        waiting = self.pending.pop(reply.tag, None)
        if waiting is not None:
            waiting.callback(reply)


_REFUSALS = {403, 415, 500, 503}


class FuzzyTarget:
    """Plaintext version 4 CHECK or WRITE datagrams over one UDP socket per client.

    Digests come from a pool of ``digests`` seeded values, so a WRITE run
    followed by a CHECK run with the same spec looks up what was written.
    """

    def __init__(self, reactor: Any, host: str, port: int, command: str,
                 digests: int, seed: int) -> None:
        if command not in ("check", "write"):
            raise ValueError(f"fuzzy command must be check or write: {command!r}")
        self.reactor = reactor
        self.address = (host, port)
        self.command = (fuzzy_codec.Command.CHECK if command == "check"
                        else fuzzy_codec.Command.WRITE)
        pool = random.Random(seed)
        self.digests = [pool.randbytes(fuzzy_codec.DIGEST_SIZE) for _ in range(max(digests, 1))]
        self.random = random.Random()
        self.clients: list[tuple[_FuzzyClient, Any]] = []
        self._free: list[tuple[_FuzzyClient, Any]] = []

    def __call__(self) -> Deferred[str]:
        if self._free:
            client, port = self._free.pop()
        else:
            client = _FuzzyClient()
            port = self.reactor.listenUDP(0, client, interface=self.address[0])
            self.clients.append((client, port))
        tag = self.random.getrandbits(32)
        while tag in client.pending:
            tag = self.random.getrandbits(32)

        def cancel(d: Deferred[fuzzy_codec.FuzzyReply]) -> None:
            client.pending.pop(tag, None)

        answered: Deferred[fuzzy_codec.FuzzyReply] = Deferred(cancel)
        client.pending[tag] = answered
        command = fuzzy_codec.FuzzyCommand(
            version=4, command=self.command, tag=tag,
            digest=self.random.choice(self.digests), flag=1,
            value=1 if self.command == fuzzy_codec.Command.WRITE else 0)
        port.write(fuzzy_codec.encode_request(command), self.address)

        def release(result: Any) -> Any:
            self._free.append((client, port))
            return result

        return answered.addBoth(release).addCallback(self._outcome)

    def _outcome(self, reply: fuzzy_codec.FuzzyReply) -> str:
        if reply.prob <= 0.5 and reply.value in _REFUSALS:
            raise LoadError(f"fuzzy {reply.value}")
        if self.command == fuzzy_codec.Command.WRITE:
            return "written"
        return "hit" if reply.prob > 0.5 else "miss"

    def close(self) -> Deferred[Any]:
        """Stop listening on every client socket."""
        ports, self.clients, self._free = self.clients, [], []
        return defer.gatherResults([defer.maybeDeferred(p.stopListening) for _, p in ports])


def make_target(reactor: Any, spec: TargetSpec) -> Request:
    """The request function for ``spec`` (reads the message file once)."""
    if spec.transport == "http":
        return HttpTarget(reactor, spec.host, spec.port, _read_message(spec.message))
    if spec.transport == "milter":
        return MilterTarget(reactor, spec.host, spec.port, _read_message(spec.message))
    if spec.transport == "fuzzy":
        return FuzzyTarget(reactor, spec.host, spec.port, spec.command, spec.digests, spec.seed)
    raise ValueError(f"unknown transport {spec.transport!r}")


async def run_target(reactor: Any, spec: TargetSpec, concurrency: int,
                     requests: int | None, duration: float | None,
                     timeout: float = DEFAULT_TIMEOUT) -> RunStats:
    """Load ``spec`` from this process; wall-clock start/end so processes can be merged."""
    request = make_target(reactor, spec)
    wall = time.time() - reactor.seconds()
    try:
        stats = await run_closed_loop(reactor, request, concurrency, requests, duration, timeout)
    finally:
        close = getattr(request, "close", None)
        if close is not None:
            await close()
    return RunStats(stats.latencies, stats.errors, stats.started + wall, stats.ended + wall,
                    stats.cpu_seconds, 1, stats.outcomes, stats.error_kinds)


class _Child(protocol.ProcessProtocol):
    def __init__(self) -> None:
        self.out = bytearray()
        self.err = bytearray()
        self.ended: Deferred[RunStats] = Deferred()

    def outReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.out += data

    def errReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        self.err = (self.err + data)[-4096:]

    def processEnded(self, reason: Failure) -> None:  # noqa: N802 (Twisted API)
        try:
            stats = RunStats.from_json(json.loads(bytes(self.out)))
        except (ValueError, KeyError, TypeError):
            self.ended.errback(RuntimeError(
                f"generator process failed: {bytes(self.err[-2000:]).decode(errors='replace')}"))
            return
        self.ended.callback(stats)


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


async def run_processes(reactor: Any, spec: TargetSpec, processes: int, concurrency: int,
                        requests: int | None, duration: float | None,
                        timeout: float = DEFAULT_TIMEOUT) -> RunStats:
    """Load ``spec`` with ``processes`` generator processes; their stats merged.

    ``processes`` = 1 runs in this process.  Otherwise the concurrency (and
    the request count) is split as evenly as possible; every process gets at
    least one client.
    """
    if processes <= 1:
        return await run_target(reactor, spec, concurrency, requests, duration, timeout)
    processes = min(processes, concurrency)
    children = []
    budgets = _shares(requests, processes) if requests is not None else [None] * processes
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=here + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for clients, budget in zip(_shares(concurrency, processes), budgets):
        child = _Child()
        args = [sys.executable, "-m", "bench.loadgen", spec.to_json(), str(clients),
                "-" if budget is None else str(budget),
                "-" if duration is None else str(duration), str(timeout)]
        reactor.spawnProcess(child, sys.executable, args, env=env, path=here)
        children.append(child.ended)
    return merge(await defer.gatherResults(children, consumeErrors=True))


def main(argv: Sequence[str]) -> None:
    """``python -m bench.loadgen SPEC_JSON CONCURRENCY REQUESTS|- DURATION|- TIMEOUT``.

    Runs one generator process and prints its :class:`RunStats` as JSON.
    """
    spec_json, concurrency, requests, duration, timeout = argv

    async def run(reactor: Any) -> None:
        stats = await run_target(
            reactor, TargetSpec.from_json(spec_json), int(concurrency),
            None if requests == "-" else int(requests),
            None if duration == "-" else float(duration), float(timeout))
        sys.stdout.write(json.dumps(stats.to_json()))
        sys.stdout.flush()

    task.react(lambda r: defer.ensureDeferred(run(r)))


if __name__ == "__main__":
    main(sys.argv[1:])
