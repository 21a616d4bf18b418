"""Fuzzy storage over UDP: ours vs Rspamd 3.4's fuzzy storage.

One ``redis-server`` serves every Redis-backed storage; each storage gets its
own key ``prefix`` so each reads back only what it wrote.  The storages, all
running at once and taking turns in slices (see :mod:`bench.cases`):

* ``rspamd redis`` -- Rspamd 3.4's ``fuzzy`` worker, ``backend = "redis"``, ``count = 1``;
* ``ours redis c1`` -- ``twistd -n fuzzy-storage``, same Redis, ``count = 1``;
* ``ours redis c2`` -- the same with ``count = 2`` (two processes on one socket);
* ``ours sqlite`` -- ours on its embedded SQLite store, ``count = 1``.

Each gets a WRITE run (plaintext version 4 datagrams, weight 1, flag 1, from a
pool of 1000 digests; 127.0.0.1 is in ``allow_update``), then -- after one
``sync`` period so the writes are flushed -- a CHECK run over the same pool
(its outcomes show the hit ratio).  Concurrency 16 clients, each with its own
UDP socket; a datagram unanswered after 2 s counts as a timeout error.
"""

from __future__ import annotations

from typing import Any

from twisted.internet import task

from bench.cases import CaseTarget, measure_case
from bench.loadgen import TargetSpec, run_target
from bench.peers import Daemon, StartError, rspamd_worker_pid, start_ours
from bench.report import Report, Result, Settings, brief
from tests.peers.redis import start_redis
from tests.peers.rspamd import free_port, start_rspamd

__all__ = ["run"]

BENCH = "fuzzy"
CONCURRENCY = 16
SYNC = 2.0
UDP_TIMEOUT = 2.0
COMMANDS = ("write", "check")


def storage_options(port: int | None, backend: str, redis_port: int | None, prefix: str,
                    count: int | None) -> str:
    """A ``worker-fuzzy.inc`` body shared by Rspamd and ours.

    ``bind_socket`` and ``count`` are left out when ``port``/``count`` are
    ``None`` (the Rspamd helper writes its own).
    """
    text = f'sync = {SYNC:g}s;\nallow_update = ["127.0.0.1"];\n'
    if count is not None:
        text = f"count = {count};\n" + text
    if port is not None:
        text = f'bind_socket = "127.0.0.1:{port}";\n' + text
    if backend == "redis":
        text += f'backend = "redis";\nservers = "127.0.0.1:{redis_port}";\nprefix = "{prefix}";\n'
    else:
        text += 'backend = "sqlite";\n'
    return text


async def _answers(reactor: Any, port: int) -> bool:
    """Whether a storage on ``port`` answers a CHECK datagram within half a second."""
    stats = await run_target(reactor, TargetSpec("fuzzy", "127.0.0.1", port), 1, 1, None, 0.5)
    return stats.completed == 1


OURS = (("ours redis c1", "redis", 1), ("ours redis c2", "redis", 2),
        ("ours sqlite", "sqlite", 1))
"""Our storages: report name, backend, process count."""


async def _start_storages(reactor: Any, report: Report, redis_port: int,
                          stack: list[Any]) -> list[tuple[str, int, int | None]]:
    """Start Rspamd's storage and ours; (name, port, pid) of those that answer.

    Every started daemon's ``stop`` is pushed on ``stack``.
    """
    started: list[tuple[str, int, int | None]] = []
    print("fuzzy: starting Rspamd's fuzzy storage (redis)", flush=True)
    try:
        rspamd = await start_rspamd(
            reactor, workers=("fuzzy",),
            worker_options={"fuzzy": storage_options(None, "redis", redis_port,
                                                     "fz_rspamd", None)})
    except Exception as exc:
        report.note(f"fuzzy: Rspamd's storage did not start: {brief(exc)}")
    else:
        stack.append(rspamd.stop)
        started.append(("rspamd redis", rspamd.ports["fuzzy"],
                        rspamd_worker_pid(rspamd.pid, "fuzzy")))
    for target, backend, count in OURS:
        port = free_port()
        print(f"fuzzy: starting our storage ({target})", flush=True)
        options = storage_options(port, backend, redis_port, f"fz_ours_{backend}{count}", count)
        try:
            ours: Daemon = await start_ours(
                reactor, "fuzzy-storage", port, {"worker-fuzzy.inc": options},
                ready=lambda daemon: _answers(reactor, daemon.port), timeout=20.0)
        except StartError as exc:
            report.note(f"fuzzy: {target} not measured (no answer to a CHECK): {brief(exc)}")
            for command in COMMANDS:
                report.add(Result(BENCH, command.upper(), target, note="did not start"))
            continue
        stack.append(ours.stop)
        started.append((target, port, ours.pid))
    return started


async def run(reactor: Any, settings: Settings, report: Report) -> None:
    """Run every fuzzy case; results and notes go to ``report``.

    All storages run at once (idle while another is measured) so that the
    targets of a case can take turns (see :mod:`bench.cases`).
    """
    print("fuzzy: starting redis", flush=True)
    try:
        redis = await start_redis(reactor)
    except Exception as exc:
        report.note(f"fuzzy: redis did not start, nothing measured: {brief(exc)}")
        return
    stack: list[Any] = [redis.stop]
    try:
        storages = await _start_storages(reactor, report, redis.port, stack)
        for command in COMMANDS:
            if command == "check":
                await task.deferLater(reactor, SYNC * 1.5 + 0.5, lambda: None)
            await measure_case(
                reactor, report, settings, BENCH, command.upper(),
                [CaseTarget(name, TargetSpec("fuzzy", "127.0.0.1", port, command=command),
                            [pid] if pid is not None else [])
                 for name, port, pid in storages],
                CONCURRENCY, timeout=min(UDP_TIMEOUT, settings.timeout))
    finally:
        while stack:
            await stack.pop()()


def print_report(report: Report) -> None:
    """The fuzzy tables: every run and each of ours ÷ Rspamd."""
    print("\n== fuzzy storage over UDP (plaintext v4; rspamd = Rspamd 3.4 fuzzy worker)")
    print(report.table(BENCH))
    print("\nours ÷ Rspamd (req/s: > 1 is faster; p99: < 1 is faster)")
    print(report.ratios(BENCH, "rspamd redis",
                        ["ours redis c1", "ours redis c2", "ours sqlite"]))
