"""Turn trial's closing summary into the plain ``N passed, N failed`` line.

Usage: ``python tests/trial_summary.py TRIAL_OUTPUT_FILE``. Exits 1 when the
output holds no summary (trial crashed) or when anything failed.
"""

import re
import sys

_SUMMARY = re.compile(r"^(PASSED|FAILED) \((?P<counts>[^)]*)\)\s*$", re.MULTILINE)


def summarise(output: str) -> tuple[int, int, int] | None:
    """Return (passed, failed, skipped) from trial's last summary line."""
    found = list(_SUMMARY.finditer(output))
    if not found:
        return None
    counts = {}
    for part in found[-1].group("counts").split(","):
        name, _, value = part.strip().partition("=")
        counts[name] = int(value)
    passed = counts.get("successes", 0) + counts.get("expectedFailures", 0)
    failed = (counts.get("failures", 0) + counts.get("errors", 0)
              + counts.get("unexpectedSuccesses", 0))
    return passed, failed, counts.get("skips", 0)


def main(path: str) -> int:
    with open(path, encoding="utf-8", errors="replace") as handle:
        result = summarise(handle.read())
    if result is None:
        print("0 passed, 1 failed")
        return 1
    passed, failed, skipped = result
    print(f"{passed} passed, {failed} failed, {skipped} skipped")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
