"""``dynamic_keys_map``: extra server keypairs read from a map and reloaded when it changes.

Rspamd 3.8.2+ lets a fuzzy worker take keypairs from a map whose content is a
UCL array of keypair objects (each as the ``keypair`` option takes it, bare or
wrapped in ``keypair { … }``).  :class:`DynamicKeys` keeps that set loaded:

* each load that succeeds replaces the whole set;
* content that is not an array (a syntax error, an object…) is logged and the
  keys loaded before stay; an element that is not a usable keypair is
  logged and skipped, the others load;
* a local map (``/path``, ``./path``, ``file:///path``) is checked every
  ``file_interval`` seconds and read again when its inode, size or
  modification time changed; a file that is missing or unreadable keeps the
  previous keys (logged once until it changes again);
* an HTTP(S) map is fetched every ``interval`` seconds, with
  ``If-Modified-Since`` / ``If-None-Match`` from the last good answer; ``304``
  keeps the keys; a body over :data:`MAX_MAP_SIZE` bytes is refused (the
  transfer is stopped there) and any other failure is logged.

How the keys are used (see :class:`~rspamd_tx.fuzzy.storage.FuzzyPolicy`):
an encrypted request's key id is looked up among the static ``keypair``\\ s,
then among these; only a static keypair is ever the default key.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import CancelledError, Deferred, succeed
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import LoopingCall
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web.client import ResponseDone
from twisted.web.http_headers import Headers

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import ConfigError
from rspamd_tx.protocols.keypair import Keypair, KeypairError

__all__ = ["FETCH_TIMEOUT", "MAX_MAP_SIZE", "DynamicKeys", "KeyMapError", "parse_keypairs"]

log = Logger()

MAX_MAP_SIZE = 1 << 20
"""Largest map body accepted from an HTTP(S) map, in bytes."""

FETCH_TIMEOUT = 30.0
"""Seconds an HTTP(S) map may take to answer, and again to send its body."""


class KeyMapError(Exception):
    """A map's content cannot be used as a whole (the previous keys stay)."""


def parse_keypairs(text: str, source: str) -> tuple[Keypair, ...]:
    """The keypairs of a map's ``text`` (a UCL array of keypair objects).

    Elements that are not usable keypairs are logged and skipped.

    :raises KeyMapError: ``text`` is not UCL, or not an array.
    """
    try:
        # A top-level array is not a configuration document; as a value it is.
        value = ucl.loads("keys = " + text, filename=source)["keys"]
    except ConfigError as error:  # the parser bounds nesting itself
        raise KeyMapError(str(error)) from None
    if not isinstance(value, list):
        raise KeyMapError(f"{source}: the map is not an array of keypairs")
    keypairs: list[Keypair] = []
    for number, element in enumerate(value, 1):
        try:
            keypairs.append(Keypair.from_ucl(element))
        except KeypairError as error:
            log.warn("{source}: keypair {number} skipped: {error}",
                     source=source, number=number, error=error.message)
    return tuple(keypairs)


def _local_path(url: str) -> str | None:
    """The file of a local map, ``None`` for an HTTP(S) one."""
    if url.startswith(("http://", "https://")):
        return None
    return url[len("file://"):] if url.startswith("file://") else url


