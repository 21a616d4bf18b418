"""``mypy --strict`` (the configuration in ``pyproject.toml``) over the
modules that are kept clean.

mypy runs in-process (:func:`mypy.api.run`) with its cache in the test's
temporary directory. Modules outside :data:`CHECKED` are followed for their
types, but their own errors are not reported here.
"""

from __future__ import annotations

import os
from types import ModuleType

from twisted.trial import unittest

from tests.helpers.net import REPO_ROOT

mypy_api: ModuleType | None
try:
    from mypy import api as mypy_api
except ImportError:  # pragma: no cover - depends on the installed extras
    mypy_api = None

#: The modules checked, relative to the repository root: the package modules
#: and the tests kept clean (``tests.*`` may call trial's unannotated asserts).
CHECKED = (
    "rspamd_tx/__main__.py",
    "rspamd_tx/address_lists.py",
    "rspamd_tx/logging.py",
    "rspamd_tx/runtime.py",
    "rspamd_tx/supervisor.py",
    "rspamd_tx/config/__init__.py",
    "rspamd_tx/config/bind.py",
    "rspamd_tx/config/loader.py",
    "rspamd_tx/config/schema.py",
    "rspamd_tx/config/tree.py",
    "rspamd_tx/config/ucl.py",
    "rspamd_tx/config/ucl_emit.py",
    "rspamd_tx/config/workers.py",
    "rspamd_tx/fuzzy/key_maps.py",
    "rspamd_tx/fuzzy/redis_backend.py",
    "rspamd_tx/fuzzy/redis_pipeline.py",
    "rspamd_tx/fuzzy/tap.py",
    "rspamd_tx/protocols/cryptobox.py",
    "rspamd_tx/protocols/fuzzy_codec.py",
    "rspamd_tx/protocols/http_codec.py",
    "rspamd_tx/protocols/keypair.py",
    "rspamd_tx/protocols/legacy_reply.py",
    "rspamd_tx/protocols/milter_codec.py",
    "rspamd_tx/protocols/milter_events.py",
    "rspamd_tx/protocols/sniff.py",
    "rspamd_tx/protocols/zbase32.py",
    "rspamd_tx/proxy/scanning.py",
    "rspamd_tx/proxy/tap.py",
    "rspamd_tx/upstreams/balancer.py",
    "rspamd_tx/upstreams/hosts.py",
    "rspamd_tx/upstreams/http_client.py",
    "rspamd_tx/upstreams/resolve.py",
    "tests/helpers/__init__.py",
    "tests/helpers/confdir.py",
    "tests/helpers/messages.py",
    "tests/helpers/net.py",
    "tests/helpers/pid_worker.py",
    "tests/helpers/serving.py",
    "tests/milter_frames.py",
    "tests/test_address_lists.py",
    "tests/test_balancer.py",
    "tests/test_balancer_health.py",
    "tests/test_bind.py",
    "tests/test_config_loader.py",
    "tests/test_config_workers.py",
    "tests/test_cryptobox.py",
    "tests/test_fuzzy_codec.py",
    "tests/test_fuzzy_key_maps.py",
    "tests/test_fuzzy_redis_pipeline.py",
    "tests/test_http_client.py",
    "tests/test_http_codec.py",
    "tests/test_keypair.py",
    "tests/test_legacy_reply.py",
    "tests/test_logging.py",
    "tests/test_main.py",
    "tests/test_milter_codec.py",
    "tests/test_milter_codec_miltertest.py",
    "tests/test_plugins.py",
    "tests/test_runtime.py",
    "tests/test_schema.py",
    "tests/test_sniff.py",
    "tests/test_tap.py",
    "tests/test_typing.py",
    "tests/test_ucl.py",
    "tests/test_ucl_differential.py",
    "tests/test_ucl_emit.py",
    "tests/test_upstream_hosts.py",
    "tests/test_zbase32.py",
)


class StrictTypingTests(unittest.TestCase):
    """The checked modules pass ``mypy --strict``."""

    if mypy_api is None:
        skip = "mypy is not installed (pip install -e '.[test]')"

    timeout = 300

    def test_strict_clean(self) -> None:
        """mypy reports no error in any checked module."""
        assert mypy_api is not None
        stdout, stderr, status = mypy_api.run([
            "--config-file", os.path.join(REPO_ROOT, "pyproject.toml"),
            "--cache-dir", os.path.abspath(self.mktemp()),
            "--follow-imports", "silent",
            "--no-error-summary",
            "--show-error-codes",
            *(os.path.join(REPO_ROOT, path) for path in CHECKED),
        ])
        self.assertEqual(
            (status, stdout, stderr), (0, "", ""),
            f"mypy --strict reported errors:\n{stdout}{stderr}")
