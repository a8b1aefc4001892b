"""Makes bench/ importable on its own (``import workload``/``import peers``) and keeps the source tree off
``sys.path``: the benchmarks measure the installed blocksnap (``pip install .``, with its compiled core).

The source tree has no compiled core (``pip install .`` builds it into site-packages, not here), and
``python -m pytest bench/`` from the repository root puts the root first on ``sys.path``, where it would
shadow the installed package: every import of ``blocksnap._native`` would then fail.
"""
import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)

sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != REPO_ROOT]
if BENCH_DIR not in sys.path:
    sys.path.insert(0, BENCH_DIR)
