"""Tests for rspamd_tx.proxy.compare_scripts: the proxy's sandboxed Lua, logger shim, scripts, parsers."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st
from twisted.logger import Logger, LogLevel, formatEvent
from twisted.trial import unittest

from rspamd_tx.proxy.compare_scripts import (
    CompareScripts,
    LuaEnvironment,
    LuaScriptError,
    ReplyParser,
    format_log_message,
)

SEED = os.path.join(os.path.dirname(__file__), "data", "seeds", "worker-proxy.inc")


class Recorded:
    """A Logger whose events are kept as (level, text)."""

    def __init__(self) -> None:
        self.events: list[dict[str, Any]] = []
        self.logger = Logger(observer=self.events.append)

    def lines(self) -> list[tuple[LogLevel, str]]:
        return [(event["log_level"], formatEvent(event)) for event in self.events]


class LuaTestCase(unittest.TestCase):
    """A fresh environment with a recording logger."""

    def setUp(self) -> None:
        self.recorded = Recorded()
        self.lua = LuaEnvironment(self.recorded.logger)

    def run_chunk(self, chunk: str) -> Any:
        return self.lua.runtime.execute(chunk)


class FormatTests(unittest.TestCase):
    """Rspamd's logx formatting."""

    def test_table(self) -> None:
        """%N, %s, %% and missing arguments, as Rspamd's Lua logger writes them."""
        table = [
            (("%1 and %2", ["a", "b"]), "a and b"),
            (("%2 then %1", ["a", "b"]), "b then a"),
            (("%s %s", ["a", "b"]), "a b"),
            (("%2 %s", ["a", "b", "c"]), "b c"),
            (("100%% %1", ["sure"]), "100% sure"),
            (("%1 %3", ["a"]), "a %3"),
            (("%1 %1", [15.0]), "15 15"),
            (("%1", [0.5]), "0.5"),
            (("%1/%2/%3", [True, None, b"raw"]), "true/nil/raw"),
            (("no placeholders", ["x"]), "no placeholders"),
        ]
        self.assertEqual(
            [(args, format_log_message(*args)) for args, _ in table], table
        )

    @settings(max_examples=200, deadline=None)
    @given(
        st.text(alphabet="%s1234 ab", max_size=40),
        st.lists(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text()), max_size=5),
    )
    def test_never_raises(self, template: str, args: list[Any]) -> None:
        """Any template with any arguments formats to a string."""
        self.assertIsInstance(format_log_message(template, args), str)


class LoggerShimTests(LuaTestCase):
    """require "rspamd_logger" inside the proxy's Lua."""

    def test_levels(self) -> None:
        """infox/warnx/errx/debugm log at info/warn/error/debug; debugm drops its module."""
        self.run_chunk(
            """
            local l = require "rspamd_logger"
            l.infox("i %1", 1)
            l.warnx("w %1", "x")
            l.errx("e %s", true)
            l.debugm("proxy", "d %1", 2)
            """
        )
        self.assertEqual(
            self.recorded.lines(),
            [
                (LogLevel.info, "i 1"),
                (LogLevel.warn, "w x"),
                (LogLevel.error, "e true"),
                (LogLevel.debug, "d 2"),
            ],
        )

    def test_tables(self) -> None:
        """A table argument is written as {[key] = value}."""
        self.run_chunk('require("rspamd_logger").infox("%1", {action = "reject"})')
        self.assertEqual(self.recorded.lines(), [(LogLevel.info, "{[action] = reject}")])

    def test_slog(self) -> None:
        """slog returns the formatted string without logging."""
        self.assertEqual(self.run_chunk('return require("rspamd_logger").slog("%1-%2", "a", 3)'), "a-3")
        self.assertEqual(self.recorded.lines(), [])

    def test_print(self) -> None:
        """print logs its arguments at info level."""
        self.run_chunk('print("a", 1)')
        self.assertEqual(self.recorded.lines(), [(LogLevel.info, "a 1")])


class SandboxTests(LuaTestCase):
    """What scripts cannot reach."""

    def test_no_os_execute_or_io(self) -> None:
        """os.execute, os.exit, os.remove and the io library are absent."""
        self.assertEqual(
            self.run_chunk("return os.execute, os.exit, os.remove, io, os.getenv"),
            (None, None, None, None, None),
        )

    def test_os_time_kept(self) -> None:
        """os.time and os.date remain."""
        self.assertEqual(self.run_chunk("return type(os.time()), type(os.date())"), ("number", "string"))

    def test_no_loaders(self) -> None:
        """load, loadstring, dofile, loadfile, string.dump, debug and package are absent."""
        self.assertEqual(
            self.run_chunk(
                "return load, loadstring, dofile, loadfile, string.dump, debug, package, python"
            ),
            (None,) * 8,
        )

    def test_require_only_shims(self) -> None:
        """require of anything but the shims fails."""
        ok, error = self.run_chunk('return pcall(require, "io")')
        self.assertFalse(ok)
        self.assertIn("module 'io' is not available", error)

    def test_io_open_fails(self) -> None:
        """A script calling io.open fails instead of opening the file."""
        ok, error = self.run_chunk('return pcall(function() return io.open("/etc/passwd") end)')
        self.assertFalse(ok)
        self.assertIn("io", error)


