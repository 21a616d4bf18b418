"""Tests for :mod:`rspamd_tx.config.loader`: Rspamd's layering over ``conf/``."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from unittest import mock

from twisted.trial.unittest import SkipTest, TestCase

from rspamd_tx.config import loader
from rspamd_tx.config.tree import ConfigError, UclObject

REPO_CONF = Path(__file__).resolve().parent.parent / "conf"
SEEDS = Path(__file__).parent / "data" / "seeds"


def sections(tree: UclObject) -> dict[str, UclObject]:
    """The worker sections by type (each type once in these tests)."""
    return dict(loader.worker_sections(tree))


class ConfigDirMixin:
    """A temporary ``--config`` directory."""

    def make_dir(self) -> Path:
        path = Path(self.mktemp())  # type: ignore[attr-defined]
        path.mkdir()
        return path

    def write(self, base: Path, name: str, text: str) -> None:
        target = base / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)


class ShippedDirTests(TestCase):
    """Where the shipped defaults are and which variables are set."""

    def test_checkout_conf_dir(self) -> None:
        """Without RSPAMD_TX_CONFDIR the repository's conf/ is used."""
        with mock.patch.dict(os.environ, {}, clear=False):
            os.environ.pop("RSPAMD_TX_CONFDIR", None)
            self.assertEqual(loader.shipped_confdir(), REPO_CONF)

    def test_environment_overrides_conf_dir(self) -> None:
        """RSPAMD_TX_CONFDIR names the shipped directory."""
        with mock.patch.dict(os.environ, {"RSPAMD_TX_CONFDIR": "/opt/conf"}):
            self.assertEqual(loader.shipped_confdir(), Path("/opt/conf"))

    def test_default_variables(self) -> None:
        """CONFDIR is the shipped dir; LOCAL_CONFDIR is --config DIR or CONFDIR."""
        plain = loader.default_variables(None)
        self.assertEqual(plain, {
            "CONFDIR": str(loader.shipped_confdir()),
            "LOCAL_CONFDIR": str(loader.shipped_confdir()),
            "RUNDIR": "/run/rspamd-tx",
            "DBDIR": "/var/lib/rspamd-tx",
            "LOGDIR": "/var/log/rspamd-tx",
        })
        self.assertEqual(loader.default_variables("relative")["LOCAL_CONFDIR"], os.path.abspath("relative"))


class DefaultsTests(TestCase):
    """The shipped defaults alone."""

    def test_workers_in_file_order(self) -> None:
        """conf/ defines the normal, controller, proxy and fuzzy workers, in that order."""
        tree = loader.load_config()
        self.assertEqual([name for name, _ in loader.worker_sections(tree)],
                         ["normal", "controller", "rspamd_proxy", "fuzzy"])

    def test_proxy_defaults(self) -> None:
        """The proxy is a milter on localhost:11332 with Debian's settings."""
        proxy = sections(loader.load_config())["rspamd_proxy"]
        self.assertEqual(proxy["bind_socket"], "localhost:11332")
        self.assertIs(proxy["milter"], True)
        self.assertEqual(proxy["timeout"], 120.0)
        self.assertEqual(proxy["upstream"], {"local": {"default": True, "hosts": "localhost"}})
        self.assertEqual(proxy["max_retries"], 5)
        self.assertEqual(proxy["spam_header"], "X-Spam")
        self.assertEqual(proxy["reject_message"], "Spam message rejected")

    def test_fuzzy_defaults(self) -> None:
        """The fuzzy storage listens on localhost:11335 with sqlite under $DBDIR."""
        fuzzy = sections(loader.load_config())["fuzzy"]
        self.assertEqual(fuzzy["bind_socket"], "localhost:11335")
        self.assertEqual(fuzzy["backend"], "sqlite")
        self.assertEqual(fuzzy["hashfile"], "/var/lib/rspamd-tx/fuzzy.db")
        self.assertEqual(fuzzy["count"], 1)
        self.assertEqual(fuzzy["expire"], 2 * 86400.0)

    def test_unrun_workers_are_disabled(self) -> None:
        """The scanner and controller sections exist but are switched off."""
        found = sections(loader.load_config())
        self.assertIs(found["normal"]["enabled"], False)
        self.assertIs(found["controller"]["enabled"], False)

    def test_defaults_bind_to_localhost_only(self) -> None:
        """Every shipped bind_socket is on localhost."""
        for name, section in loader.worker_sections(loader.load_config()):
            self.assertTrue(str(section["bind_socket"]).startswith("localhost:"), name)

    def test_variables_override_directories(self) -> None:
        """--var DBDIR=... moves the fuzzy database."""
        tree = loader.load_config(variables={"DBDIR": "/tmp/db", "RUNDIR": "/tmp/run"})
        self.assertEqual(sections(tree)["fuzzy"]["hashfile"], "/tmp/db/fuzzy.db")
        self.assertEqual(tree["options"]["pidfile"], "/tmp/run/rspamd-tx.pid")


