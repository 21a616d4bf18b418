"""Rspamd's configuration layering for the rspamd-tx daemons.

The shipped defaults live in ``conf/`` (:func:`shipped_confdir`).  Like
Rspamd's ``/etc/rspamd/rspamd.conf``, the top file ``conf/rspamd.conf``
includes for every section ``$CONFDIR/<name>.inc`` (the defaults), then
``$LOCAL_CONFDIR/local.d/<name>.inc`` with ``priority=1, duplicate=merge``
(merged over the defaults) and ``$LOCAL_CONFDIR/override.d/<name>.inc``
with ``priority=10`` (replaces the keys it sets).  Both are optional.

``--config DIR`` names a directory laid out like ``/etc/rspamd``: it becomes
``$LOCAL_CONFDIR`` so its ``local.d/`` and ``override.d/`` are layered over the
shipped defaults.  ``DIR`` may hold only those two folders; a
``DIR/rspamd.conf``, if present, replaces the shipped top file (``$CONFDIR``
still names the shipped directory, which also provides ``common.conf``,
``cgp.inc`` and the ``worker-*.inc`` files such a top file includes).

Variables (overridable with ``variables``, e.g. from ``--var NAME=VALUE``):

========================  ==============================================
``CONFDIR``               the shipped configuration directory
``LOCAL_CONFDIR``         ``DIR`` of ``--config DIR``, else ``CONFDIR``
``RUNDIR``                ``/run/rspamd-tx`` (pid files, sockets)
``DBDIR``                 ``/var/lib/rspamd-tx`` (the sqlite fuzzy database)
``LOGDIR``                ``/var/log/rspamd-tx``
========================  ==============================================

``$FILENAME`` and ``$CURDIR`` name the file being read, as in Rspamd.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from rspamd_tx.config import ucl
from rspamd_tx.config.tree import ConfigError, UclObject

__all__ = [
    "DEFAULT_DBDIR",
    "DEFAULT_LOGDIR",
    "DEFAULT_RUNDIR",
    "TOP_FILE",
    "default_variables",
    "load_config",
    "shipped_confdir",
    "worker_sections",
]

#: Default ``$RUNDIR``.
DEFAULT_RUNDIR = "/run/rspamd-tx"
#: Default ``$DBDIR``.
DEFAULT_DBDIR = "/var/lib/rspamd-tx"
#: Default ``$LOGDIR``.
DEFAULT_LOGDIR = "/var/log/rspamd-tx"
#: Name of the top configuration file, shipped or in ``--config DIR``.
TOP_FILE = "rspamd.conf"

_CONFDIR_ENV = "RSPAMD_TX_CONFDIR"


def shipped_confdir() -> Path:
    """The directory of the shipped defaults.

    The environment variable ``RSPAMD_TX_CONFDIR`` if set, else ``conf/``
    next to the package (a source checkout), else
    ``<sys.prefix>/share/rspamd-tx/conf`` (an installed package).
    """
    configured = os.environ.get(_CONFDIR_ENV)
    if configured:
        return Path(configured).absolute()
    checkout = Path(__file__).resolve().parent.parent.parent / "conf"
    if (checkout / TOP_FILE).is_file():
        return checkout
    return Path(sys.prefix) / "share" / "rspamd-tx" / "conf"


def default_variables(config_dir: str | None) -> dict[str, str]:
    """The variables a configuration is read with, before ``--var`` overrides.

    The order is Rspamd's (it matters when one name starts another, as
    ``$CONFDIR`` and ``$CONFDIRS`` would).
    """
    confdir = str(shipped_confdir())
    local = os.path.abspath(config_dir) if config_dir else confdir
    return {
        "CONFDIR": confdir,
        "LOCAL_CONFDIR": local,
        "RUNDIR": DEFAULT_RUNDIR,
        "DBDIR": DEFAULT_DBDIR,
        "LOGDIR": DEFAULT_LOGDIR,
    }


def load_config(config_dir: str | None = None, *,
                variables: Mapping[str, str] | None = None) -> UclObject:
    """Read the layered configuration.

    :param config_dir: a directory like ``/etc/rspamd`` (``--config``), or
        ``None`` for the shipped defaults alone.
    :param variables: overrides and additions to :func:`default_variables`.
    :raises ConfigError: if ``config_dir`` is not a directory, a file does
        not parse or a required include is missing.
    """
    if config_dir is not None and not os.path.isdir(config_dir):
        raise ConfigError(f"configuration directory {config_dir} does not exist")
    names = default_variables(config_dir)
    if variables:
        names.update(variables)
    top = shipped_confdir() / TOP_FILE
    if config_dir is not None:
        local_top = Path(config_dir) / TOP_FILE
        if local_top.is_file():
            top = local_top
    return ucl.load(str(top), variables=names)


def worker_sections(tree: UclObject) -> list[tuple[str, UclObject]]:
    """Every ``worker`` section as ``(type, section)``, in file order.

    Accepts ``worker "type" { ... }`` (one object keyed by type, or the
    implicit array that repeating ``worker`` makes, or several sections of
    one type) and ``worker { type = "type"; ... }``.

    :raises ConfigError: if a worker section is not an object.
    """
    value = tree.get("worker")
    if value is None:
        return []
    where = tree.location("worker")
    sections: list[tuple[str, UclObject]] = []
    for element in value if isinstance(value, list) else [value]:
        if not isinstance(element, UclObject):
            raise ConfigError("worker: expected a section { ... }", where)
        if isinstance(element.get("type"), str):
            sections.append((element["type"], element))
            continue
        for worker_type, body in element.items():
            for part in body if isinstance(body, list) else [body]:
                if not isinstance(part, UclObject):
                    raise ConfigError(f'worker "{worker_type}": expected a section {{ ... }}',
                                      element.location(worker_type) or where)
                sections.append((worker_type, part))
    return sections
