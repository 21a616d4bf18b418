"""Side-by-side benchmarks of rspamd-tx and real Rspamd 3.4 (``python -m bench``).

Benchmarks report numbers; they are not tests.  See ``bench/README.md``.
"""
