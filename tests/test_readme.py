"""The README's Python snippets run as written: each ```python block, on its own, in a fresh namespace.

Each block runs in a fresh temporary working directory, so files a snippet writes (the Deploy section saves an
exported program and an ONNX model) land there and never in the repository.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SNIPPETS = re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.DOTALL | re.MULTILINE)


def _repo_root_entries() -> set[str]:
    # Hidden entries (.pytest_cache, .benchmarks) belong to the tools, not to the snippets.
    return {name for name in os.listdir(REPO) if not name.startswith(".")}


def test_readme_has_python_snippets():
    assert len(SNIPPETS) >= 3


def _skip_unless_importable(snippet: str) -> None:
    """Skips a snippet that imports torchvision or timm where they do not load: PyPI's wheels need a CUDA
    build of torch (the CI leg that installs one runs these snippets)."""
    for library in re.findall(r"^import .*?\b(torchvision|timm)\b", snippet, flags=re.MULTILINE):
        try:
            __import__(library)
        except (ImportError, RuntimeError) as error:
            pytest.skip(f"{library} does not load here: {error}")


@pytest.mark.parametrize("index", range(len(SNIPPETS)))
def test_readme_snippet_runs_as_written(index, tmp_path, monkeypatch):
    _skip_unless_importable(SNIPPETS[index])
    monkeypatch.chdir(tmp_path)
    before = _repo_root_entries()
    exec(compile(SNIPPETS[index], f"README.md python block {index + 1}", "exec"), {"__name__": "__readme__"})
    assert Path.cwd() == tmp_path, "a README snippet changed the working directory"
    written = sorted(_repo_root_entries() - before)
    assert not written, f"README python block {index + 1} wrote into the repository: {written}"
