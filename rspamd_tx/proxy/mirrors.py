"""Mirrors and compare scripts around the upstream scanner (upstreams-and-proxy.md §4.5–§4.7).

:class:`MirroringScanner` is the :class:`~rspamd_tx.proxy.scanning.IScanner`
the proxy's listeners use.  For each scan (a *session*):

* one ``coin`` in ``[0, 1)`` is drawn; every ``mirror`` block whose
  ``probability ≥ coin`` gets a copy of the request, sent in parallel with the
  master scan and transformed like it (:class:`~rspamd_tx.proxy.upstream_scanner.RequestSender`:
  the mirror's own ``settings_id``, ``key``, ``compression``, ``local``,
  ``timeout``, ``log_tag_type``);
* a mirror has its own :class:`~rspamd_tx.upstreams.balancer.Balancer`
  (round-robin, the global ``options.upstream`` limits, no proxy override), gets
  exactly one attempt, and its failures are counted there only;
* the client's answer is the master's (:class:`~rspamd_tx.proxy.upstream_scanner.UpstreamScanner`),
  delivered as soon as it arrives: mirrors never delay or change it;
* once the master and every mirror have finished, and when the master reply
  parsed to results, each compare script is called with ``results.master``
  and ``results[<mirror name>]`` (the parsed reply, or ``"cannot parse
  ucl"``, ``"unknown error"`` or the I/O error message) and the session's
  log tag — on a later reactor turn, so after the client was answered.

Replies are parsed (:func:`parse_reply`) from the body up to ``Message-Offset``:
with the block's ``parser`` when it has one, else as JSON when the
``Content-Type`` is ``application/json``; other replies have no results.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from twisted.internet.defer import Deferred, DeferredList
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from rspamd_tx.config.workers import GlobalOptions, MirrorBlock, ProxyOptions, UpstreamBlock
from rspamd_tx.protocols.http_codec import header_value
from rspamd_tx.proxy.compare_scripts import (
    CompareScripts,
    LuaEnvironment,
    LuaScriptError,
    ReplyParser,
)
from rspamd_tx.proxy.scanning import IScanner, ScanReply, ScanRequest
from rspamd_tx.proxy.upstream_scanner import Backend, UpstreamScanner
from rspamd_tx.upstreams.balancer import (
    Address,
    AllAttemptsFailed,
    AllDownPolicy,
    Balancer,
    CallResult,
    Limits,
    NoUpstreamAvailable,
    Resolver,
    UpstreamTimeout,
)
from rspamd_tx.upstreams.hosts import DEFAULT_PROXY_PORT, parse_upstreams
from rspamd_tx.upstreams.http_client import ConnectError, ScannerError, ScannerResponse

__all__ = [
    "CANNOT_PARSE",
    "Mirror",
    "MirroringScanner",
    "ReplyParseError",
    "UNKNOWN_ERROR",
    "parse_reply",
]

log = Logger()

#: A mirror reply that did not parse.
CANNOT_PARSE = "cannot parse ucl"
#: A mirror reply without results and without an error.
UNKNOWN_ERROR = "unknown error"

_JSON = "application/json"


class ReplyParseError(Exception):
    """A reply body that its parser (Lua or JSON) rejected: its results are
    ``"cannot parse ucl"``."""


def parse_reply(
    headers: Iterable[tuple[str, str]], body: bytes, parser: ReplyParser | None
) -> Any | None:
    """The results of a backend reply, or ``None`` when it has none.

    The body is cut at a valid ``Message-Offset``; an empty body has no
    results.  With ``parser`` its result is taken (``None`` for nil); without,
    only an ``application/json`` reply (exactly, any case) is parsed as JSON.

    Raises :class:`ReplyParseError` (only) when the parser or the JSON decoder fails.
    """
    header_list = list(headers)
    offset = header_value(header_list, "Message-Offset")
    if offset is not None and offset.strip().isdigit() and int(offset) < len(body):
        body = body[: int(offset)]
    if not body:
        return None
    if parser is not None:
        try:
            return parser.parse(body)
        except LuaScriptError as exc:
            raise ReplyParseError(str(exc)) from None
    content_type = (header_value(header_list, "Content-Type") or "").strip()
    if content_type.lower() != _JSON:
        return None
    try:
        return json.loads(body)
    except (ValueError, RecursionError) as exc:
        raise ReplyParseError(str(exc) or type(exc).__name__) from None


def _text_headers(headers: Iterable[tuple[bytes, bytes]]) -> list[tuple[str, str]]:
    return [(name.decode("latin-1"), value.decode("latin-1")) for name, value in headers]


def _mirror_limits(global_options: GlobalOptions) -> Limits:
    tunables = global_options.upstream
    return Limits(
        max_errors=tunables.max_errors,
        error_time=tunables.error_time,
        revive_time=tunables.revive_time,
        lazy_resolve_time=tunables.lazy_resolve_time,
        resolve_min_interval=tunables.resolve_min_interval,
    )


def _active(blocks: Iterable[MirrorBlock]) -> list[MirrorBlock]:
    return [block for block in blocks if block.enabled and not block.disabled]


class Mirror:
    """One ``mirror`` block: its balancer, timeout and parser.

    Attributes:
        block: the configuration block.
        name: the mirror name (the key in compare scripts' ``results``).
        balancer: round-robin over the block's ``hosts``, global limits.
        timeout: seconds the single attempt may take.
        parser: the block's reply parser, if any.
    """

    def __init__(
        self,
        block: MirrorBlock,
        options: ProxyOptions,
        global_options: GlobalOptions,
        clock: Any,
        resolver: Resolver | None,
        rng: random.Random | None,
        parser: ReplyParser | None,
    ) -> None:
        self.block = block
        self.name = block.name
        self.parser = parser
        self.timeout = self._timeout(block, options)
        self.balancer = Balancer(
            parse_upstreams(block.hosts, DEFAULT_PROXY_PORT),
            clock=clock,
            resolver=resolver,
            rng=rng,
            limits=_mirror_limits(global_options),
            all_down=AllDownPolicy.REVIVE_ALL,
        )

    @staticmethod
    def _timeout(block: MirrorBlock, options: ProxyOptions) -> float:
        return block.timeout if block.timeout is not None and block.timeout > 0 else options.timeout

    def update(
        self,
        block: MirrorBlock,
        options: ProxyOptions,
        global_options: GlobalOptions,
        parser: ReplyParser | None,
    ) -> None:
        """Take a new block of the same name, keeping upstream states."""
        self.block = block
        self.parser = parser
        self.timeout = self._timeout(block, options)
        self.balancer.update(parse_upstreams(block.hosts, DEFAULT_PROXY_PORT))
        self.balancer.limits = _mirror_limits(global_options)

    def upstream_name(self, address: Address) -> str:
        """The name of the upstream ``address`` belongs to (the address text if none)."""
        for upstream in self.balancer.upstreams:
            if address in upstream.addresses:
                return upstream.name
        return str(address)


@dataclass
class _Session:
    """What one scan's compare scripts need, filled in as replies arrive."""

    log_tag: str
    pending: int
    master_parser: ReplyParser | None
    master: Any | None = None
    mirrors: dict[str, Any] = field(default_factory=dict)


@implementer(IScanner)
class MirroringScanner:
    """The master scanner plus mirrors and compare scripts; see the module docstring.

    Args:
        scanner: the master :class:`UpstreamScanner` (its sender, reactor and
            options are shared).
        global_options: the global ``options`` (mirror balancer limits).
        resolver: resolves mirror host names.
        rng: draws the per-session coin and feeds the mirror balancers.
        environment: the Lua state for scripts and parsers (default: one is
            made when the options have a script or a parser).

    Attributes:
        name: ``"upstreams"``.
        mirrors: mirror name → :class:`Mirror`, in block order.
        scripts: the compare scripts (possibly none).
    """

    name = "upstreams"

    def __init__(
        self,
        scanner: UpstreamScanner,
        global_options: GlobalOptions,
        *,
        resolver: Resolver | None = None,
        rng: random.Random | None = None,
        environment: LuaEnvironment | None = None,
    ) -> None:
        self.scanner = scanner
        self.reactor = scanner.reactor
        self.global_options = global_options
        self.resolver = resolver
        self.rng = rng if rng is not None else random.Random()
        self.environment = environment
        self.options = scanner.options
        self.mirrors: dict[str, Mirror] = {}
        self.scripts: CompareScripts | None = None
        self._upstream_parsers: dict[str, ReplyParser | None] = {}
        self._started = False
        self._configure(scanner.options)

    # -- configuration --------------------------------------------------------

    def _lua(self) -> LuaEnvironment:
        if self.environment is None:
            self.environment = LuaEnvironment()
        return self.environment

    def _parser(self, block: UpstreamBlock | MirrorBlock, what: str) -> ReplyParser | None:
        if not block.parser:
            return None
        try:
            return ReplyParser(self._lua(), block.parser, f"parser of {what} {block.name}")
        except LuaScriptError as exc:
            log.error(
                "{error}; replies of {what} {name} are parsed as JSON",
                error=exc, what=what, name=block.name,
            )
            return None

    def _configure(self, options: ProxyOptions) -> None:
        self.options = options
        self._upstream_parsers = {
            block.name.lower(): self._parser(block, "upstream")
            for block in options.upstreams
            if block.parser
        }
        self.scripts = (
            CompareScripts(self._lua(), options.scripts, skip_broken=True) if options.scripts else None
        )
        old, self.mirrors = self.mirrors, {}
        for block in _active(options.mirrors):
            parser = self._parser(block, "mirror")
            mirror = old.pop(block.name, None)
            if mirror is not None:
                mirror.update(block, options, self.global_options, parser)
            else:
                mirror = Mirror(
                    block, options, self.global_options, self.reactor, self.resolver, self.rng, parser
                )
                if self._started:
                    mirror.balancer.start()
            self.mirrors[block.name] = mirror
        for removed in old.values():
            removed.balancer.stop()

    def update(self, options: ProxyOptions, global_options: GlobalOptions | None = None) -> None:
        """Switch to new options (SIGHUP): mirrors kept by name keep their upstream
        states; scripts and parsers are reloaded.  The master scanner is updated
        by its owner."""
        if global_options is not None:
            self.global_options = global_options
        self._configure(options)

    def route(self, route: bytes | None) -> Backend | None:
        """The master backend for a ``Host`` value (:meth:`UpstreamScanner.route`)."""
        return self.scanner.route(route)

    def balancers(self) -> dict[str, Balancer]:
        """Mirror name → balancer."""
        return {name: mirror.balancer for name, mirror in self.mirrors.items()}

    def start(self) -> Deferred[None]:
        """Resolve mirror host names; fires when every mirror's are resolved."""
        self._started = True
        starting = [mirror.balancer.start() for mirror in self.mirrors.values()]
        settled: Deferred[Any] = DeferredList(starting, consumeErrors=True)
        return settled.addCallback(lambda _: None)

    def stop(self) -> None:
        """Cancel the mirror balancers' timers (the shared client is closed by the master scanner)."""
        self._started = False
        for mirror in self.mirrors.values():
            mirror.balancer.stop()

    # -- scanning -------------------------------------------------------------

    def scan(self, request: ScanRequest) -> Deferred[ScanReply]:
        """Scan with the master; copy to the mirrors the coin selects; see :meth:`IScanner.scan`."""
        coin = self.rng.random()
        chosen = [m for m in self.mirrors.values() if m.block.probability >= coin]
        scripts = self.scripts if self.scripts else None
        session: _Session | None = None
        if scripts is not None:
            backend = self.scanner.route(request.route)
            parser = self._upstream_parsers.get(backend.name.lower()) if backend is not None else None
            session = _Session(request.log_tag, len(chosen) + 1, parser)
        for mirror in chosen:
            self._send_mirror(mirror, request, session, scripts)
        master = self.scanner.scan(request)
        if session is not None and scripts is not None:
            master.addBoth(self._master_done, session, scripts)
        return master

    def _send_mirror(
        self,
        mirror: Mirror,
        request: ScanRequest,
        session: _Session | None,
        scripts: CompareScripts | None,
    ) -> None:
        block = mirror.block
        max_size = self.options.max_message
        log_tag_type = self.options.log_tag_type
        sender = self.scanner.sender

        def attempt(address: Address) -> Deferred[ScannerResponse]:
            return sender.send(
                request,
                block,
                address,
                mirror.upstream_name(address),
                timeout=mirror.timeout,
                max_size=max_size,
                log_tag_type=log_tag_type,
            )

        log.info("<{log_tag}> send request to mirror {mirror}", log_tag=request.log_tag, mirror=mirror.name)
        call: Deferred[CallResult[ScannerResponse]] = mirror.balancer.call(
            attempt,
            key=request.hash_key,
            size=len(request.body),
            timeout=mirror.timeout + 1.0,
            max_retries=1,
            retryable=lambda failure: failure.check(ScannerError) is not None,
            address_failure=lambda failure: failure.check(ConnectError) is not None,
        )
        call.addCallbacks(
            self._mirror_replied,
            self._mirror_failed,
            callbackArgs=(mirror, request.log_tag),
            errbackArgs=(mirror, request.log_tag),
        )
        if session is not None and scripts is not None:
            call.addCallback(self._mirror_done, mirror, session, scripts)
        call.addErrback(lambda failure: log.failure("mirror {mirror}", failure, mirror=mirror.name))

    def _mirror_replied(self, result: CallResult[ScannerResponse], mirror: Mirror, log_tag: str) -> Any:
        response = result.value
        log.info(
            "<{log_tag}> finished mirror connection to {mirror} ({upstream}): {status}",
            log_tag=log_tag, mirror=mirror.name, upstream=result.upstream, status=response.status,
        )
        try:
            parsed = parse_reply(response.headers, response.body, mirror.parser)
        except ReplyParseError as exc:
            log.warn(
                "<{log_tag}> cannot parse results from the mirror backend {mirror}: {error}",
                log_tag=log_tag, mirror=mirror.name, error=exc,
            )
            return CANNOT_PARSE
        return parsed if parsed is not None else UNKNOWN_ERROR

    def _mirror_failed(self, failure: Failure, mirror: Mirror, log_tag: str) -> str:
        error = failure.value
        if isinstance(error, AllAttemptsFailed):
            last = error.last_failure.value
            reason = last.reason if isinstance(last, ScannerError) else str(last) or UNKNOWN_ERROR
        elif isinstance(error, NoUpstreamAvailable):
            reason = "cannot select upstream"
        elif isinstance(error, UpstreamTimeout):
            reason = "IO timeout"
        elif isinstance(error, ScannerError):
            reason = error.reason
        else:
            reason = str(error) or type(error).__name__
        log.error(
            "<{log_tag}> mirror {mirror} failed: {reason}", log_tag=log_tag, mirror=mirror.name, reason=reason
        )
        return reason

    def _mirror_done(self, value: Any, mirror: Mirror, session: _Session, scripts: CompareScripts) -> None:
        session.mirrors[mirror.name] = value
        self._finished_one(session, scripts)

    def _master_done(self, result: Any, session: _Session, scripts: CompareScripts) -> Any:
        try:
            if isinstance(result, ScanReply):
                try:
                    session.master = parse_reply(
                        _text_headers(result.headers), result.body, session.master_parser
                    )
                except ReplyParseError as exc:
                    log.warn(
                        "<{log_tag}> cannot parse master results: {error}",
                        log_tag=session.log_tag, error=exc,
                    )
            self._finished_one(session, scripts)
        except Exception:
            log.failure("<{log_tag}> compare scripts", log_tag=session.log_tag)
        return result

    def _finished_one(self, session: _Session, scripts: CompareScripts) -> None:
        session.pending -= 1
        if session.pending == 0 and session.master is not None:
            self.reactor.callLater(0, self._run_scripts, session, scripts)

    def _run_scripts(self, session: _Session, scripts: CompareScripts) -> None:
        results: dict[str, Any] = {"master": session.master}
        results.update(session.mirrors)
        scripts.run(results, session.log_tag)

