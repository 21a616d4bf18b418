"""Logging set-up on :mod:`twisted.logger`: text or JSON lines, a level, tags.

Settings come from the configuration's ``logging`` section (``type`` console,
stderr, file or syslog; ``filename``; ``level``; and our ``json = true``) and from
the command line (``--json-log``, ``--log-level``), see :class:`LogSettings`.
:func:`make_observer` turns them into one :class:`LogObserver`, whose
``reopen()`` follows log rotation (``SIGUSR1``, as in Rspamd).

Every message can carry a tag, as Rspamd's task logs carry the queue id:
:func:`tagged_logger` returns a :class:`Logger` whose events all have
``log_tag``; text lines show it as ``<tag>`` and JSON lines as ``"tag"``.
"""

from __future__ import annotations

import json
import os
import syslog
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from functools import lru_cache
from string import Formatter
from typing import IO, Any

from twisted.logger import (
    ILogObserver,
    LogEvent,
    Logger,
    LogLevel,
    formatEvent,
)
from zope.interface import implementer

from rspamd_tx.config.tree import ConfigError

__all__ = [
    "LEVELS",
    "LogSettings",
    "TaggedLogger",
    "tagged_logger",
    "format_text",
    "format_json",
    "make_observer",
    "LogObserver",
]

#: Rspamd's ``log_level`` names and the Twisted level each shows from.
LEVELS: Mapping[str, LogLevel] = {
    "error": LogLevel.error,
    "warning": LogLevel.warn,
    "silent": LogLevel.warn,
    "notice": LogLevel.info,
    "message": LogLevel.info,
    "info": LogLevel.info,
    "debug": LogLevel.debug,
}

_LEVEL_NAMES: Mapping[object, str] = {
    level: level.name for level in LogLevel.iterconstants()}

LOG_TYPES = ("console", "stderr", "file", "syslog")


@dataclass(frozen=True, slots=True)
class LogSettings:
    """Where and how to log.

    @ivar type: ``console`` (standard output), ``stderr``, ``file`` or
        ``syslog``.
    @ivar filename: the file for type ``file``.
    @ivar level: an Rspamd level name (a key of :data:`LEVELS`).
    @ivar json: JSON lines instead of text.
    """

    type: str = "console"
    filename: str | None = None
    level: str = "info"
    json: bool = False

    @classmethod
    def from_config(cls, logging: Any) -> LogSettings:
        """Settings from the checked ``logging`` section
        (:class:`rspamd_tx.config.workers.LoggingOptions`: ``type``,
        ``filename``, ``level``, ``json``).

        @raise ConfigError: unknown type or level, or type ``file`` without a
            ``filename``.
        """
        log_type = str(logging.type).lower()
        if log_type not in LOG_TYPES:
            raise ConfigError(f"logging: unknown type {log_type!r} (expected "
                              f"one of {', '.join(LOG_TYPES)})")
        if log_type == "file" and not logging.filename:
            raise ConfigError("logging: type 'file' needs a filename")
        level = str(logging.level).lower()
        if level not in LEVELS:
            raise ConfigError(f"logging: unknown level {level!r}")
        return cls(log_type, logging.filename, level, bool(logging.json))

    def problem(self) -> str | None:
        """Why the log destination cannot be used, or ``None``: for type
        ``file``, a missing directory or a file that cannot be written."""
        if self.type != "file" or not self.filename:
            return None
        path = os.path.abspath(self.filename)
        directory = os.path.dirname(path)
        if not os.path.isdir(directory):
            return f"logging: directory {directory} does not exist"
        target = path if os.path.exists(path) else directory
        if not os.access(target, os.W_OK):
            return f"logging: {target} is not writable"
        return None

    def override(self, *, level: str | None = None,
                 json: bool | None = None) -> LogSettings:
        """These settings with command-line choices applied.

        @raise ConfigError: unknown level.
        """
        settings = self
        if level is not None:
            if level.lower() not in LEVELS:
                raise ConfigError(f"unknown log level {level!r} (expected one "
                                  f"of {', '.join(LEVELS)})")
            settings = replace(settings, level=level.lower())
        if json:
            settings = replace(settings, json=True)
        return settings


