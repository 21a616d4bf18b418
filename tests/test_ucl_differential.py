"""Differential tests: our UCL parser against Rspamd's own (``rspamadm configdump``).

For every file of Debian's ``/etc/rspamd/**/*.conf`` and ``*.inc``, every seed
snippet of ``tests/data/seeds`` and our shipped ``conf/rspamd.conf``, the tree
from :func:`rspamd_tx.config.ucl.load` must equal the JSON that
``rspamadm configdump -j -c FILE`` prints, and a file rspamadm cannot parse
(the ``maps.d`` map lists are not UCL) must raise ``ConfigError`` here too.
Debian's and our top files are also compared with ``$LOCAL_CONFDIR`` set to
``tests/data/ucl/layered`` (the seeds in ``local.d`` plus an ``override.d``),
which exercises priorities and ``duplicate=merge`` across many includes.

The variables are the ones rspamadm defines: a probe file holding every
``${NAME}`` Rspamd registers is dumped first and its expansions are passed
to our parser (with ``$FILENAME``/``$CURDIR`` following the files, as in
both parsers).  rspamadm runs in subprocesses, four at a time.

Normalisations (applied to both sides unless noted), and why:

1. Numbers compare by value; floats are rounded to 6 decimals and integral
   floats equal ints.  configdump prints non-integral doubles with ``%f``
   (``0.100000``), and Rspamd's Lua config transform (below) turns every
   number into a Lua number, so ``5.0`` comes back as ``5``.
2. ``{}`` equals ``[]``: an empty object that passed through the Lua
   transform comes back as an empty Lua table, which is printed as ``[]``.
3. When a file makes Rspamd run its config transform
   (``lualib/lua_cfg_transform.lua``: the tree has ``metric`` or repeated
   ``group`` sections), the transform's effects are applied to *our* tree
   before comparing: ``metric`` sections lose their ``name`` (and with no
   groups a ``group { ungrouped { symbols {} } }`` is added), repeated
   ``group`` sections are merged into one object, ``dkim {}`` is added if
   missing, ``neural`` forces ``options.check_all_filters = true``, and
   ``surbl``/``emails`` become empty (their rules move to ``rbl``, which
   Debian's files leave empty).  Inputs using other legacy forms the
   transform rewrites (``metric`` actions/groups/symbols, top-level
   ``symbols``, non-empty ``surbl``/``emails`` rules) fail loudly instead of
   being normalised.
4. In ``regexp``, keys present only in rspamadm's output are ignored when
   the tree loads Lua rules (a top-level ``lua`` key): Rspamd's Lua rules
   (``$RULESDIR/regexp/*.lua``) add them while the configuration loads.
"""

from __future__ import annotations

import copy
import functools
import json
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from twisted.trial.unittest import SkipTest, TestCase

from rspamd_tx.config import loader, ucl
from rspamd_tx.config.tree import ConfigError

RSPAMADM = shutil.which("rspamadm")
DEBIAN_DIR = Path("/etc/rspamd")
SEEDS = Path(__file__).parent / "data" / "seeds"
LAYERED = Path(__file__).parent / "data" / "ucl" / "layered"
CONCURRENCY = 4
TIMEOUT = 120

#: The variables Rspamd 3.4 registers, in its order.
RSPAMD_VARIABLES = [
    "CONFDIR", "LOCAL_CONFDIR", "RUNDIR", "DBDIR", "LOGDIR", "PLUGINSDIR", "SHAREDIR",
    "RULESDIR", "WWWDIR", "PREFIX", "VERSION", "VERSION_MAJOR", "VERSION_MINOR",
    "BRANCH_VERSION", "HOSTNAME",
]


class Dump:
    """What ``rspamadm configdump -j`` said about one file."""

    def __init__(self, path: str, returncode: int, stdout: str, stderr: str) -> None:
        self.path = path
        self.ok = returncode == 0 and stdout.strip().startswith("{")
        self.tree: Any = json.loads(stdout) if self.ok else None
        self.stderr = stderr


def _run_rspamadm(path: str, extra: tuple[str, ...] = ()) -> Dump:
    assert RSPAMADM is not None
    done = subprocess.run([RSPAMADM, *extra, "configdump", "-j", "-c", path],
                          capture_output=True, text=True, timeout=TIMEOUT, check=False)
    return Dump(path, done.returncode, done.stdout, done.stderr)


def _dump_all(jobs: list[tuple[str, tuple[str, ...]]]) -> dict[tuple[str, tuple[str, ...]], Dump]:
    with ThreadPoolExecutor(max_workers=CONCURRENCY) as pool:
        results = pool.map(lambda job: _run_rspamadm(*job), jobs)
        return dict(zip(jobs, results))


def _require_rspamadm() -> None:
    if RSPAMADM is None:
        raise SkipTest("rspamadm (Rspamd 3.4) is not installed")


