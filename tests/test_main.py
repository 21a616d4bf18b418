"""Tests for the command line (rspamd_tx.__main__)."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import sys

from twisted.internet.defer import Deferred
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

import rspamd_tx
from rspamd_tx.__main__ import main
from rspamd_tx.config.workers import COMMON_SCHEMA, PROXY_SCHEMA, SECTION_SCHEMAS, WORKER_SCHEMAS


def run(argv: list[str]) -> tuple[int, str, str]:
    """Run ``main(argv)`` in-process; returns (status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


class UsageTests(unittest.TestCase):
    """Argument errors."""

    def test_no_command(self) -> None:
        """Without a command the usage is printed and the status is 2."""
        status, _, err = run([])
        self.assertEqual(status, 2)
        self.assertIn("usage:", err)

    def test_unknown_command(self) -> None:
        """An unknown command is a usage error."""
        status, _, err = run(["frobnicate"])
        self.assertEqual(status, 2)
        self.assertIn("invalid choice", err)

    def test_help(self) -> None:
        """--help lists the commands and exits 0."""
        status, out, _ = run(["--help"])
        self.assertEqual(status, 0)
        self.assertIn("configtest", out)
        self.assertIn("confighelp", out)


class ConfighelpTests(unittest.TestCase):
    """``confighelp`` describes every option."""

    def test_every_option_listed(self) -> None:
        """Without an argument every section, worker and option appears with type and default."""
        status, out, _ = run(["confighelp"])
        self.assertEqual(status, 0)
        for schema in [*SECTION_SCHEMAS.values(), COMMON_SCHEMA, *WORKER_SCHEMAS.values()]:
            for opt in schema.options:
                default = opt.type.format_default(opt.default)
                described = (
                    f"{opt.name} ({opt.type.label}, default {default})"
                    if default
                    else f"{opt.name} (block)"
                )
                self.assertIn(described, out)
                self.assertIn(opt.doc, out)
        self.assertIn('worker "rspamd_proxy" { }', out)
        self.assertIn('worker "fuzzy" { }', out)

    def test_one_worker(self) -> None:
        """One worker type prints the common options and that worker's, nothing else."""
        status, out, _ = run(["confighelp", "rspamd_proxy"])
        self.assertEqual(status, 0)
        self.assertIn("timeout (time, default 120s)", out)
        self.assertIn("bind_socket (bind lines, default [])", out)
        self.assertIn("[aliases: listen, bind]", out)
        self.assertNotIn("ratelimit_rate", out)
        self.assertNotIn("hs_cache_dir", out)

    def test_nested_blocks_listed(self) -> None:
        """Options of upstream blocks are listed under upstream, indented."""
        _, out, _ = run(["confighelp", "rspamd_proxy"])
        upstream = next(opt for opt in PROXY_SCHEMA.options if opt.name == "upstream")
        self.assertIn("  upstream (named blocks, default none)", out)
        self.assertIn("      self_scan (bool, default false)", out)
        self.assertIsNotNone(upstream.type.children())

    def test_block_without_default_text(self) -> None:
        """A nested block prints its options instead of a default."""
        _, out, _ = run(["confighelp", "rspamd_proxy"])
        self.assertIn("  failure_policy (block)\n", out)
        self.assertIn('      oversize (tempfail|accept|reject|discard, default "tempfail")', out)

    def test_section(self) -> None:
        """A global section can be asked for by name."""
        status, out, _ = run(["confighelp", "options"])
        self.assertEqual(status, 0)
        self.assertIn("max_errors (int, default 4)", out)
        self.assertNotIn("milter", out)

    def test_unknown_section(self) -> None:
        """An unknown name is a usage error naming the known ones."""
        status, out, err = run(["confighelp", "nonsense"])
        self.assertEqual((status, out), (2, ""))
        self.assertIn("rspamd_proxy", err)


SEEDS = os.path.join(os.path.dirname(__file__), "data", "seeds")
PACKAGE_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(rspamd_tx.__file__)))


def make_config_dir(test: unittest.TestCase, files: dict[str, str] | None = None) -> str:
    """A temporary configuration directory holding every seed as ``local.d/<seed>``
    plus ``files`` (relative path -> text)."""
    root: str = os.path.abspath(test.mktemp())
    os.makedirs(os.path.join(root, "local.d"))
    for name in os.listdir(SEEDS):
        if name == "worker-fuzzy-slave.inc":
            continue
        shutil.copy(os.path.join(SEEDS, name), os.path.join(root, "local.d", name))
    for relative, text in (files or {}).items():
        path = os.path.join(root, relative)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w", encoding="utf-8") as handle:
            handle.write(text)
    return root


