"""colabs/*.ipynb as committed: valid, without outputs, installing only when
imports fail; and the helpers that run them. tests/test_demo.py runs the RAR
notebooks over a trained demo, tests/test_pipeline_eq.py the Equivariant one
over the paper pipeline's trained runs."""

import base64
import io
import pathlib

import nbformat
import numpy as np
import pytest
from PIL import Image

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = ("quickstart.ipynb", "train_demo.ipynb", "equivariant_wide.ipynb")


def load_notebook(name):
  """colabs/<name> as committed (nbformat v4)."""
  return nbformat.read(COLABS / name, as_version=4)


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_guarded_install(name):
  nb = load_notebook(name)
  nbformat.validate(nb)
  code = [c for c in nb.cells if c.cell_type == "code"]
  for cell in code:
    assert cell.outputs == [] and cell.execution_count is None, (
        f"{name}: clear outputs before committing (jupyter nbconvert "
        "--clear-output --inplace colabs/*.ipynb)")
  first = code[0].source
  # %pip: into the kernel's own Python (!pip may run another one's).
  assert "%pip install" in first and "except ImportError:" in first, (
      f"{name}: the first code cell must %pip-install only when imports fail")
  assert "!pip" not in "".join(c.source for c in code)


def notebook_images(nb):
  """Decoded PNG outputs of an executed notebook."""
  out = []
  for cell in nb.cells:
    for o in cell.get("outputs", []):
      data = o.get("data", {})
      if "image/png" in data:
        out.append(np.asarray(Image.open(io.BytesIO(base64.b64decode(data["image/png"])))))
  return out


def notebook_text(nb) -> str:
  return "\n".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))


def run_notebook(name):
  """colabs/<name> executed top to bottom in a fresh kernel (run from
  colabs/, as a user opens it); returns the notebook with its outputs."""
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  nb = load_notebook(name)
  NotebookClient(nb, timeout=240, kernel_name="python3",
                 resources={"metadata": {"path": str(COLABS)}}).execute()
  return nb
