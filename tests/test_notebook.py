"""examples/colab_tpu_inference.ipynb runs top to bottom (nbclient, a real kernel) on CPU, its parameter cell pointed
at the tiny Qwen2-VL fixture with a tokenizer.json, planned for one v5e chip with int8 weights: every step of the
Colab path (plan, sharded/quantized load, chat, boxes drawn inline, a batch, decode speed) executes."""

import os
import shutil

import nbformat
import pytest
from nbclient import NotebookClient
from qwen2_tokenizer_fixture import build

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "examples", "colab_tpu_inference.ipynb")


def _text(cell) -> str:
  return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream")


@pytest.mark.slow
def test_colab_notebook_runs_on_cpu_with_the_tiny_model(q2_dir, tmp_path, monkeypatch):
  folder = tmp_path / "model"
  shutil.copytree(q2_dir, folder)
  build(str(folder / "tokenizer.json"))
  nb = nbformat.read(NOTEBOOK, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  # papermill's convention: a cell after the parameters cell overrides them
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(
      f"CHECKPOINT = {str(folder)!r}\nIMAGE = {str(folder / 'img1.png')!r}\nMOUNT_DRIVE = False\n"
      "DEVICES = 'v5e-1'\nDTYPE = 'int8'\nMAX_NEW_TOKENS = 4"))
  monkeypatch.setenv("PYTHONPATH", os.pathsep.join([ROOT, os.environ.get("PYTHONPATH", "")]))
  monkeypatch.setenv("JAX_PLATFORMS", "cpu")
  NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
  out = "\n".join(_text(c) for c in nb.cells if c.cell_type == "code")
  assert "TPU slice: v5e-1" in out
  assert "int8, batch 4, context 2048" in out and "-> fits" in out and "dtype int8" in out
  assert "qwen2_vl: 0.00 GiB of parameters loaded" in out
  assert "box(es):" in out and out.count("Q: ") == 3 and "tokens/s at batch 1" in out
  images = [o for c in nb.cells for o in c.get("outputs", []) if "image/png" in o.get("data", {})]
  assert len(images) == 2  # the picture and the picture with its boxes drawn
