"""Tests for rspamd_tx.logging: settings, formats, level filter and tags."""

from __future__ import annotations

import io
import json
import os
from dataclasses import dataclass
from typing import cast

from twisted.logger import ILogObserver, LogLevel, LogPublisher, formatEvent
from twisted.trial import unittest

from rspamd_tx.config.tree import ConfigError
from rspamd_tx.logging import (
    LogSettings,
    TaggedLogger,
    format_json,
    format_text,
    make_observer,
    tagged_logger,
)


@dataclass
class Section:
    """Stands for the checked ``logging`` section."""

    type: str = "console"
    filename: str | None = None
    level: str = "warning"
    json: bool = False


def capture(settings: LogSettings) -> tuple[LogPublisher, io.StringIO]:
    """A publisher feeding an observer for ``settings`` that writes to a buffer."""
    stream = io.StringIO()
    publisher = LogPublisher(make_observer(settings, stream))
    return publisher, stream


class SettingsTests(unittest.TestCase):
    """LogSettings from the logging section and the command line."""

    def test_from_config(self) -> None:
        """type, filename, level and json are taken from the section."""
        settings = LogSettings.from_config(
            Section("file", "/var/log/rspamd.log", "Debug", True))
        self.assertEqual(settings, LogSettings("file", "/var/log/rspamd.log",
                                               "debug", True))

    def test_bad_sections(self) -> None:
        """Unknown type or level and a file without name are ConfigErrors."""
        for section, message in [
            (Section(type="journal"), "unknown type 'journal'"),
            (Section(type="file"), "needs a filename"),
            (Section(level="loud"), "unknown level 'loud'"),
        ]:
            with self.assertRaises(ConfigError) as caught:
                LogSettings.from_config(section)
            self.assertIn(message, str(caught.exception))

    def test_problem(self) -> None:
        """A log file in a missing directory is reported before opening."""
        self.assertIsNone(LogSettings().problem())
        here = os.path.abspath(self.mktemp())
        os.makedirs(here)
        self.assertIsNone(LogSettings("file", os.path.join(here, "a.log")).problem())
        self.assertEqual(
            LogSettings("file", os.path.join(here, "no", "a.log")).problem(),
            f"logging: directory {here}/no does not exist")

    def test_override(self) -> None:
        """--log-level and --json-log win over the section."""
        settings = LogSettings().override(level="DEBUG", json=True)
        self.assertEqual((settings.level, settings.json), ("debug", True))
        self.assertEqual(LogSettings(json=True).override(json=False).json, True)

    def test_override_bad_level(self) -> None:
        """An unknown --log-level is a ConfigError listing the levels."""
        with self.assertRaises(ConfigError) as caught:
            LogSettings().override(level="chatty")
        self.assertIn("error, warning", str(caught.exception))


