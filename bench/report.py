"""Collecting benchmark results and printing them side by side.

A :class:`Report` holds one :class:`Result` per (benchmark, case, target):
the :class:`~bench.loadgen.RunStats` of a measured run, or the reason it did
not run.  :meth:`Report.table` prints req/s, p50/p99/max, errors, the
generator's CPU use and the target's (its processes' CPU seconds per second
of the run: 100 % is one core busy); :meth:`Report.ratios` prints ours ÷
Rspamd per case (req/s: above 1 is faster; p99: below 1 is faster);
:meth:`Report.added_p99` prints the p99 a proxy adds over scanning directly.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import RunStats

__all__ = ["Report", "Result", "Settings", "brief"]


def brief(error: BaseException, lines: int = 3, limit: int = 600) -> str:
    """A one-line account of ``error`` for a note: its first and last lines."""
    text = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(text) > lines + 1:
        text = text[:1] + ["…"] + text[-lines:]
    joined = " | ".join(text) or type(error).__name__
    return joined if len(joined) <= limit else joined[:limit] + "…"


@dataclass(frozen=True)
class Settings:
    """How long and how hard each case runs.

    Attributes:
        duration: measured seconds per case.
        warmup: seconds of unmeasured load before each case.
        max_requests: request cap per case (the run stops at whichever comes first).
        timeout: per-request timeout (seconds).
        slices: rounds a case is split into; each round runs every target in turn.
        sessions: milter sessions for the memory-growth run.
        generators: load generator processes per case (1 = in the bench process).
        quick: a smoke run.
    """

    duration: float = 10.0
    warmup: float = 1.0
    max_requests: int = 200_000
    timeout: float = 30.0
    slices: int = 3
    sessions: int = 5_000
    generators: int = 1
    quick: bool = False

    @classmethod
    def quick_run(cls) -> Settings:
        """A few seconds per case: proves every path works, numbers are rough."""
        return cls(duration=2.0, warmup=0.3, max_requests=20_000, timeout=10.0, slices=1,
                   sessions=1_500, quick=True)


@dataclass
class Result:
    """One measured (or skipped) run."""

    bench: str
    case: str
    target: str
    stats: RunStats | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)


def _fmt(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _percent(extra: dict[str, Any]) -> str:
    cpu = extra.get("target_cpu")
    return "-" if cpu is None else f"{cpu * 100:.0f}%"


def _ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or math.isnan(a) or math.isnan(b) or b == 0:
        return None
    return a / b


class Report:
    """Results of a benchmark session, in the order they were added."""

    def __init__(self) -> None:
        self.results: list[Result] = []
        self.notes: list[str] = []

    def add(self, result: Result) -> Result:
        self.results.append(result)
        return result

    def note(self, text: str) -> None:
        """A line printed under the tables (what did not run and why, memory, ...)."""
        self.notes.append(text)

    def find(self, bench: str, case: str, target: str) -> Result | None:
        for result in self.results:
            if (result.bench, result.case, result.target) == (bench, case, target):
                return result
        return None

    def table(self, bench: str) -> str:
        """Every run of ``bench``: one line per (case, target)."""
        rows = [("case", "target", "req/s", "p50 ms", "p99 ms", "max ms", "ok", "errors",
                 "gen CPU", "tgt CPU")]
        for r in self.results:
            if r.bench != bench:
                continue
            if r.stats is None:
                rows.append((r.case, r.target, "-", "-", "-", "-", "-", "-", "-",
                             r.note or "not run"))
                continue
            s = r.stats
            rows.append((r.case, r.target, _fmt(s.rate, 1), _fmt(s.p50 * 1000),
                         _fmt(s.p99 * 1000), _fmt(s.max * 1000), str(s.completed),
                         str(s.errors), f"{s.generator_cpu * 100:.0f}%", _percent(r.extra)))
        return _columns(rows)

    def ratios(self, bench: str, baseline: str, compared: Sequence[str]) -> str:
        """ours ÷ Rspamd per case: req/s and p99 of each ``compared`` target over ``baseline``."""
        rows = [("case", "target", "req/s ratio", "p99 ratio")]
        for case in self._cases(bench):
            base = self.find(bench, case, baseline)
            for target in compared:
                other = self.find(bench, case, target)
                if base is None or other is None:
                    continue
                if base.stats is None or other.stats is None:
                    rows.append((case, f"{target} ÷ {baseline}", "-", "-"))
                    continue
                rows.append((case, f"{target} ÷ {baseline}",
                             _fmt(_ratio(other.stats.rate, base.stats.rate)),
                             _fmt(_ratio(other.stats.p99, base.stats.p99))))
        return _columns(rows)

    def added_p99(self, bench: str, direct: str, proxies: Sequence[str]) -> str:
        """p99 of each proxy minus p99 of scanning ``direct``ly, per case (ms)."""
        rows = [("case", "proxy", "p99 added ms", "p50 added ms")]
        for case in self._cases(bench):
            base = self.find(bench, case, direct)
            if base is None or base.stats is None:
                continue
            for proxy in proxies:
                other = self.find(bench, case, proxy)
                if other is None or other.stats is None:
                    continue
                rows.append((case, proxy,
                             _fmt((other.stats.p99 - base.stats.p99) * 1000),
                             _fmt((other.stats.p50 - base.stats.p50) * 1000)))
        return _columns(rows)

    def _cases(self, bench: str) -> list[str]:
        seen: list[str] = []
        for r in self.results:
            if r.bench == bench and r.case not in seen:
                seen.append(r.case)
        return seen

    def to_json(self) -> str:
        """Every result (summary numbers, not raw latencies) and note, as JSON."""
        return json.dumps({
            "results": [
                {"bench": r.bench, "case": r.case, "target": r.target, "note": r.note,
                 "extra": r.extra, "stats": r.stats.summary() if r.stats else None}
                for r in self.results
            ],
            "notes": self.notes,
        }, indent=2)


def _columns(rows: Iterable[Sequence[str]]) -> str:
    rows = [tuple(row) for row in rows]
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(rows[0]))]
    lines = []
    for row in rows:
        cells = [cell.ljust(widths[i]) if i < 2 else cell.rjust(widths[i])
                 for i, cell in enumerate(row)]
        lines.append("  ".join(cells).rstrip())
    return "\n".join(lines)
