"""colabs/*.ipynb as committed: valid, without outputs, installing only when
imports fail. tests/test_demo.py runs both over a trained demo."""

import pathlib

import nbformat
import pytest

COLABS = pathlib.Path(__file__).resolve().parents[1] / "colabs"
NOTEBOOKS = ("quickstart.ipynb", "train_demo.ipynb")


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
