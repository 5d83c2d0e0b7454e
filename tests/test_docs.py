"""Every Python example of the documentation's getting-started and API pages runs
(each page's code blocks in order, in one fresh namespace)."""

import pathlib
import re

import pytest


DOCS = pathlib.Path(__file__).parents[1] / "docs"
PAGES = [DOCS / "index.md", *sorted((DOCS / "api").glob("*.md"))]
BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.stem)
def test_examples_run(page, capsys):
    blocks = BLOCK.findall(page.read_text())
    assert blocks, f"{page} has no Python example"
    namespace = {"__name__": f"docs_{page.stem}"}
    for code in blocks:
        exec(compile(code, str(page), "exec"), namespace)
