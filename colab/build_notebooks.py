"""Writes the notebooks in colab/ from the cell sources below (edit here, then run this file).

  python colab/build_notebooks.py
"""

import os

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))

SETUP = '''# Install slicjax from the repository (Colab: clone it first and set SLICJAX_REPO).
import importlib.util, os, subprocess, sys
REPO = os.environ.get("SLICJAX_REPO", os.path.abspath(".."))
if importlib.util.find_spec("slicjax") is None:
    subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "-e", REPO])
# Tests run every notebook with SLICJAX_NOTEBOOK_TINY=1 (seconds on a CPU).
TINY = os.environ.get("SLICJAX_NOTEBOOK_TINY") == "1"'''

MESH = '''import jax
from slicjax import sharding
platform = jax.devices()[0].platform          # "tpu", "gpu" or "cpu"
n = jax.device_count()
# TPU/GPU: shard parameters over fsdp when there are several chips; CPU: data parallel only.
shape = (1, n, 1) if platform in ("tpu", "gpu") and n > 1 else (n, 1, 1)
mesh = sharding.make_mesh(shape)
print(platform, n, "devices, mesh", dict(mesh.shape))'''


def nb(cells):
  out = new_notebook()
  out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  out.cells = [new_markdown_cell(c[1]) if c[0] == "md" else new_code_cell(c[1]) for c in cells]
  return out


QUICKSTART = [
  ("md", "# SLiC quickstart\n\nFine-tune a small model on the embedded `stdlib_docstrings` task "
         "(code -> docstring summary), decode candidates, calibrate with the rank loss + KL, and "
         "compare quality vs beam size before and after calibration."),
  ("code", SETUP),
  ("code", MESH),
  ("code", '''import tempfile
from slicjax.pipelines import demo
workdir = tempfile.mkdtemp(prefix="slic_quickstart_")
preset = "smoke" if TINY else "default"
report = demo.run(workdir, preset, {"mesh_shape": tuple(mesh.devices.shape)})
print(report["path"])'''),
  ("code", '''from IPython.display import Image, Markdown, display
display(Markdown(open(report["path"]).read().split("## Examples")[0]))
display(Image(os.path.join(workdir, "quality_vs_beam.png")))'''),
  ("md", "## The pieces by hand\n\nScore the candidates of one example with the fine-tuned "
         "model and look at how log-likelihood and similarity relate."),
  ("code", '''import json, glob
import matplotlib.pyplot as plt
rows = [json.loads(l) for f in sorted(glob.glob(os.path.join(workdir, "candidates", "*.jsonl")))
        for l in open(f)]
logp = [x for r in rows for x in r["logp"]]
sim = [x for r in rows for x in r["sim"]]
plt.figure(figsize=(5, 3.5))
plt.scatter(logp, sim, s=8, alpha=0.5)
plt.xlabel("candidate log P(y|x) (fine-tuned)")
plt.ylabel("latent similarity to the reference")
plt.title(f"{len(rows)} examples x {len(rows[0]['logp'])} candidates")
plt.show()'''),
  ("code", '''import jax.numpy as jnp
from slicjax.losses import calibration
r = rows[0]
lp, s = jnp.array([r["logp"]]), jnp.array([r["sim"]])
m = jnp.ones_like(lp)
for name in ("rank", "margin", "list_rank", "expected_reward"):
    fn = getattr(calibration, name + "_loss")
    kw = {} if name == "expected_reward" else {"beta": 1.0}
    if name in ("rank", "margin"):
        kw["pairs"] = "best_worst"
    out = fn(lp, s, m, **kw)
    out = out[0] if isinstance(out, tuple) else out
    print(f"{name:16s} {float(out[0]):.4f}")'''),
]


def main():
  for name, cells in {"01_slic_quickstart.ipynb": QUICKSTART}.items():
    nbformat.write(nb(cells), os.path.join(HERE, name))
    print("wrote", name)


if __name__ == "__main__":
  main()