@functools.lru_cache(maxsize=None)
def rspamd_variables() -> dict[str, str]:
    """The value of every Rspamd variable, as rspamadm expands it."""
    with tempfile.TemporaryDirectory() as tmp:
        probe = Path(tmp) / "probe.conf"
        probe.write_text("v = [" + ", ".join(f'"${{{name}}}"' for name in RSPAMD_VARIABLES) + "];\n")
        dump = _run_rspamadm(str(probe))
    if not dump.ok:
        raise AssertionError(f"rspamadm cannot dump the variable probe: {dump.stderr}")
    return dict(zip(RSPAMD_VARIABLES, dump.tree["v"]))


def debian_files() -> list[str]:
    """Every ``*.conf`` and ``*.inc`` of Debian's ``/etc/rspamd``."""
    found = [p for p in DEBIAN_DIR.rglob("*") if p.suffix in (".conf", ".inc") and p.is_file()]
    return sorted(str(p) for p in found)


@functools.lru_cache(maxsize=None)
def all_dumps() -> dict[tuple[str, tuple[str, ...]], Dump]:
    """configdump of every compared file, computed once for the whole module."""
    jobs: list[tuple[str, tuple[str, ...]]] = [(path, ()) for path in debian_files()]
    jobs += [(str(path), ()) for path in sorted(SEEDS.iterdir())]
    jobs.append((str(loader.shipped_confdir() / "rspamd.conf"), _shipped_var_args()))
    jobs.append((str(loader.shipped_confdir() / "rspamd.conf"), _shipped_var_args(str(LAYERED))))
    if (DEBIAN_DIR / "rspamd.conf").is_file():
        jobs.append((str(DEBIAN_DIR / "rspamd.conf"), (f"--var=LOCAL_CONFDIR={LAYERED}",)))
    return _dump_all(jobs)


def _shipped_variables(config_dir: str | None = None) -> dict[str, str]:
    return loader.default_variables(config_dir)


def _shipped_var_args(config_dir: str | None = None) -> tuple[str, ...]:
    return tuple(f"--var={name}={value}" for name, value in _shipped_variables(config_dir).items())


# -- normalisation -------------------------------------------------------------


class _Empty:
    """The canonical form of both ``{}`` and ``[]``."""

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Empty)

    def __hash__(self) -> int:
        return 0

    def __repr__(self) -> str:
        return "EMPTY"


def canonical(value: Any) -> Any:
    """Normalisations 1 and 2 of the module docstring."""
    if isinstance(value, dict):
        if not value:
            return _Empty()
        return {key: canonical(item) for key, item in value.items()}
    if isinstance(value, list):
        if not value:
            return _Empty()
        return [canonical(item) for item in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, float):
        if value != value:
            return "nan"
        if value.is_integer():
            return int(value)
        return round(value, 6)
    return value


def lua_transform(tree: dict[str, Any]) -> dict[str, Any]:
    """Normalisation 3: the effects of Rspamd's Lua config transform."""
    if "metric" not in tree and not isinstance(tree.get("group"), list):
        return tree
    result = copy.deepcopy(tree)
    if "metric" in result:
        metrics = result["metric"]
        for metric in metrics if isinstance(metrics, list) else [metrics]:
            unmodelled = set(metric) - {"name"}
            if unmodelled:
                raise AssertionError(f"metric keys not modelled: {sorted(unmodelled)}")
            metric.pop("name", None)
        result.setdefault("group", {"ungrouped": {"symbols": {}}})
    if "symbols" in result:
        raise AssertionError("top-level symbols are not modelled")
    if isinstance(result.get("group"), list):
        merged: dict[str, Any] = {}
        for element in result["group"]:
            merged.update(element)
        result["group"] = merged
    result.setdefault("dkim", {})
    if "neural" in result:
        result.setdefault("options", {})["check_all_filters"] = True
    for section in ("surbl", "emails"):
        if section in result:
            rules = result[section].get("rules") if isinstance(result[section], dict) else None
            if rules:
                raise AssertionError(f"{section} rules are not modelled")
            result[section] = {}
            rbl = result.setdefault("rbl", {"rbls": {}})
            rbl.setdefault("rbls", {})
    return result


def drop_lua_regexp(ours: dict[str, Any], theirs: dict[str, Any]) -> dict[str, Any]:
    """Normalisation 4: forget ``regexp`` keys Rspamd's Lua rules added."""
    if "lua" not in ours or not isinstance(theirs.get("regexp"), dict):
        return theirs
    result = dict(theirs)
    regexp = ours.get("regexp")
    ours_regexp: dict[str, Any] = regexp if isinstance(regexp, dict) else {}
    result["regexp"] = {k: v for k, v in theirs["regexp"].items() if k in ours_regexp}
    return result