class TaggedLogger(Logger):
    """A :class:`Logger` adding ``log_tag`` to every event it emits."""

    def __init__(self, tag: str, namespace: str | None = None,
                 source: object = None) -> None:
        super().__init__(namespace, source)
        self.tag = tag

    def emit(self, level: LogLevel, format: str | None = None,
             **kwargs: object) -> None:
        """Emit like :meth:`Logger.emit`, with ``log_tag`` set to the tag
        unless the caller gave one."""
        kwargs.setdefault("log_tag", self.tag)
        super().emit(level, format, **kwargs)


def tagged_logger(tag: str | None, namespace: str | None = None) -> Logger:
    """A logger whose every line carries ``tag`` (e.g. a queue id).

    Without a tag (the queue id is not known yet) a plain :class:`Logger`.
    ``namespace`` defaults to the caller's module, as for :class:`Logger`.
    """
    if namespace is None:
        namespace = sys._getframe(1).f_globals.get("__name__", "<unknown>")
    if not tag:
        return Logger(namespace)
    return TaggedLogger(tag, namespace)


#: A parsed format string: ``(literal, field, conversion, spec)`` parts.
_Parsed = tuple[tuple[str, str | None, str | None, str], ...]

_FORMATTER = Formatter()


@lru_cache(maxsize=512)
def _parse_format(text: str) -> _Parsed | None:
    """``text`` split into literal parts and plain named fields, or ``None``
    when it uses anything else (attribute or index lookups, calls, positional
    or nested fields), which :func:`twisted.logger.formatEvent` handles."""
    parts: list[tuple[str, str | None, str | None, str]] = []
    try:
        for literal, field, spec, conversion in _FORMATTER.parse(text):
            if field is not None and (not field.isidentifier() or "{" in (spec or "")):
                return None
            parts.append((literal, field, conversion, spec or ""))
    except ValueError:
        return None
    return tuple(parts)


_CONVERSIONS: Mapping[str, Callable[[object], str]] = {"r": repr, "s": str, "a": ascii}


def _format_message(event: LogEvent) -> str:
    """The event's message, as :func:`twisted.logger.formatEvent` renders it.

    Formats made of plain named fields are rendered from a cached parse;
    everything else (and any event that does not format) goes through
    Twisted's formatter, which describes unformattable events.
    """
    text = event.get("log_format")
    if not isinstance(text, str) or "log_flattened" in event:
        return formatEvent(event)
    parsed = _parse_format(text)
    if parsed is None:
        return formatEvent(event)
    pieces: list[str] = []
    try:
        for literal, field, conversion, spec in parsed:
            pieces.append(literal)
            if field is None:
                continue
            value = event[field]
            if conversion is not None:
                value = _CONVERSIONS[conversion](value)
            pieces.append(format(value, spec))
    except Exception:
        return formatEvent(event)
    return "".join(pieces)


def _message(event: LogEvent) -> str:
    text = _format_message(event)
    failure = event.get("log_failure")
    if failure is not None:
        text = f"{text}\n{failure.getTraceback()}".rstrip("\n")
    return text


class _SecondCache:
    """The ISO 8601 text of the last whole second seen, reused for events in
    the same second (a log line needs only the milliseconds recomputed)."""

    def __init__(self) -> None:
        self.second: int | None = None
        self.text = ""


_SECOND = _SecondCache()


def _time(event: LogEvent) -> str:
    stamp = event.get("log_time")
    if stamp is None:
        return "-"
    if not isinstance(stamp, (int, float)) or stamp < 0:
        return datetime.fromtimestamp(stamp, timezone.utc).isoformat(
            timespec="milliseconds").replace("+00:00", "Z")
    second = int(stamp)
    micros = round((stamp - second) * 1e6)
    if micros >= 1_000_000:
        second += 1
        micros -= 1_000_000
    millis = micros // 1000
    cache = _SECOND
    if cache.second != second:
        cache.text = datetime.fromtimestamp(second, timezone.utc).strftime(
            "%Y-%m-%dT%H:%M:%S")
        cache.second = second
    return f"{cache.text}.{millis:03d}Z"


class _Pid:
    """This process's id, refreshed in a forked child."""

    value = os.getpid()

    @classmethod
    def refresh(cls) -> None:
        cls.value = os.getpid()


os.register_at_fork(after_in_child=_Pid.refresh)


def _level_name(event: LogEvent) -> str:
    return _LEVEL_NAMES.get(event.get("log_level"), "info")


def format_text(event: LogEvent) -> str:
    """One text line: ``time #pid level [namespace] <tag>; message``.

    A failure's traceback follows on the next lines.
    """
    tag = event.get("log_tag")
    tag_part = f"<{tag}>; " if tag else ""
    return (f"{_time(event)} #{_Pid.value} {_level_name(event)} "
            f"[{event.get('log_namespace', '-')}] {tag_part}{_message(event)}\n")


