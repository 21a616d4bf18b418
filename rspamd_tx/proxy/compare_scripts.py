"""Lua in the proxy: compare scripts (``script``) and reply parsers (``parser``).

upstreams-and-proxy.md §4.6–§4.7.  A proxy worker keeps one
:class:`LuaEnvironment` (a LuaJIT 2.1 state through :mod:`lupa`, Lua 5.1
semantics like Rspamd's) in which

* each ``script`` (a path to a file when one exists at that path, else the
  Lua chunk itself) is run once and must return a function; when a session
  with master results ends it is called as ``f(results, log_tag)``, where
  ``results.master`` is the parsed master reply and ``results[<mirror>]``
  the parsed mirror reply or an error string (see :class:`CompareScripts`);
* each ``parser`` chunk returns a function ``(body string) → table`` or a
  table ``{from = fn, to = fn}`` (``to`` is accepted and unused); it replaces
  JSON parsing of a backend's replies (:class:`ReplyParser`).

The state is a sandbox: no ``io``, no ``debug``, no ``package``/``require``
of real modules, no ``load``/``loadstring``/``dofile``/``loadfile``, no
``string.dump``, and ``os`` reduced to ``time``, ``clock``, ``date`` and
``difftime``; lupa's ``python`` bridge is removed and Lua code cannot read
attributes of the few Python callables it is handed.  ``require`` serves only
the shim ``rspamd_logger``: ``infox``/``warnx``/``errx``/``debugm`` (and
``info``/``warn``/``err``/``debug``, ``slog``) with Rspamd's formatting —
``%1``…``%N`` name an argument, ``%s`` takes the next one, ``%%`` is a
percent sign; tables print as ``{[key] = value, …}``, integral numbers
without a fraction.  ``print`` logs at info level.

Errors of a script or parser at run time are logged and contained; loading
errors raise :class:`LuaScriptError`.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from twisted.logger import Logger

try:
    from lupa.luajit21 import LuaError, LuaRuntime
except ImportError:  # pragma: no cover - lupa built without LuaJIT
    from lupa import LuaError, LuaRuntime

__all__ = [
    "CompareScripts",
    "LuaEnvironment",
    "LuaScriptError",
    "ReplyParser",
    "format_log_message",
]

log = Logger(namespace="rspamd_proxy.lua")

#: Nesting shown when a table is formatted for the log.
_MAX_TABLE_DEPTH = 8
#: Nesting converted between Lua tables and Python values.
_MAX_CONVERT_DEPTH = 64

_PLACEHOLDER = re.compile(r"%(%|s|\d+)")

_SANDBOX = """
local emit = ...
io = nil
debug = nil
dofile = nil
loadfile = nil
load = nil
loadstring = nil
module = nil
newproxy = nil
python = nil
jit = nil
string.dump = nil
local real_os = os
os = {
  time = real_os.time,
  clock = real_os.clock,
  date = real_os.date,
  difftime = real_os.difftime,
}
package = nil
local function logx(level)
  return function(...) emit(level, true, ...) end
end
local function logplain(level)
  return function(...) emit(level, false, ...) end
end
local logger = {
  infox = logx('info'),
  warnx = logx('warn'),
  errx = logx('error'),
  debugx = logx('debug'),
  info = logplain('info'),
  warn = logplain('warn'),
  err = logplain('error'),
  debug = logplain('debug'),
  debugm = function(module, ...)
    local args = {...}
    if type(args[1]) ~= 'string' then
      table.remove(args, 1)
    end
    emit('debug', true, unpack(args))
  end,
  slog = function(...) return emit('format', true, ...) end,
}
print = logplain('info')
local modules = { rspamd_logger = logger }
require = function(name)
  local found = modules[name]
  if found == nil then
    error("module '" .. tostring(name) .. "' is not available in the proxy", 2)
  end
  return found