class LayeringTests(ConfigDirMixin, TestCase):
    """local.d, override.d and a replacement top file in --config DIR."""

    def test_empty_config_dir_gives_defaults(self) -> None:
        """A DIR without local.d/override.d reads like the defaults (missing try-includes are fine)."""
        base = self.make_dir()
        self.assertEqual(loader.load_config(str(base)), loader.load_config())

    def test_local_d_merges_over_defaults(self) -> None:
        """local.d adds keys, merges sections and replaces scalar defaults."""
        base = self.make_dir()
        self.write(base, "local.d/worker-proxy.inc",
                   'timeout = 30s;\n'
                   'upstream "scan" { hosts = "scan1"; }\n'
                   'upstream "local" { hosts = "h"; }\n')
        proxy = sections(loader.load_config(str(base)))["rspamd_proxy"]
        self.assertEqual(proxy["timeout"], 30.0)
        self.assertIs(proxy["milter"], True)
        self.assertEqual(proxy["upstream"], {"local": {"default": True, "hosts": "h"},
                                             "scan": {"hosts": "scan1"}})

    def test_override_d_replaces(self) -> None:
        """override.d replaces whole keys it sets and leaves the others."""
        base = self.make_dir()
        self.write(base, "override.d/worker-proxy.inc", 'upstream "scan" { hosts = "scan1"; }\n')
        proxy = sections(loader.load_config(str(base)))["rspamd_proxy"]
        self.assertEqual(proxy["upstream"], {"scan": {"hosts": "scan1"}})
        self.assertEqual(proxy["spam_header"], "X-Spam")

    def test_override_d_beats_local_d(self) -> None:
        """A key set in both local.d and override.d takes the override."""
        base = self.make_dir()
        self.write(base, "local.d/worker-fuzzy.inc", "expire = 10d;\nsync = 5min;\n")
        self.write(base, "override.d/worker-fuzzy.inc", "expire = 20d;\n")
        fuzzy = sections(loader.load_config(str(base)))["fuzzy"]
        self.assertEqual(fuzzy["expire"], 20 * 86400.0)
        self.assertEqual(fuzzy["sync"], 300.0)

    def test_repeated_keys_in_local_d(self) -> None:
        """Repeated keys in local.d form a list that replaces the default."""
        base = self.make_dir()
        self.write(base, "local.d/worker-proxy.inc",
                   'bind_socket = "127.0.0.1:11332";\nbind_socket = "[::1]:11332";\n')
        proxy = sections(loader.load_config(str(base)))["rspamd_proxy"]
        self.assertEqual(proxy["bind_socket"], ["127.0.0.1:11332", "[::1]:11332"])

    def test_local_d_options_and_logging(self) -> None:
        """options.inc and logging.inc layer like the worker files."""
        base = self.make_dir()
        self.write(base, "local.d/options.inc", 'dns { nameserver = "127.0.0.1:5353"; }\n')
        self.write(base, "override.d/logging.inc", 'type = "file";\nfilename = "$LOGDIR/x.log";\n')
        tree = loader.load_config(str(base))
        self.assertEqual(tree["options"]["dns"]["nameserver"], "127.0.0.1:5353")
        self.assertEqual(tree["options"]["dns"]["timeout"], 1.0)
        self.assertEqual(tree["logging"], {"type": "file", "filename": "/var/log/rspamd-tx/x.log",
                                           "level": "info"})

    def test_rspamd_conf_local(self) -> None:
        """$LOCAL_CONFDIR/rspamd.conf.local adds top-level sections."""
        base = self.make_dir()
        self.write(base, "rspamd.conf.local", "redis { servers = \"127.0.0.1\"; }\n")
        self.assertEqual(loader.load_config(str(base))["redis"], {"servers": "127.0.0.1"})

    def test_seed_files_as_local_d(self) -> None:
        """An existing Rspamd local.d (the seeds) loads over our defaults."""
        base = self.make_dir()
        shutil.copytree(SEEDS, base / "local.d")
        found = sections(loader.load_config(str(base)))
        proxy = found["rspamd_proxy"]
        self.assertEqual(proxy["upstream"]["local"],
                         {"default": True, "hosts": "localhost", "self_scan": True})
        self.assertEqual(proxy["upstream"]["scan"]["hosts"],
                         "round-robin:host1:11333:10,host2:11333:10,host3:11333:5,host4:11333:5")
        self.assertEqual(proxy["bind_socket"], ["127.0.0.1:11332", "[::1]:11332"])
        self.assertEqual(found["fuzzy"]["backend"], "redis")
        self.assertEqual(found["fuzzy"]["expire"], 90 * 86400.0)
        self.assertIs(found["normal"]["enabled"], False)

    def test_top_file_in_config_dir_replaces_shipped(self) -> None:
        """DIR/rspamd.conf is read instead of conf/rspamd.conf; $CONFDIR stays the shipped dir."""
        base = self.make_dir()
        self.write(base, "rspamd.conf", 'worker "fuzzy" {\n  .include "$CONFDIR/worker-fuzzy.inc"\n}\n')
        tree = loader.load_config(str(base))
        self.assertEqual(list(tree), ["worker"])
        self.assertEqual([name for name, _ in loader.worker_sections(tree)], ["fuzzy"])

    def test_debian_top_file_loads(self) -> None:
        """Debian's own rspamd.conf in DIR loads against our shipped files."""
        debian = Path("/etc/rspamd/rspamd.conf")
        if not debian.is_file():
            raise SkipTest("Debian's /etc/rspamd is not installed")
        base = self.make_dir()
        shutil.copy(debian, base / "rspamd.conf")
        found = sections(loader.load_config(str(base)))
        self.assertEqual(found["fuzzy"]["count"], [-1, 1])
        self.assertEqual(found["rspamd_proxy"]["bind_socket"], "localhost:11332")

    def test_missing_required_include_fails(self) -> None:
        """A non-try include of a missing file is a ConfigError naming the place."""
        base = self.make_dir()
        self.write(base, "rspamd.conf", 'x = 1;\n.include "$LOCAL_CONFDIR/nope.inc"\n')
        with self.assertRaises(ConfigError) as caught:
            loader.load_config(str(base))
        self.assertEqual(caught.exception.location.line, 2)

    def test_syntax_error_in_local_d_fails(self) -> None:
        """A broken local.d file is a ConfigError pointing into it."""
        base = self.make_dir()
        self.write(base, "local.d/worker-proxy.inc", "upstream {\n")
        with self.assertRaises(ConfigError) as caught:
            loader.load_config(str(base))
        self.assertTrue(caught.exception.location.filename.endswith("local.d/worker-proxy.inc"))

    def test_missing_config_dir_fails(self) -> None:
        """--config naming no directory is a ConfigError."""
        self.assertRaises(ConfigError, loader.load_config, "/nonexistent/rspamd-tx")