class LoadTests(LuaTestCase):
    """Loading script chunks and files."""

    def test_chunk_must_return_function(self) -> None:
        """A chunk returning something else is refused."""
        with self.assertRaises(LuaScriptError) as caught:
            self.lua.load_function("return 1", "compare script 1")
        self.assertIn("must return a function, returned number", str(caught.exception))

    def test_syntax_error(self) -> None:
        """A chunk that does not compile is refused."""
        self.assertRaises(LuaScriptError, self.lua.load_function, "return function(", "s")

    def test_error_while_loading(self) -> None:
        """A chunk that fails while running is refused."""
        self.assertRaises(LuaScriptError, self.lua.load_function, 'error("no")', "s")

    def test_file(self) -> None:
        """A value naming an existing file loads that file."""
        handle, path = tempfile.mkstemp(suffix=".lua")
        self.addCleanup(os.unlink, path)
        os.write(handle, b"return function() return 'from file' end")
        os.close(handle)
        self.assertEqual(self.lua.load_function(path, "s")(), "from file")


class CompareScriptsTests(LuaTestCase):
    """CompareScripts.run."""

    def test_receives_results_and_log_tag(self) -> None:
        """The function gets results.master, results[mirror] and the log tag."""
        scripts = CompareScripts(
            self.lua,
            ["return function(r, tag) seen = {r.master.action, r.master.symbols[2], r.test, tag} end"],
        )
        failed = scripts.run(
            {"master": {"action": "reject", "symbols": ["A", "B"]}, "test": "IO timeout"}, "abc12"
        )
        self.assertEqual(failed, 0)
        seen = self.lua.from_lua(self.lua.runtime.globals().seen)
        self.assertEqual(seen, ["reject", "B", "IO timeout", "abc12"])

    def test_error_contained(self) -> None:
        """A failing script is logged; the next one still runs."""
        scripts = CompareScripts(
            self.lua,
            ['return function() error("boom") end', "return function() ran = true end"],
        )
        self.assertEqual(scripts.run({"master": {}}, "t1"), 1)
        self.assertTrue(self.lua.runtime.globals().ran)
        [(level, text)] = self.recorded.lines()
        self.assertEqual(level, LogLevel.error)
        self.assertIn("<t1> cannot run lua compare script", text)
        self.assertIn("boom", text)

    def test_seed_script(self) -> None:
        """The seed's compare script logs one line per result."""
        with open(SEED) as handle:
            chunk = handle.read().split("script =<<EOD\n", 1)[1].split("EOD;", 1)[0]
        CompareScripts(self.lua, [chunk]).run(
            {"master": {"qid": "Q1", "action": "reject", "score": 1001}, "test": "IO timeout"}, "t"
        )
        self.assertEqual(
            sorted(text for _, text in self.recorded.lines()),
            ["<Q1> got reply from master: action=reject, score=1001", "got error from test: IO timeout"],
        )

    def test_skip_broken(self) -> None:
        """With skip_broken a script that does not load is logged and left out."""
        scripts = CompareScripts(self.lua, ["return 5", "return function() end"], skip_broken=True)
        self.assertEqual(len(scripts.functions), 1)
        self.assertIn("must return a function", self.recorded.lines()[0][1])

    def test_broken_raises(self) -> None:
        """Without skip_broken a script that does not load raises."""
        self.assertRaises(LuaScriptError, CompareScripts, self.lua, ["return 5"])


class ReplyParserTests(LuaTestCase):
    """The parser option."""

    def test_function(self) -> None:
        """A chunk returning a function parses bodies; tables come back as dicts and lists."""
        parser = ReplyParser(
            self.lua, "return function(s) return {size = #s, words = {s:match('(%a+) (%a+)')}} end"
        )
        self.assertEqual(parser.parse(b"hello world"), {"size": 11, "words": ["hello", "world"]})

    def test_from_table(self) -> None:
        """A chunk returning {from = fn, to = fn} uses from."""
        parser = ReplyParser(
            self.lua, "return {from = function(s) return {body = s} end, to = function(s) return s end}"
        )
        self.assertEqual(parser.parse(b"x"), {"body": "x"})

    def test_invalid(self) -> None:
        """A chunk returning neither is refused."""
        self.assertRaises(LuaScriptError, ReplyParser, self.lua, "return {to = function() end}")

    def test_runtime_error(self) -> None:
        """A parser failing on a body raises LuaScriptError."""
        parser = ReplyParser(self.lua, 'return function(s) error("bad body") end')
        self.assertRaises(LuaScriptError, parser.parse, b"x")
