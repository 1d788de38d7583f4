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


def test_setup_cells_are_one_and_say_when_a_clone_fails(tmp_path, monkeypatch):
  """The notebooks share one setup cell. Run from a folder without a
  checkout: a clone that fails stops it (it went on with whatever
  genvis_jax was installed), and a re-run finds its clone instead of
  cloning again over it."""
  from nbclient import NotebookClient  # pylint: disable=import-outside-toplevel
  from nbclient.exceptions import CellExecutionError  # pylint: disable=import-outside-toplevel
  setups = {load_notebook(n).cells[1].source for n in NOTEBOOKS}
  assert len(setups) == 1
  cell = setups.pop()

  def run(url, cells=1):
    monkeypatch.setenv("GENVIS_REPO_URL", url)
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(cell)
                                         for _ in range(cells)])
    NotebookClient(nb, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(tmp_path)}}).execute()
    return notebook_text(nb)

  with pytest.raises(CellExecutionError, match=r"Cloning '.*nowhere' into "
                     r".*genvis_jax_repo failed"):
    run(str(tmp_path / "nowhere"))
  out = run(str(COLABS.parent), cells=2)     # the cell run twice: one clone
  assert "already exists" not in out
  assert out.count("genvis_jax from") == 2
