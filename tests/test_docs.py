"""Every ```python block of README.md and docs/*.md runs as written.

Blocks run in order, one namespace per file, in a scratch folder that holds what they name: the repo's
``recipes/`` (linked) and, for the export example, the files its comments say how to make (made here
through the same library calls the ``dsctl export`` commands use).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
BLOCK = re.compile(r"```python\n(.*?)```", re.S)


def _blocks(path: Path) -> list[str]:
    return BLOCK.findall(path.read_text())


def _make_exports(folder: Path) -> None:
    import dsctl
    from dsctl.export import export_dynamic_to_file, export_to_file

    torch.manual_seed(0)
    model = dsctl.build_model("tiny_ds_resnet").eval()
    spec = model.space.resolve(0.5)
    export_to_file(model, spec, folder / "tiny_ds_resnet_w0.5.pt2")
    export_to_file(model, spec, folder / "tiny_ds_resnet_w0.5.ts.pt", fmt="torchscript")
    export_dynamic_to_file(model, (0, 3), folder / "dynamic", source="random init")


def test_docs_have_python_examples() -> None:
    assert sum(len(_blocks(p)) for p in DOCS) >= 2


@pytest.mark.slow  # trains the smoke recipe and exports three files
@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_python_blocks_run_as_written(path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = _blocks(path)
    if not blocks:
        pytest.skip(f"{path.name}: no python blocks")
    (tmp_path / "recipes").symlink_to(ROOT / "recipes")
    monkeypatch.chdir(tmp_path)
    if any(".pt2" in b or ".ts.pt" in b for b in blocks):
        _make_exports(tmp_path)
    namespace: dict = {"__name__": "__docs__"}
    for i, code in enumerate(blocks):
        try:
            exec(compile(code, f"{path.name}[python block {i + 1}]", "exec"), namespace)
        except Exception as err:  # name the block: a failure must say which example broke
            raise AssertionError(f"{path.name}, python block {i + 1} fails: {type(err).__name__}: {err}") from err
