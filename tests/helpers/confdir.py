"""A small stand-in for the shipped configuration, for tests of the taps."""

from __future__ import annotations

import os
from collections.abc import Mapping

from twisted.trial import unittest

#: A top file laid out like the shipped ``conf/rspamd.conf``: defaults,
#: then ``local.d`` merged over them.
TOP_FILE = """\
logging {
  type = "console";
  level = "info";
  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/logging.inc"
}
worker "rspamd_proxy" {
  bind_socket = "localhost:11332";
  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/worker-proxy.inc"
}
worker "fuzzy" {
  bind_socket = "localhost:11335";
  count = -1;
  .include(try=true; priority=1,duplicate=merge) "$LOCAL_CONFDIR/local.d/worker-fuzzy.inc"
}
"""


def make_config(test: unittest.TestCase,
                local_d: Mapping[str, str]) -> str:
    """Point the loader at a test copy of the defaults and return a
    ``--config`` directory whose ``local.d`` holds ``local_d`` (file name to
    text). The environment is restored after the test."""
    base = os.path.abspath(test.mktemp())
    shipped = os.path.join(base, "shipped")
    local = os.path.join(base, "etc")
    os.makedirs(shipped)
    os.makedirs(os.path.join(local, "local.d"))
    with open(os.path.join(shipped, "rspamd.conf"), "w") as f:
        f.write(TOP_FILE)
    for name, text in local_d.items():
        with open(os.path.join(local, "local.d", name), "w") as f:
            f.write(text)
    previous = os.environ.get("RSPAMD_TX_CONFDIR")
    os.environ["RSPAMD_TX_CONFDIR"] = shipped

    def restore() -> None:
        if previous is None:
            del os.environ["RSPAMD_TX_CONFDIR"]
        else:
            os.environ["RSPAMD_TX_CONFDIR"] = previous

    test.addCleanup(restore)
    return local
