"""Running one benchmark case against several targets, interleaved.

The machine a benchmark runs on is rarely quiet, and background load moves
over minutes.  So the targets of a case are not measured one whole run after
the other: each target is warmed up, then the case runs in
``settings.slices`` rounds, and in every round each target gets its share of
the duration (``duration / slices`` seconds, ``max_requests / slices``
requests) in turn.  A target's slices are then concatenated
(:func:`bench.loadgen.concatenate`) into its one
:class:`~bench.report.Result`, so slow and quiet moments fall on every
target alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from bench.loadgen import RunStats, TargetSpec, concatenate, run_processes
from bench.peers import children_of, cpu_seconds
from bench.report import Report, Result, Settings, brief

__all__ = ["CaseTarget", "measure_case"]


@dataclass(frozen=True)
class CaseTarget:
    """One target of a case.

    Attributes:
        name: the target's name in the report (``rspamd``, ``ours``, ...).
        spec: what to load.
        pids: the target's processes (children included when measured); their
            CPU during the measured slices goes to ``extra["target_cpu"]``.
    """

    name: str
    spec: TargetSpec
    pids: Sequence[int] = field(default=())


def _watched(target: CaseTarget) -> list[int]:
    return [*target.pids, *(child for pid in target.pids for child in children_of(pid))]


async def measure_case(reactor: Any, report: Report, settings: Settings, bench: str, case: str,
                       targets: Sequence[CaseTarget], concurrency: int,
                       timeout: float | None = None) -> list[Result]:
    """Measure every target of one case, interleaved; add one result per target to ``report``.

    ``timeout`` overrides ``settings.timeout`` (UDP datagrams are given up on
    sooner).  A target whose generator fails outright is recorded with the
    reason instead of stats and left out of later rounds; the others go on.
    """
    timeout = settings.timeout if timeout is None else timeout
    slices = max(settings.slices, 1)
    share = settings.duration / slices
    cap = math.ceil(settings.max_requests / slices)
    runs: dict[str, list[RunStats]] = {t.name: [] for t in targets}
    cpu: dict[str, float] = {t.name: 0.0 for t in targets}
    failed: dict[str, str] = {}
    for target in targets:
        if settings.warmup > 0:
            try:
                await run_processes(reactor, target.spec, 1, concurrency, None,
                                    settings.warmup, timeout)
            except Exception as exc:  # a broken target is reported, the rest go on
                failed[target.name] = f"failed: {brief(exc)}"
    for _ in range(slices):
        for target in targets:
            if target.name in failed:
                continue
            watched = _watched(target)
            before = cpu_seconds(watched)
            try:
                stats = await run_processes(reactor, target.spec, settings.generators,
                                            concurrency, cap, share, timeout)
            except Exception as exc:  # a broken target is reported, the rest go on
                failed[target.name] = f"failed: {brief(exc)}"
                continue
            cpu[target.name] += cpu_seconds(watched) - before
            runs[target.name].append(stats)
    return [_result(report, bench, case, target, runs[target.name], cpu[target.name],
                    failed.get(target.name)) for target in targets]


def _result(report: Report, bench: str, case: str, target: CaseTarget, runs: list[RunStats],
            cpu_used: float, failure: str | None) -> Result:
    if failure is not None or not runs:
        return report.add(Result(bench, case, target.name, note=failure or "not run"))
    stats = concatenate(runs)
    note = ""
    if stats.completed == 0:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(stats.error_kinds.items()))
        note = f"no successful request ({kinds})"
    result = report.add(Result(bench, case, target.name, stats, note))
    target_cpu = ""
    if target.pids and stats.elapsed > 0:
        result.extra["target_cpu"] = round(cpu_used / stats.elapsed, 3)
        target_cpu = f", target CPU {cpu_used / stats.elapsed * 100:.0f}%"
    print(f"  {bench} {case} {target.name}: {stats.rate:.1f} req/s, "
          f"p50 {stats.p50 * 1000:.2f} ms, p99 {stats.p99 * 1000:.2f} ms, "
          f"errors {stats.errors} {dict(stats.error_kinds) or ''} "
          f"outcomes {dict(stats.outcomes)}{target_cpu}", flush=True)
    return result
