"""Makes bench/ importable on its own: ``import workload``/``import peers`` and the in-tree ``blocksnap``."""
import os
import sys

BENCH_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(BENCH_DIR)
for path in (BENCH_DIR, REPO_ROOT):
    if path not in sys.path:
        sys.path.insert(0, path)
