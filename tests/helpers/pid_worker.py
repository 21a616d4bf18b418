"""A supervised worker process for tests: answers every connection with its PID.

Run as ``python pid_worker.py FDS CONTROL_FILE``: it serves the listening
sockets inherited on the comma-separated descriptors ``FDS`` with a
:class:`rspamd_tx.runtime.WorkerService` and stops when its standard input
(the supervisor's pipe) closes or on ``SIGTERM``. Each connection gets
``"<pid> <generation>\\n"``; the log goes to ``CONTROL_FILE.log``. On
``SIGHUP`` the worker "reloads" from ``CONTROL_FILE``: a number becomes the
new generation, ``error`` is a configuration with an error diagnostic,
``raise`` one that fails to load.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.protocol import Factory, Protocol

from rspamd_tx.config.schema import Diagnostic
from rspamd_tx.config.tree import ConfigError, Location
from rspamd_tx.config.workers import WorkerCommon


def one_process_common() -> WorkerCommon:
    """Common worker options of one process on a loopback port."""
    return WorkerCommon(bind_socket=("127.0.0.1:0",), count=1)


@dataclass
class FakeWorker:
    """A WorkerConfig stand-in carrying a generation number."""

    generation: int
    type: str = "pid"
    common: WorkerCommon = field(default_factory=one_process_common)


@dataclass
class FakeConfig:
    """A Config stand-in with one worker."""

    workers: tuple[FakeWorker, ...]

    def workers_of(self, worker_type: str) -> list[FakeWorker]:
        return [w for w in self.workers if w.type == worker_type]


class PidProtocol(Protocol):
    def connectionMade(self) -> None:
        assert self.transport is not None
        assert isinstance(self.factory, PidFactory)
        generation = self.factory.builder.worker.generation
        self.transport.write(f"{os.getpid()} {generation}\n".encode())
        self.transport.loseConnection()


class PidFactory(Factory):
    """Serves :class:`PidProtocol` for ``builder``."""

    protocol = PidProtocol

    def __init__(self, builder: PidBuilder) -> None:
        self.builder = builder


class PidBuilder:
    """A WorkerBuilder whose answers show PID and configuration generation."""

    def __init__(self, config: FakeConfig, worker: FakeWorker, reactor: Any):
        self.worker = worker
        self.factory = PidFactory(self)

    def stream_factory(self) -> PidFactory:
        return self.factory

    def datagram_protocol(self) -> None:
        return None

    def services(self) -> list[Any]:
        return []

    def reconfigure(self, config: FakeConfig, worker: FakeWorker) -> None:
        self.worker = worker

    def drain(self) -> Deferred[None]:
        return succeed(None)


def reloader(path: str) -> Any:
    def reload() -> tuple[FakeConfig, list[Diagnostic]]:
        with open(path) as f:
            text = f.read().strip()
        if text == "raise":
            raise ConfigError("unterminated string", Location("broken.inc", 2, 7))
        if text == "error":
            return FakeConfig((FakeWorker(-1),)), [
                Diagnostic("error", "count: expected an integer",
                           Location("local.d/worker-proxy.inc", 1, 9))]
        return FakeConfig((FakeWorker(int(text)),)), []

    return reload


def main() -> None:
    from twisted.internet import reactor
    from twisted.logger import globalLogBeginner, textFileLogObserver

    from rspamd_tx.runtime import WorkerService, inherited_sockets
    from rspamd_tx.supervisor import ParentWatch

    log_file = open(sys.argv[2] + ".log", "a")
    globalLogBeginner.beginLoggingTo([textFileLogObserver(log_file)])
    fds = [int(fd) for fd in sys.argv[1].split(",")]
    config = FakeConfig((FakeWorker(1),))
    # Stand-ins for Config, WorkerConfig and the builder: the runtime only
    # uses what they provide.
    service = WorkerService(config, config.workers[0],  # type: ignore[arg-type]
                            PidBuilder,  # type: ignore[arg-type]
                            reactor, inherited_sockets(fds),
                            reload=reloader(sys.argv[2]))
    watch = ParentWatch(reactor)
    service.privilegedStartService()
    service.startService()
    watch.startService()
    reactor.addSystemEventTrigger("before", "shutdown", watch.stopService)
    reactor.addSystemEventTrigger("before", "shutdown", service.stopService)
    reactor.run()


if __name__ == "__main__":
    main()
