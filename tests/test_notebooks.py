"""Every notebook in colab/ runs top to bottom on CPU with the tiny setting, and the committed
notebooks are Colab-ready: generated from colab/build_notebooks.py, saved with the outputs of a
run, a setup cell that needs no local checkout, and an "Open in Colab" badge."""

import glob
import importlib.util
import os
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "colab", "*.ipynb")))
ids = os.path.basename


def _builder():
  spec = importlib.util.spec_from_file_location(
    "build_notebooks", os.path.join(ROOT, "colab", "build_notebooks.py")
  )
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


build_notebooks = _builder()


def test_there_are_notebooks():
  assert len(NOTEBOOKS) >= 1
  assert sorted(map(ids, NOTEBOOKS)) == sorted(build_notebooks.NOTEBOOKS)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_committed_sources_match_the_generator(path):
  """Editing a .ipynb by hand (or the generator without rebuilding) fails here."""
  saved = nbformat.read(path, as_version=4)
  built = build_notebooks.build(ids(path))
  assert [(c.id, c.cell_type, c.source) for c in saved.cells] == [
    (c.id, c.cell_type, c.source) for c in built.cells
  ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_saved_with_outputs_and_no_errors(path):
  nb = nbformat.read(path, as_version=4)
  code = [c for c in nb.cells if c.cell_type == "code"]
  assert code and all(c.outputs for c in code), "run: python colab/build_notebooks.py --execute"
  assert all(c.execution_count for c in code)
  outs = [o for c in code for o in c.outputs]
  assert not [o for o in outs if o.output_type == "error"]
  assert any("image/png" in o.get("data", {}) for o in outs), "no plot saved"
  text = "".join(o.get("text", "") for o in outs)
  assert "Traceback" not in text and ROOT not in text


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_colab_badge_points_at_this_notebook(path):
  first = nbformat.read(path, as_version=4).cells[0]
  assert first.cell_type == "markdown"
  links = re.findall(r"\[!\[Open In Colab\]\([^)]+\)\]\(([^)]+)\)", first.source)
  owner_repo = build_notebooks.REPO_URL.removeprefix("https://github.com/")
  assert links == [
    f"https://colab.research.google.com/github/{owner_repo}/blob/main/colab/{ids(path)}"
  ]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_setup_cell_is_colab_ready(path):
  nb = nbformat.read(path, as_version=4)
  setup = next(c for c in nb.cells if c.cell_type == "code")
  src = setup.source
  everything = "\n".join(c.source for c in nb.cells)
  assert len(re.findall(r"^REPO_URL = ", everything, re.M)) == 1
  assert f'REPO_URL = "{build_notebooks.REPO_URL}"' in src
  assert 'os.path.abspath("..")' not in everything
  assert '"google.colab" in sys.modules' in src and "git" in src and "/content/slicjax" in src
  assert '"-c", constraints' in src  # the runtime's jax/jaxlib are pinned while installing
  assert "sys.path.insert" in src and "importlib.invalidate_caches()" in src


def test_readme_lists_every_notebook_with_its_badge():
  readme = open(os.path.join(ROOT, "README.md")).read()
  for path in NOTEBOOKS:
    assert build_notebooks.colab_url(ids(path)) in readme


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=ids)
def test_notebook_executes(path, tmp_path, monkeypatch):
  monkeypatch.setenv("SLICJAX_NOTEBOOK_TINY", "1")
  monkeypatch.setenv("SLICJAX_REPO", ROOT)
  monkeypatch.setenv("SLICJAX_DATA_DIR", str(tmp_path / "data"))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  nb = nbformat.read(path, as_version=4)
  client = nbclient.NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute()
  errors = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])
            if o.get("output_type") == "error"]
  assert not errors