end
"""


class LuaScriptError(Exception):
    """A ``script`` or ``parser`` that cannot be loaded (syntax, run-time error
    while loading, or it does not return what it must)."""


def _number_text(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value == int(value)):
        return str(int(value))
    return repr(value)


def _value_text(value: Any, depth: int = 0) -> str:
    """A value as Rspamd's Lua logger writes it."""
    if value is None:
        return "nil"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return _number_text(value)
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    if isinstance(value, str):
        return value
    if _is_lua_table(value):
        if depth >= _MAX_TABLE_DEPTH:
            return "{...}"
        items = [
            f"[{_value_text(key, depth + 1)}] = {_value_text(item, depth + 1)}"
            for key, item in value.items()
        ]
        return "{" + ", ".join(items) + "}"
    return f"<{type(value).__name__}>"


def _is_lua_table(value: Any) -> bool:
    return type(value).__name__ == "_LuaTable"


def format_log_message(template: Any, args: Sequence[Any]) -> str:
    """Rspamd's ``logx`` formatting of ``template`` with ``args``.

    ``%N`` (1-based) is argument N, ``%s`` the next argument after the last
    one used, ``%%`` a percent sign; a placeholder with no argument is kept
    as written.
    """
    text = _value_text(template)
    position = 0

    def substitute(match: re.Match[str]) -> str:
        nonlocal position
        token = match.group(1)
        if token == "%":
            return "%"
        index = position if token == "s" else int(token) - 1
        if not 0 <= index < len(args):
            return match.group(0)
        position = index + 1
        return _value_text(args[index])

    return _PLACEHOLDER.sub(substitute, text)


def _deny_attributes(obj: Any, name: Any, setting: bool) -> Any:
    raise AttributeError("attribute access is not allowed in the proxy's Lua")


class LuaEnvironment:
    """The proxy's Lua state: sandboxed, with the ``rspamd_logger`` shim.

    Args:
        logger: where Lua log calls go (``infox`` → ``info`` …).
    """

    def __init__(self, logger: Logger | None = None) -> None:
        self.logger = logger if logger is not None else log
        self.runtime = LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            attribute_filter=_deny_attributes,
        )
        setup = self.runtime.execute("return function(...) " + _SANDBOX + " end")
        setup(self._emit)

    def _emit(self, level: str, formatted: bool, *args: Any) -> str | None:
        if formatted:
            message = format_log_message(args[0], args[1:]) if args else ""
        else:
            message = " ".join(_value_text(arg) for arg in args)
        if level == "format":
            return message
        emit = {
            "info": self.logger.info,
            "warn": self.logger.warn,
            "error": self.logger.error,
            "debug": self.logger.debug,
        }[level]
        emit("{lua_message}", lua_message=message)
        return None

    def load(self, source: str, name: str) -> Any:
        """Run a chunk (or the file at path ``source``) and return what it returns.

        Raises :class:`LuaScriptError` when the file cannot be read or the
        chunk does not compile or fails while running.
        """
        chunk = source
        if os.path.exists(source):
            try:
                with open(source, encoding="utf-8") as handle:
                    chunk = handle.read()
            except (OSError, UnicodeDecodeError) as exc:
                raise LuaScriptError(f"cannot read {name} {source!r}: {exc}") from None
        try:
            return self.runtime.execute(chunk)
        except LuaError as exc:
            raise LuaScriptError(f"cannot load {name}: {exc}") from None

    def load_function(self, source: str, name: str) -> Any:
        """:meth:`load` a chunk that must return a function."""
        value = self.load(source, name)
        if self.lua_type(value) != "function":
            raise LuaScriptError(f"{name} must return a function, returned {self.lua_type(value)}")
        return value

    def lua_type(self, value: Any) -> str:
        """Lua's ``type()`` of a value returned from Lua."""
        lua_type: Callable[[Any], str] = self.runtime.globals().type
        return lua_type(value)

    def to_lua(self, value: Any, depth: int = 0) -> Any:
        """A Python value (JSON-like: dict, list, str, number, bool, None) as a Lua value."""
        if depth > _MAX_CONVERT_DEPTH:
            raise ValueError("value nested too deeply")
        if isinstance(value, Mapping):
            table = self.runtime.table()
            for key, item in value.items():
                if item is not None:
                    table[key] = self.to_lua(item, depth + 1)
            return table
        if isinstance(value, (list, tuple)):
            table = self.runtime.table()
            for index, item in enumerate(value, 1):
                if item is not None:
                    table[index] = self.to_lua(item, depth + 1)
            return table
        return value

    def from_lua(self, value: Any, depth: int = 0) -> Any:
        """A Lua value as Python: tables with keys 1..n become lists, others dicts."""
        if depth > _MAX_CONVERT_DEPTH:
            raise ValueError("value nested too deeply")
        if not _is_lua_table(value):
            if isinstance(value, bytes):
                return value.decode("utf-8", "replace")
            if self.lua_type(value) in ("function", "userdata", "thread"):
                return None
            return value
        items = list(value.items())
        keys = [key for key, _ in items]
        if keys and keys == list(range(1, len(keys) + 1)):
            return [self.from_lua(item, depth + 1) for _, item in items]
        return {
            _value_text(key): self.from_lua(item, depth + 1) for key, item in items
        }


