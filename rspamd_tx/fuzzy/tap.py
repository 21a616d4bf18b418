"""``twistd fuzzy-storage``: the fuzzy storage worker's command line and service tree.

Importing this module installs no reactor; :func:`makeService` imports the
worker's modules and builds the tree with
:func:`rspamd_tx.runtime.make_tap_service`.
"""

from __future__ import annotations

from twisted.application.service import MultiService

from rspamd_tx.runtime import TapOptions, make_tap_service

__all__ = ["Options", "makeService"]


class Options(TapOptions):
    """``twistd fuzzy-storage [--config DIR] [--var NAME=VALUE] ...``

    Runs every enabled ``worker "fuzzy"`` section of the configuration.
    """

    worker_type = "fuzzy"
    tapname = "fuzzy-storage"


def makeService(options: Options) -> MultiService:
    """The service tree of the fuzzy storage workers named by ``options``."""
    from rspamd_tx.fuzzy.server import build_worker

    return make_tap_service(options, build_worker)