class ConfigtestTests(unittest.TestCase):
    """``configtest`` loads, checks and reports."""

    def test_shipped_defaults(self) -> None:
        """Without -c the shipped defaults check clean."""
        status, out, _ = run(["configtest"])
        self.assertEqual((status, out), (0, "syntax OK\n"))

    def test_seeds_clean(self) -> None:
        """The seeds as local.d files give syntax OK and no warning."""
        status, out, _ = run(["configtest", "-c", make_config_dir(self)])
        self.assertEqual((status, out), (0, "syntax OK\n"))

    def test_warning_printed_with_location(self) -> None:
        """An unknown option is printed as file:line:col: warning and the test still passes."""
        root = make_config_dir(
            self, {"override.d/worker-proxy.inc": "spam_header = X-Junk;\nmax_retrys = 3;\n"}
        )
        status, out, _ = run(["configtest", "-c", root])
        self.assertEqual(status, 0)
        path = os.path.join(root, "override.d", "worker-proxy.inc")
        self.assertEqual(
            out.splitlines(),
            [
                f"{path}:2:1: warning: worker \"rspamd_proxy\": unknown option 'max_retrys';"
                " did you mean 'max_retries'?",
                "syntax OK",
            ],
        )

    def test_errors_printed_with_location(self) -> None:
        """Bad values are printed as file:line:col: message, without traceback, and exit 1."""
        root = make_config_dir(
            self, {"override.d/worker-fuzzy.inc": 'expire = "forever";\nbackend = "mysql";\n'}
        )
        status, out, _ = run(["configtest", "-c", root])
        self.assertEqual(status, 1)
        path = os.path.join(root, "override.d", "worker-fuzzy.inc")
        lines = out.splitlines()
        self.assertEqual(len(lines), 2)
        self.assertTrue(lines[0].startswith(f"{path}:1:1: worker \"fuzzy\": option 'expire': "))
        self.assertTrue(lines[1].startswith(f"{path}:2:1: worker \"fuzzy\": option 'backend': "))
        self.assertNotIn("syntax OK", out)
        self.assertNotIn("Traceback", out)

    def test_parse_error(self) -> None:
        """A UCL syntax error is reported with its location and exit 1."""
        root = make_config_dir(self, {"local.d/logging.inc": 'level = "info\n'})
        status, out, _ = run(["configtest", "-c", root])
        self.assertEqual(status, 1)
        self.assertTrue(out.startswith(os.path.join(root, "local.d", "logging.inc") + ":1:"))

    def test_missing_directory(self) -> None:
        """A configuration directory that does not exist is an error."""
        status, out, _ = run(["configtest", "-c", os.path.abspath(self.mktemp())])
        self.assertEqual(status, 1)
        self.assertIn("does not exist", out)

    def test_variables(self) -> None:
        """--var NAME=VALUE values reach the configuration."""
        extra = os.path.abspath(self.mktemp())
        os.makedirs(extra)
        with open(os.path.join(extra, "more.inc"), "w", encoding="utf-8") as handle:
            handle.write("task_timeout = 10s;\n")
        root = make_config_dir(self, {"override.d/options.inc": '.include "$EXTRA/more.inc"\n'})
        status, _, _ = run(["configtest", "-c", root])
        self.assertEqual(status, 1)
        status, out, _ = run(["configtest", "-c", root, "--var", f"EXTRA={extra}"])
        self.assertEqual((status, out), (0, "syntax OK\n"))

    def test_bad_variable_syntax(self) -> None:
        """A --var without '=' is a usage error."""
        status, _, err = run(["configtest", "--var", "NOVALUE"])
        self.assertEqual(status, 2)
        self.assertIn("NAME=VALUE", err)

    def test_module(self) -> Deferred[None]:
        """``python -m rspamd_tx configtest -c DIR`` prints syntax OK and exits 0."""
        root = make_config_dir(self)
        env = dict(os.environ)
        env["PYTHONPATH"] = PACKAGE_ROOT + os.pathsep + env.get("PYTHONPATH", "")
        result: Deferred[tuple[bytes, bytes, int]] = getProcessOutputAndValue(
            sys.executable,
            ["-m", "rspamd_tx", "configtest", "-c", root],
            env=env,
            path=PACKAGE_ROOT,
        )

        def check(outcome: tuple[bytes, bytes, int]) -> None:
            out, err, status = outcome
            self.assertEqual((status, out, err), (0, b"syntax OK\n", b""))

        finished: Deferred[None] = result.addCallback(check)
        return finished