class ReplyParser:
    """A backend's ``parser``: turns a reply body into a result (§4.7).

    Raises :class:`LuaScriptError` when the chunk does not load or returns
    neither a function nor a table with a ``from`` function.
    """

    def __init__(self, environment: LuaEnvironment, source: str, name: str = "parser") -> None:
        self.environment = environment
        value = environment.load(source, name)
        kind = environment.lua_type(value)
        if kind == "table" and environment.lua_type(value["from"]) == "function":
            value = value["from"]
        elif kind != "function":
            raise LuaScriptError(f"{name} must return a function or a table with 'from', returned {kind}")
        self.function = value

    def parse(self, body: bytes) -> Any:
        """The parser's result for ``body`` as Python (``None`` when it returned nil).

        Raises :class:`LuaScriptError` when the parser fails.
        """
        try:
            result = self.function(body)
        except LuaError as exc:
            raise LuaScriptError(f"cannot run lua parser script: {exc}") from None
        try:
            return self.environment.from_lua(result)
        except ValueError as exc:
            raise LuaScriptError(f"lua parser result: {exc}") from None


class CompareScripts:
    """The worker's ``script`` options, called when a session ends (§4.6).

    Args:
        environment: the Lua state.
        sources: the ``script`` values (chunks or file paths), in order.
        skip_broken: log and leave out a script that does not load instead
            of raising.

    Raises :class:`LuaScriptError` when a script does not load or does not
    return a function (unless ``skip_broken``).
    """

    def __init__(
        self, environment: LuaEnvironment, sources: Sequence[str], *, skip_broken: bool = False
    ) -> None:
        self.environment = environment
        self.functions: list[Any] = []
        for index, source in enumerate(sources, 1):
            try:
                self.functions.append(environment.load_function(source, f"compare script {index}"))
            except LuaScriptError as exc:
                if not skip_broken:
                    raise
                environment.logger.error("{error}; the script is not used", error=exc)

    def __bool__(self) -> bool:
        return bool(self.functions)

    def run(self, results: Mapping[str, Any], log_tag: str) -> int:
        """Call every script with ``results`` (name → parsed reply or error
        string) and ``log_tag``.  A failing script is logged and the others
        still run; returns how many failed."""
        failed = 0
        for function in self.functions:
            try:
                function(self.environment.to_lua(dict(results)), log_tag)
            except (LuaError, ValueError) as exc:
                failed += 1
                self.environment.logger.error(
                    "<{log_tag}> cannot run lua compare script: {error}", log_tag=log_tag, error=exc
                )
        return failed
