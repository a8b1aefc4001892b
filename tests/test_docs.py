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
