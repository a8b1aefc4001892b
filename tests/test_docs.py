"""The documents stay in step with the code."""
import pathlib

from blocksnap import errors

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_every_error_code_is_documented():
    """docs/API.md lists every API error code the code can raise."""
    text = (ROOT / "docs" / "API.md").read_text(encoding="utf-8")
    missing = [c.code for c in errors.all_error_classes() if f"`{c.code}`" not in text]
    assert missing == []


def test_readme_starts_with_the_two_commands():
    """The README's first commands run the demo and the tests, and .ci/run runs pytest."""
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    first_block = readme.split("```", 2)[1]
    assert "bash .ci/demo" in first_block and "bash .ci/run" in first_block
    assert "pytest" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")


def test_ci_runs_every_benchmark_once_after_the_tests():
    """.ci/run, after the test run, runs the benchmark suite (bench/) once, untimed, on a small image, and
    pyproject's default test run still collects tests/ only."""
    lines = [line.strip() for line in (ROOT / ".ci" / "run").read_text(encoding="utf-8").replace("\\\n", " ")
             .splitlines() if line.strip() and not line.lstrip().startswith("#")]
    tests_at = next(i for i, line in enumerate(lines) if "pytest" in line and " . " in f"{line} ")
    bench = [line for line in lines[tests_at + 1:] if "pytest" in line and "../bench" in line]
    assert len(bench) == 1, lines
    assert "--benchmark-disable" in bench[0] and "BLOCKSNAP_BENCH_SIZE=32M" in bench[0]
    assert "|| true" not in bench[0] and "set -euo pipefail" in lines  # a failing benchmark fails CI
    assert 'testpaths = ["tests"]' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")
