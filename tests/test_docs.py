"""Every Python example of the documentation's getting-started and API pages runs
(each page's code blocks in order, in one fresh namespace)."""

import pathlib
import re

import pytest


DOCS = pathlib.Path(__file__).parents[1] / "docs"
# The "Managing adapters" page runs `select_adapter` on a traced index under `vmap`,
# whose `eqx.error_if` crashes JAX's tracer-leak checker (see tests/test_stack.py).
PAGES = [
    pytest.param(p, marks=pytest.mark.no_leak_check) if p.stem == "adapters" else p
    for p in [DOCS / "index.md", *sorted((DOCS / "api").glob("*.md"))]
]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_examples_run(page, capsys):
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page} has no Python example"
    namespace = {"__name__": f"docs_{page.stem}"}
    for code in blocks:
        exec(compile(code, str(page), "exec"), namespace)