class WorkerSectionsTests(TestCase):
    """:func:`loader.worker_sections` on the shapes Rspamd accepts."""

    def test_single_worker_object(self) -> None:
        """One ``worker "x" {}`` is an object keyed by type."""
        tree = UclObject(worker=UclObject(fuzzy=UclObject(count=1)))
        self.assertEqual(loader.worker_sections(tree), [("fuzzy", {"count": 1})])

    def test_type_key(self) -> None:
        """``worker { type = "fuzzy"; }`` names its type inside."""
        tree = UclObject(worker=[UclObject(type="fuzzy", count=2)])
        self.assertEqual(loader.worker_sections(tree), [("fuzzy", {"type": "fuzzy", "count": 2})])

    def test_several_of_one_type(self) -> None:
        """Two sections of one type give two entries."""
        tree = UclObject(worker=UclObject(fuzzy=[UclObject(count=1), UclObject(count=2)]))
        self.assertEqual(loader.worker_sections(tree), [("fuzzy", {"count": 1}), ("fuzzy", {"count": 2})])

    def test_no_workers(self) -> None:
        """A tree without workers has no sections."""
        self.assertEqual(loader.worker_sections(UclObject()), [])

    def test_non_object_worker_fails(self) -> None:
        """A worker that is not a section is a ConfigError."""
        self.assertRaises(ConfigError, loader.worker_sections, UclObject(worker="x"))
        self.assertRaises(ConfigError, loader.worker_sections, UclObject(worker=UclObject(fuzzy=1)))