def first_difference(ours: Any, theirs: Any, path: str = "") -> str | None:
    """A readable description of where two canonical trees differ."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        for key in sorted(set(ours) | set(theirs)):
            if key not in ours:
                return f"{path}/{key}: only in rspamadm: {json.dumps(theirs[key], default=repr)[:200]}"
            if key not in theirs:
                return f"{path}/{key}: only in ours: {json.dumps(ours[key], default=repr)[:200]}"
            found = first_difference(ours[key], theirs[key], f"{path}/{key}")
            if found:
                return found
        return None
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        for index, (a, b) in enumerate(zip(ours, theirs)):
            found = first_difference(a, b, f"{path}[{index}]")
            if found:
                return found
        return None
    if ours != theirs or isinstance(ours, bool) != isinstance(theirs, bool):
        ours_text = json.dumps(ours, default=repr)[:200]
        theirs_text = json.dumps(theirs, default=repr)[:200]
        return f"{path}: ours {ours_text} != rspamadm {theirs_text}"
    return None


class DifferentialTests(TestCase):
    """Our parser against ``rspamadm configdump``."""

    def compare(self, path: str, extra: tuple[str, ...] = (),
                variables: dict[str, str] | None = None) -> str | None:
        """Compare one file; return a description of the mismatch, if any."""
        dump = all_dumps()[(path, extra)]
        names = rspamd_variables() if variables is None else variables
        try:
            ours = ucl.load(path, variables=names)
        except ConfigError as exc:
            if dump.ok:
                return f"{path}: we fail ({exc}) but rspamadm parses it"
            return None
        if not dump.ok:
            return f"{path}: we parse it but rspamadm fails: {dump.stderr.strip()[-300:]}"
        theirs = drop_lua_regexp(ours, dump.tree)
        difference = first_difference(canonical(lua_transform(ours)), canonical(theirs))
        return f"{path}: {difference}" if difference else None

    def test_debian_files(self) -> None:
        """Every file of Debian's /etc/rspamd parses exactly as rspamadm parses it."""
        _require_rspamadm()
        files = [f for f in debian_files() if f != str(DEBIAN_DIR / "rspamd.conf")]
        if not files:
            raise SkipTest("Debian's /etc/rspamd is not installed")
        problems = [p for p in (self.compare(f) for f in files) if p]
        self.assertEqual(problems, [])

    def test_debian_map_files_fail_in_both(self) -> None:
        """The maps.d lists, which are not UCL, are rejected by both parsers."""
        _require_rspamadm()
        maps = [f for f in debian_files() if "/maps.d/" in f]
        if not maps:
            raise SkipTest("Debian's /etc/rspamd/maps.d is not installed")
        for path in maps:
            self.assertFalse(all_dumps()[(path, ())].ok, path)
            self.assertRaises(ConfigError, ucl.load, path, variables=rspamd_variables())

    def test_whole_debian_tree(self) -> None:
        """/etc/rspamd/rspamd.conf with all its includes equals rspamadm's whole configuration."""
        _require_rspamadm()
        top = DEBIAN_DIR / "rspamd.conf"
        if not top.is_file():
            raise SkipTest("Debian's /etc/rspamd is not installed")
        self.assertIsNone(self.compare(str(top)))

    def test_seeds(self) -> None:
        """Every seed snippet parses exactly as rspamadm parses it."""
        _require_rspamadm()
        problems = [p for p in (self.compare(str(s)) for s in sorted(SEEDS.iterdir())) if p]
        self.assertEqual(problems, [])

    def test_shipped_configuration(self) -> None:
        """Our conf/rspamd.conf reads the same in rspamadm given the same variables."""
        _require_rspamadm()
        top = str(loader.shipped_confdir() / "rspamd.conf")
        self.assertIsNone(self.compare(top, _shipped_var_args(), _shipped_variables()))

    def test_layered_debian_tree(self) -> None:
        """Debian's rspamd.conf over a local.d/override.d directory reads as rspamadm reads it."""
        _require_rspamadm()
        top = DEBIAN_DIR / "rspamd.conf"
        if not top.is_file():
            raise SkipTest("Debian's /etc/rspamd is not installed")
        names = dict(rspamd_variables(), LOCAL_CONFDIR=str(LAYERED))
        self.assertIsNone(self.compare(str(top), (f"--var=LOCAL_CONFDIR={LAYERED}",), names))

    def test_layered_shipped_configuration(self) -> None:
        """Our conf/rspamd.conf over the same directory reads as rspamadm reads it."""
        _require_rspamadm()
        top = str(loader.shipped_confdir() / "rspamd.conf")
        self.assertIsNone(self.compare(top, _shipped_var_args(str(LAYERED)),
                                       _shipped_variables(str(LAYERED))))