def format_json(event: LogEvent) -> str:
    """One JSON line: ``time``, ``pid``, ``level``, ``namespace``,
    ``message`` and, when set, ``tag``."""
    record: dict[str, object] = {
        "time": _time(event),
        "pid": _Pid.value,
        "level": _level_name(event),
        "namespace": event.get("log_namespace", "-"),
        "message": _message(event),
    }
    tag = event.get("log_tag")
    if tag:
        record["tag"] = str(tag)
    return json.dumps(record, ensure_ascii=False) + "\n"


@implementer(ILogObserver)
class _StreamObserver:
    """Writes each event, formatted, to a text stream and flushes it.

    With a ``path`` the stream is that file, opened for appending, and
    :meth:`reopen` opens the path again (after log rotation).
    """

    def __init__(self, stream: IO[str], formatter: Callable[[LogEvent], str],
                 path: str | None = None) -> None:
        self._stream = stream
        self._formatter = formatter
        self._path = path

    def __call__(self, event: LogEvent) -> None:
        self._stream.write(self._formatter(event))
        self._stream.flush()

    def reopen(self) -> None:
        if self._path is None:
            return
        stream = _open_log(self._path)
        self._stream, old = stream, self._stream
        old.close()


def _open_log(path: str) -> IO[str]:
    try:
        return open(path, "a", encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"logging: cannot open {path}: {e.strerror or e}") from e


_SYSLOG_PRIORITIES = {
    LogLevel.debug: "LOG_DEBUG",
    LogLevel.info: "LOG_INFO",
    LogLevel.warn: "LOG_WARNING",
    LogLevel.error: "LOG_ERR",
    LogLevel.critical: "LOG_CRIT",
}


@implementer(ILogObserver)
class _SyslogObserver:
    """Sends each event to the system log with the matching priority."""

    def __init__(self, formatter: Callable[[LogEvent], str]) -> None:
        self._formatter = formatter
        syslog.openlog("rspamd-tx", syslog.LOG_PID, syslog.LOG_MAIL)

    def __call__(self, event: LogEvent) -> None:
        level = event.get("log_level", LogLevel.info)
        priority = getattr(syslog, _SYSLOG_PRIORITIES.get(level, "LOG_INFO"))
        syslog.syslog(priority, self._formatter(event).rstrip("\n"))

    def reopen(self) -> None:
        """Nothing to reopen: the system log stays connected."""


@implementer(ILogObserver)
class LogObserver:
    """The configured observer: a level filter in front of a destination."""

    def __init__(self, destination: _StreamObserver | _SyslogObserver,
                 level: LogLevel) -> None:
        self._destination = destination
        self._shown = frozenset(
            shown for shown in LogLevel.iterconstants() if not shown < level)

    def __call__(self, event: LogEvent) -> None:
        """Pass on events at or above the level that name a namespace
        (what :class:`twisted.logger.LogLevelFilterPredicate` lets through)."""
        if event.get("log_level") not in self._shown or not event.get("log_namespace"):
            return
        if "log_trace" in event:
            event["log_trace"].append((self, self._destination))
        self._destination(event)

    def reopen(self) -> None:
        """Open the log file again (after rotation); other kinds ignore it.

        @raise ConfigError: the file cannot be opened; the old one stays.
        """
        self._destination.reopen()


def make_observer(settings: LogSettings,
                  stream: IO[str] | None = None) -> LogObserver:
    """The observer for ``settings``: format, destination and level filter.

    ``stream`` replaces the destination (standard output for ``console``,
    standard error for ``stderr``, the file for ``file``, opened for
    appending).

    @raise ConfigError: the log file cannot be opened.
    """
    formatter = format_json if settings.json else format_text
    destination: _StreamObserver | _SyslogObserver
    if stream is not None:
        destination = _StreamObserver(stream, formatter)
    elif settings.type == "syslog":
        destination = _SyslogObserver(formatter)
    elif settings.type == "file" and settings.filename:
        destination = _StreamObserver(_open_log(settings.filename), formatter,
                                      settings.filename)
    elif settings.type == "stderr":
        destination = _StreamObserver(sys.stderr, formatter)
    else:
        destination = _StreamObserver(sys.stdout, formatter)
    return LogObserver(destination, LEVELS[settings.level])