class ObserverTests(unittest.TestCase):
    """Observers format, filter and tag events."""

    def test_message_as_twisted_formats_it(self) -> None:
        """Messages read exactly as twisted.logger.formatEvent renders them, odd formats included."""
        events: list[dict[str, object]] = [
            dict(log_format="{a} x {b!r} {c:.3f} {{literal}}", a=1, b="s", c=2.5),
            dict(log_format="{a.real} {a}", a=3),
            dict(log_format="{missing}"),
            dict(log_format="{call()}", call=lambda: "called"),
            dict(log_format="{}"),
            dict(log_format="{a:{width}}", a=1, width=4),
            dict(log_format="{a!x}", a=1),
            dict(log_format="{unclosed", unclosed=1),
            dict(log_format=None),
            dict(log_format=b"bytes {a}", a=1),
            dict(),
        ]
        for event in events:
            with self.subTest(event=event):
                timed = {**event, "log_time": 0.0}
                line = format_text(timed)
                self.assertEqual(line.split("] ", 1)[1], formatEvent(timed) + "\n")

    def test_text_line(self) -> None:
        """Text lines carry time, level, namespace and message."""
        publisher, stream = capture(LogSettings())
        publisher(dict(log_format="hello {who}", who="world",
                       log_level=LogLevel.info, log_namespace="rspamd_tx.x",
                       log_time=0.0))
        self.assertEqual(stream.getvalue(),
                         f"1970-01-01T00:00:00.000Z #{os.getpid()} info "
                         f"[rspamd_tx.x] hello world\n")

    def test_json_line(self) -> None:
        """JSON lines are one object per line with the tag when set."""
        publisher, stream = capture(LogSettings(json=True))
        publisher(dict(log_format="scan {n}", n=3, log_level=LogLevel.warn,
                       log_namespace="p", log_time=1.5, log_tag="4Bxq1"))
        [line] = stream.getvalue().splitlines()
        self.assertEqual(json.loads(line), {
            "time": "1970-01-01T00:00:01.500Z", "pid": os.getpid(),
            "level": "warn",
            "namespace": "p", "message": "scan 3", "tag": "4Bxq1"})

    def test_level_filter(self) -> None:
        """Events below the configured level are dropped."""
        publisher, stream = capture(LogSettings(level="warning"))
        for level in (LogLevel.debug, LogLevel.info, LogLevel.warn,
                      LogLevel.error):
            publisher(dict(log_format=level.name, log_level=level,
                           log_namespace="n", log_time=0.0))
        self.assertEqual([line.split(" ")[2] for line in
                          stream.getvalue().splitlines()], ["warn", "error"])

    def test_failure_traceback(self) -> None:
        """A logged failure's traceback follows the message."""
        publisher, stream = capture(LogSettings())
        logger = TaggedLogger("q1", "n", None)
        logger.observer = publisher
        try:
            1 / 0
        except ZeroDivisionError:
            logger.failure("scan failed")
        text = stream.getvalue()
        self.assertIn("<q1>; scan failed\n", text)
        self.assertIn("ZeroDivisionError", text)

    def test_file_destination(self) -> None:
        """Type file appends to the named file."""
        path = os.path.abspath(self.mktemp())
        with open(path, "w") as f:
            f.write("old\n")
        observer = make_observer(LogSettings("file", path, "info"))
        observer(dict(log_format="new", log_level=LogLevel.info,
                      log_namespace="n", log_time=0.0))
        with open(path) as f:
            self.assertEqual(f.read().splitlines()[0], "old")
        with open(path) as f:
            self.assertTrue(f.read().endswith(" info [n] new\n"))

    def test_reopen_after_rotation(self) -> None:
        """reopen() follows a rotated file: new lines go to a new file."""
        path = os.path.abspath(self.mktemp())
        observer = make_observer(LogSettings("file", path, "info"))
        observer(dict(log_format="before", log_level=LogLevel.info,
                      log_namespace="n", log_time=0.0))
        os.rename(path, path + ".1")
        observer.reopen()
        observer(dict(log_format="after", log_level=LogLevel.info,
                      log_namespace="n", log_time=0.0))
        with open(path + ".1") as f:
            self.assertTrue(f.read().endswith(" [n] before\n"))
        with open(path) as f:
            self.assertTrue(f.read().endswith(" [n] after\n"))

    def test_reopen_console(self) -> None:
        """reopen() on a console observer keeps writing to the stream."""
        stream = io.StringIO()
        observer = make_observer(LogSettings(), stream)
        observer.reopen()
        observer(dict(log_format="still here", log_level=LogLevel.info,
                      log_namespace="n", log_time=0.0))
        self.assertTrue(stream.getvalue().endswith(" [n] still here\n"))

    def test_unwritable_file(self) -> None:
        """A log file that cannot be opened is a ConfigError."""
        with self.assertRaises(ConfigError):
            make_observer(LogSettings("file", "/nonexistent/dir/x.log"))


class TaggedLoggerTests(unittest.TestCase):
    """tagged_logger binds a tag to every line."""

    def test_every_line_tagged(self) -> None:
        """Every level emitted through the logger carries the tag."""
        events: list[dict[str, object]] = []
        logger = tagged_logger("4Bxq1", "rspamd_tx.proxy")
        logger.observer = cast(ILogObserver, events.append)
        logger.info("one")
        logger.error("two {x}", x=2)
        self.assertEqual([e["log_tag"] for e in events], ["4Bxq1", "4Bxq1"])
        self.assertEqual(format_text(events[1]).split(" ", 3)[3],
                         "[rspamd_tx.proxy] <4Bxq1>; two 2\n")

    def test_untagged(self) -> None:
        """Without a tag the logger adds nothing and names the caller."""
        events: list[dict[str, object]] = []
        logger = tagged_logger(None)
        logger.observer = cast(ILogObserver, events.append)
        logger.info("plain")
        self.assertNotIn("log_tag", events[0])
        self.assertEqual(events[0]["log_namespace"], __name__)
        self.assertNotIn("tag", json.loads(format_json(events[0])))
