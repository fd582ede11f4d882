"""The README's Python examples run as written, so they cannot rot: every ```python block of the
"Check your implementation" section (run in order, in one namespace, asserts included), and the first
block of "From Python" (the one that needs no model). numpy only."""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def section(title):
    """The text of the README section `## {title}` up to the next `## ` heading."""
    text = README.read_text(encoding="utf-8")
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", text, re.S | re.M)
    assert m, f"README has no section {title!r}"
    return m.group(1)


def python_blocks(text):
    return re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)


def run(code, name):
    namespace = {"__name__": f"readme_{name}"}
    exec(compile(code, f"README.md ({name})", "exec"), namespace)
    return namespace


def test_check_your_implementation_section_runs_and_passes():
    blocks = python_blocks(section("Check your implementation"))
    assert len(blocks) >= 2, "the AM check and the press check"
    ns = run("\n".join(blocks), "check your implementation")
    # The checks ran on the data they describe: a head of 256 rows kept at 32, one β at a bound.
    assert ns["out"]["indices"].shape == (32,)
    assert (~ns["free"]).sum() >= 1, "the AM example should exercise a clamp bound"
    assert set(ns["kept"](ns["snapkv"], 96)) >= set(range(256 - 64, 256)), "SnapKV keeps its window"


def test_the_numpy_example_of_from_python_runs():
    blocks = python_blocks(section("From Python: the oracle in-process"))
    assert blocks and "kvcompact.Model" not in blocks[0]
    ns = run(blocks[0], "from python")
    assert ns["out"]["indices"].shape == (12,)

