"""The README's quickstart runs as written."""

from __future__ import annotations

import os
import re
from pathlib import Path


def test_quickstart_runs_as_written(tmp_path, capsys):
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", readme, re.S).group(1)
    assert 12 <= len(block.strip().splitlines()) <= 20
    cwd = os.getcwd()
    os.chdir(tmp_path)  # the callback writes under the trainer's default_root_dir
    try:
        exec(compile(block, "README quickstart", "exec"), {})
    finally:
        os.chdir(cwd)
    out = capsys.readouterr().out
    assert "torch.Size([8, 1400])" in out and "most self-influential" in out


def test_examples_quickstart_is_the_readme_quickstart():
    root = Path(__file__).parents[1]
    block = re.search(r"## Quickstart\n\n```python\n(.*?)```", (root / "README.md").read_text(), re.S).group(1)
    assert (root / "examples" / "quickstart.py").read_text().endswith("\n\n" + block)