class _CappedBody(Protocol):
    """Collects a response body into :attr:`done`, giving up past ``limit``
    bytes; cancelling :attr:`done` stops the transfer too."""

    def __init__(self, limit: int) -> None:
        self.done: Deferred[bytes] = Deferred(lambda _: self._stop())
        self.limit = limit
        self.parts: list[bytes] = []
        self.size = 0

    def _stop(self) -> None:
        # A response body's transport is an IPushProducer.
        stop = getattr(self.transport, "stopProducing", None)
        if stop is not None:
            stop()

    def dataReceived(self, data: bytes) -> None:  # noqa: N802 (Twisted API)
        if self.done.called:
            return
        self.size += len(data)
        if self.size > self.limit:
            self.done.errback(KeyMapError(f"map larger than {self.limit} bytes"))
            self._stop()
            return
        self.parts.append(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:  # noqa: N802
        if self.done.called:
            return
        if reason.check(ResponseDone):
            self.done.callback(b"".join(self.parts))
        else:
            self.done.errback(reason)


class DynamicKeys(Service):
    """Keeps the keypairs of one ``dynamic_keys_map`` loaded (see the module docstring).

    Args:
        url: the map (a path, ``file://`` or ``http(s)://`` URL).
        use: called with the whole new set of keypairs after each load.
        clock: time, for the checks.
        interval: seconds between fetches of an HTTP(S) map.
        file_interval: seconds between checks of a local map.
        agent: an ``IAgent`` for HTTP(S) maps (``None``: they are not fetched).

    Attributes:
        keypairs: the keypairs of the last good load.
    """

    def __init__(self, url: str, use: Callable[[tuple[Keypair, ...]], None],
                 clock: IReactorTime, interval: float, file_interval: float,
                 agent: Any = None) -> None:
        self.url = url
        self.use = use
        self.clock = clock
        self.agent = agent
        self.path = _local_path(url)
        self.interval = file_interval if self.path is not None else interval
        self.keypairs: tuple[Keypair, ...] = ()
        self._loop: LoopingCall | None = None
        self._signature: tuple[int, int, int] | None = None
        self._problem: str | None = None
        self._validators: dict[str, str] = {}
        self._fetching: Deferred[None] | None = None

    def startService(self) -> None:
        """Load the map now, then check it every interval."""
        Service.startService(self)
        self._loop = LoopingCall(self.check)
        self._loop.clock = self.clock
        self._loop.start(max(self.interval, 0.1), now=True).addErrback(
            lambda failure: log.failure("dynamic_keys_map checks stopped", failure))

    def stopService(self) -> None:
        """Stop checking (and give up a fetch under way); the keys stay in use."""
        Service.stopService(self)
        if self._loop is not None and self._loop.running:
            self._loop.stop()
        self._loop = None
        if self._fetching is not None:
            self._fetching.cancel()

    def check(self) -> Deferred[None]:
        """Load the map if it changed; never fails."""
        if self.path is not None:
            self._check_file(self.path)
            return succeed(None)
        if self._fetching is not None:
            return self._fetching
        if self.agent is None:
            self._report(f"{self.url}: no HTTP client to fetch the map with")
            return succeed(None)
        d = self._fetch()
        self._fetching = d

        def done(_: object) -> None:
            self._fetching = None

        return d.addBoth(done)

    # -- local maps ------------------------------------------------------------

    def _check_file(self, path: str) -> None:
        try:
            info = os.stat(path)
        except OSError as error:
            self._report(f"{self.url}: {error.strerror or error}; keeping the loaded keys")
            self._signature = None
            return
        signature = (info.st_ino, info.st_size, info.st_mtime_ns)
        if signature == self._signature:
            return
        try:
            with open(path, encoding="utf-8") as handle:
                text = handle.read()
        except (OSError, UnicodeDecodeError) as error:
            self._report(f"{self.url}: {error}; keeping the loaded keys")
            return
        self._signature = signature
        self._load(text)

    # -- HTTP(S) maps ------------------------------------------------------------

    def _fetch(self) -> Deferred[None]:
        headers = Headers()
        for name, value in self._validators.items():
            headers.addRawHeader(name, value)
        d: Deferred[Any] = self.agent.request(b"GET", self.url.encode("ascii"), headers)
        d.addTimeout(FETCH_TIMEOUT, self.clock)

        def answered(response: Any) -> Deferred[None] | None:
            if response.code == 304:
                return None
            if response.code != 200:
                response.deliverBody(Protocol())  # the body is not wanted
                raise KeyMapError(f"HTTP status {response.code}")
            length = response.length
            if isinstance(length, int) and length > MAX_MAP_SIZE:
                raise KeyMapError(f"map larger than {MAX_MAP_SIZE} bytes")
            reader = _CappedBody(MAX_MAP_SIZE)
            response.deliverBody(reader)
            body = reader.done.addTimeout(FETCH_TIMEOUT, self.clock)
            validators: dict[str, str] = {}
            for name, header in (("If-Modified-Since", b"last-modified"),
                                 ("If-None-Match", b"etag")):
                values = response.headers.getRawHeaders(header)
                if values:
                    validators[name] = values[0].decode("latin-1")

            def loaded(data: bytes) -> None:
                try:
                    text = data.decode("utf-8")
                except UnicodeDecodeError as error:
                    raise KeyMapError(f"not UTF-8 text: {error}") from None
                if self._load(text):
                    self._validators = validators

            return body.addCallback(loaded)

        def failed(failure: Failure) -> None:
            if not failure.check(CancelledError):
                self._report(f"{self.url}: {failure.getErrorMessage()}; keeping the loaded keys")

        return d.addCallback(answered).addErrback(failed)

    # -- both ----------------------------------------------------------------------

    def _load(self, text: str) -> bool:
        """Use the keypairs of ``text``; False (logged, keys kept) when it is unusable."""
        try:
            keypairs = parse_keypairs(text, self.url)
        except KeyMapError as error:
            self._report(f"{error}; keeping the loaded keys")
            return False
        self._problem = None
        self.keypairs = keypairs
        self.use(keypairs)
        log.info("{url}: {count} dynamic keypairs loaded", url=self.url, count=len(keypairs))
        return True

    def _report(self, problem: str) -> None:
        """Log ``problem`` unless it is the one logged last."""
        if problem != self._problem:
            self._problem = problem
            log.warn("dynamic_keys_map {problem}", problem=problem)
