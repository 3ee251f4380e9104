"""Writes the notebooks in colab/ from the cell sources below (edit here, then run this file).

  python colab/build_notebooks.py            # rewrite the cell sources; unchanged cells keep
                                             # their saved outputs, changed code cells lose them
  python colab/build_notebooks.py --execute  # also run every notebook top to bottom (the size
                                             # they ship with) and save the outputs
  python colab/build_notebooks.py --execute 02_preference_rso.ipynb   # just one

The saved outputs come from a local CPU run; paths under the repository and the temp directory
are rewritten and long logs shortened so that the diff of a re-run stays readable.
"""

import argparse
import os
import re
import sys
import tempfile
import time

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The repository the notebooks clone on Colab and the "Open in Colab" badges point at. A fork
# changes this one line and rebuilds (the badges in README.md are written by hand).
REPO_URL = "https://github.com/slicjax/slicjax"
COLAB_BADGE = "https://colab.research.google.com/assets/colab-badge.svg"


def colab_url(filename: str, repo_url: str = REPO_URL, branch: str = "main") -> str:
  """Colab's address for ``colab/<filename>`` of the GitHub repository ``repo_url``."""
  owner_repo = re.sub(r"^https://github\.com/|\.git$|/$", "", repo_url)
  return f"https://colab.research.google.com/github/{owner_repo}/blob/{branch}/colab/{filename}"


def badge(filename: str) -> str:
  return f"[![Open In Colab]({COLAB_BADGE})]({colab_url(filename)})"


SETUP = '''# @title Setup: makes `import slicjax` work here, on Colab or in a local checkout
import importlib
import importlib.metadata as md
import importlib.util
import os
import site
import subprocess
import sys

# The repository cloned on Colab; running a fork? put its URL here.
REPO_URL = "%(repo_url)s"  # @param {type:"string"}
# Run size: "colab" (a few minutes on Colab's free CPU runtime), "full" (the library's larger
# settings: tens of minutes on 2 CPU cores, a few on a GPU/TPU) or "tiny" (seconds; the tests
# set SLICJAX_NOTEBOOK_TINY=1). $SLICJAX_NOTEBOOK_SIZE overrides the value here.
SIZE = "colab"  # @param ["colab", "full", "tiny"]
SIZE = os.environ.get("SLICJAX_NOTEBOOK_SIZE", SIZE)
SIZE = "tiny" if os.environ.get("SLICJAX_NOTEBOOK_TINY") == "1" else SIZE
assert SIZE in ("tiny", "colab", "full"), SIZE
TINY = SIZE == "tiny"
ON_COLAB = "google.colab" in sys.modules
DEPS = ("jax", "flax", "optax", "orbax", "ml_collections", "grain", "tensorflow_datasets",
        "sentencepiece", "rouge_score", "matplotlib")


def find_checkout():
    """$SLICJAX_REPO, else the first directory at or above the working directory (Jupyter starts
    the kernel in the notebook's folder, colab/) whose setup.py is slicjax's; None if none."""
    if os.environ.get("SLICJAX_REPO"):
        return os.path.abspath(os.environ["SLICJAX_REPO"])
    d = os.getcwd()
    while True:
        setup_py = os.path.join(d, "setup.py")
        if os.path.isfile(setup_py) and 'name="slicjax"' in open(setup_py).read():
            return d
        if os.path.dirname(d) == d:
            return None
        d = os.path.dirname(d)


def importable():
    importlib.invalidate_caches()
    return all(importlib.util.find_spec(m) is not None for m in ("slicjax",) + DEPS)


def runtime_jax_pins():
    """jax, jaxlib and their accelerator plugins (libtpu, jax-cuda12-plugin/-pjrt, ...) as
    installed now. Colab's TPU and GPU runtimes ship a jax built for the chip; a plain
    `pip install slicjax` could replace it with the CPU jax from PyPI (silently: everything
    still runs, on the CPU). Passing these as pip constraints (-c) keeps them as they are
    while pip still resolves and installs every other dependency (flax, optax, ...) against
    them; --no-deps would skip those. If the runtime's jax is too old for slicjax, pip stops
    with a conflict instead of downgrading the accelerator, and this cell says what to do."""
    pins = {}
    for dist in md.distributions():
        name = (dist.metadata["Name"] or "").lower().replace("_", "-")
        if name in ("jax", "jaxlib") or name.startswith(("jax-cuda", "jax-rocm", "libtpu")):
            pins[name] = f"{name}=={dist.version}"
    return sorted(pins.values())


def pip_install(path):
    import tempfile

    pins = runtime_jax_pins()
    cmd = [sys.executable, "-m", "pip", "install", "-q", "-e", path]
    if pins:
        constraints = os.path.join(tempfile.mkdtemp(), "runtime-jax.txt")
        with open(constraints, "w") as f:
            f.write("\\n".join(pins) + "\\n")
        cmd += ["-c", constraints]
        print("keeping the runtime's", ", ".join(pins))
    before = {(d.metadata["Name"], d.version) for d in md.distributions()}
    if subprocess.run(cmd).returncode != 0:
        raise RuntimeError(
            f"pip could not install slicjax next to this runtime's {', '.join(pins)} (see its "
            "message above). If that jax is older than setup.py asks for, upgrade it with the "
            "build for this runtime first (GPU: pip install -U 'jax[cuda12]', TPU: pip install "
            "-U 'jax[tpu]'), restart the session and run this cell again.")
    loaded = {d for m, ds in md.packages_distributions().items() if m in sys.modules for d in ds}
    replaced = sorted({d.metadata["Name"] for d in md.distributions()  # a new version of
                       if (d.metadata["Name"], d.version) not in before  # a package in use
                       and d.metadata["Name"] in {n for n, _ in before} & loaded})
    if replaced:
        print("pip upgraded packages this kernel had already imported:", ", ".join(replaced),
              "- restart the session (Runtime > Restart session) and run this cell again.")


checkout = find_checkout()
if checkout and checkout not in sys.path:
    sys.path.insert(0, checkout)  # the code next to this notebook wins over an installed copy
if not importable():
    if checkout is None:
        checkout = os.environ.get("SLICJAX_CLONE_DIR") or (
            "/content/slicjax" if ON_COLAB else os.path.expanduser("~/slicjax"))
        if not os.path.isdir(os.path.join(checkout, ".git")):
            subprocess.check_call(["git", "clone", "-q", "--depth", "1", REPO_URL, checkout])
    pip_install(checkout)
    # An editable install is normally picked up at interpreter start (a .pth file); put the
    # checkout and any site directory pip just created on the path so no restart is needed.
    if checkout not in sys.path:
        sys.path.insert(0, checkout)
    for d in site.getsitepackages() + [site.getusersitepackages()]:
        if os.path.isdir(d) and d not in sys.path:
            site.addsitedir(d)
    assert importable(), "slicjax or one of its dependencies is still not importable"
slicjax = importlib.import_module("slicjax")

where = os.path.dirname(os.path.dirname(os.path.abspath(slicjax.__file__)))
print(f"slicjax from {where}; run size {SIZE!r}" + (" (on Colab)" if ON_COLAB else ""))''' % {
  "repo_url": REPO_URL}

MESH = '''import jax

from slicjax import sharding

platform = jax.devices()[0].platform          # "tpu", "gpu" or "cpu"
n = jax.device_count()
# TPU/GPU: shard parameters over fsdp when there are several chips; CPU: data parallel only.
shape = (1, n, 1) if platform in ("tpu", "gpu") and n > 1 else (n, 1, 1)
mesh = sharding.make_mesh(shape)
print(platform, n, "devices, mesh", dict(mesh.shape))'''


def nb(filename, cells):
  out = new_notebook()
  out.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
  out.metadata["colab"] = {"name": filename, "provenance": []}
  title, rest = cells[0][1].split("\n\n", 1)  # the badge goes under the title
  cells = [("md", f"{title}\n\n{badge(filename)}\n\n{rest}")] + list(cells[1:])
  out.cells = [new_markdown_cell(c[1]) if c[0] == "md" else new_code_cell(c[1]) for c in cells]
  for i, cell in enumerate(out.cells):  # stable ids: rebuilding an unchanged notebook is a no-op
    cell["id"] = f"cell-{i:02d}"
    if cell.source.startswith("# @title"):  # Colab shows the title and the @param fields
      cell.metadata["cellView"] = "form"
  return out


QUICKSTART = [
  ("md", "# SLiC quickstart\n\nFine-tune a small model on the embedded `stdlib_docstrings` task "
         "(code -> docstring summary), decode candidates, calibrate with the rank loss + KL, and "
         "compare quality vs beam size before and after calibration."),
  ("code", SETUP),
  ("code", MESH),
  ("md", "`SIZE = \"colab\"` runs the demo's `default` model with fewer steps and examples "
         "(about 5 minutes on 2 CPU cores); `\"full\"` runs the `default` preset as is (what "
         "`make demo` runs: about 13 minutes on 2 CPU cores, a few on a GPU). The small runs show the "
         "mechanics: on this task even the `default` run's calibrated model is within noise of "
         "the fine-tuned one (`docs/results/demo_default_all_losses.md`)."),
  ("code", '''import tempfile

from slicjax.pipelines import demo

workdir = tempfile.mkdtemp(prefix="slic_quickstart_")
preset = "smoke" if SIZE == "tiny" else "default"
overrides = {"mesh_shape": tuple(mesh.devices.shape)}
if SIZE == "colab":
    overrides.update({"train.steps": 300, "candidates.num_examples": 192, "calibrate.steps": 40,
                      "evaluate.beam_sizes": (1, 2, 4, 8), "evaluate.num_examples": 64})
report = demo.run(workdir, preset, overrides)
print(report["path"])'''),
  ("code", '''from IPython.display import Image, Markdown, display

display(Markdown(open(report["path"]).read().split("## Examples")[0]))
display(Image(os.path.join(workdir, "quality_vs_beam.png")))'''),
  ("md", "## The pieces by hand\n\nScore the candidates of one example with the fine-tuned "
         "model and look at how log-likelihood and similarity relate."),
  ("code", '''import glob
import json

import matplotlib.pyplot as plt

# The demo's report plots switch matplotlib to its headless Agg backend; show figures inline again.
%matplotlib inline
rows = [json.loads(line)
        for f in sorted(glob.glob(os.path.join(workdir, "candidates", "*.jsonl")))
        for line in open(f)]
logp = [x for r in rows for x in r["logp"]]
sim = [x for r in rows for x in r["sim"]]
plt.figure(figsize=(5, 3.5))
plt.scatter(logp, sim, s=8, alpha=0.5)
plt.xlabel("candidate log P(y|x) (fine-tuned)")
similarity = json.load(open(os.path.join(workdir, "demo_config.json")))["candidates"]["similarity"]
plt.ylabel(f"{similarity} similarity to the reference")
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


DECODERS = [
  ("md", "# Three decoder families under the same losses\n\nA state-space LM (S4D: FFT "
         "convolution for training, recurrence for decoding) and a masked diffusion LM (ELBO "
         "scoring, parallel sampling) train through the same MLE job and are scored by the same "
         "`scoring` functions the calibration and preference losses consume."),
  ("code", SETUP),
  ("code", MESH),
  ("md", "Each model trains for 400 steps under `SIZE = \"colab\"` (a few minutes on 2 CPU "
         "cores) and 1500 under `\"full\"`."),
  ("code", '''import tempfile

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from slicjax import optim, scoring
from slicjax.pipelines import mle, tasks

steps = {"tiny": 30, "colab": 400, "full": 1500}[SIZE]


def config(model):
    c = ml_collections.ConfigDict()
    c.model = model
    c.data = {**tasks.DATA_KEYS, "name": "reverse", "input_len": 8, "target_len": 9,
              "synthetic_vocab": 32, "num_train": 2048, "num_eval": 64}
    c.optimizer = {**optim.DEFAULTS, "learning_rate": 3e-3, "warmup_steps": 20}
    c.train = {**mle.TRAIN_KEYS, "steps": steps, "batch_size": 32, "log_every": 10,
               "checkpoint_every": 10**9, "progress": False}
    c.mesh_shape = tuple(mesh.devices.shape)
    return ml_collections.ConfigDict(c.to_dict())


curves, runs = {}, {}
for name, model in {
    "transformer": dict(family="transformer", preset="tiny", vocab_size=32, max_len=32),
    "ssm (s4d)": dict(family="ssm", preset="tiny", vocab_size=32, variant="s4d"),
    "diffusion": dict(family="diffusion", preset="tiny", vocab_size=32, max_len=32),
}.items():
    pts = []
    state, m, data = mle.run(config(model), tempfile.mkdtemp(),
                             on_log=lambda s, x, pts=pts: pts.append((s, x["loss"])))
    curves[name], runs[name] = pts, (m, state.params, data)
    print(f"{name:12s} final training loss {pts[-1][1]:.3f}")'''),
  ("code", '''import matplotlib.pyplot as plt

plt.figure(figsize=(5, 3.5))
for name, pts in curves.items():
    plt.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
plt.xlabel("step")
plt.ylabel("loss per target token (diffusion: -ELBO)")
plt.legend()
plt.show()'''),
  ("md", "## SSM: recurrence == convolution, and flat per-token cost\n\nThe cached "
         "step-by-step decode must give the same logits as the training-mode (FFT) pass."),
  ("code", '''from slicjax.models.ssm import init_cache

m, params, data = runs["ssm (s4d)"]
tokens = jnp.asarray(np.random.default_rng(0).integers(4, 32, (2, 12)), jnp.int32)
full = m.module.apply({"params": params}, tokens)
cache = init_cache(m.module.config, 2)
steps_out = []
for t in range(tokens.shape[1]):
    out, mut = m.module.apply({"params": params, "cache": cache}, tokens[:, t:t + 1],
                              decode=True, mutable=["cache"])
    cache = mut["cache"]
    steps_out.append(out[:, 0])
print("max |recurrent - convolution| =", float(jnp.max(jnp.abs(jnp.stack(steps_out, 1) - full))))'''),
  ("md", "## Diffusion: parallel sampling and tokens per network evaluation"),
  ("code", '''from slicjax.decoding import diffusion_sampling
from slicjax.models import diffusion

m, params, data = runs["diffusion"]
batch = data.eval_batches(1, 16)[0]
rows = []
for tau in (1.0, 0.9, 0.5):
    tokens, tmask = diffusion.prefix_layout(jnp.asarray(batch["inputs"]), target_len=9,
                                            mask_id=m.lm.mask_id)
    out, stats = diffusion_sampling.confidence_threshold_sample(
        m.lm.denoiser(params), tokens, tmask == 0, jax.random.PRNGKey(0),
        mask_id=m.lm.mask_id, threshold=tau)
    rows.append((tau, int(stats.num_evals), float(jnp.mean(stats.tokens_per_eval_B))))
    print(f"tau={tau}: {int(stats.num_evals)} network evaluations, "
          f"{float(jnp.mean(stats.tokens_per_eval_B)):.2f} tokens committed per evaluation")
elbo = scoring.score_targets(m, params, {"inputs": jnp.asarray(batch["inputs"]),
                                         "targets": jnp.asarray(batch["targets"])})["logp"]
print("mean ELBO log-likelihood of the references:", float(jnp.mean(elbo)))'''),
  ("code", '''plt.figure(figsize=(4.5, 3))
plt.bar([str(r[0]) for r in rows], [r[2] for r in rows])
plt.xlabel("confidence threshold tau")
plt.ylabel("tokens / network evaluation")
plt.show()'''),
]


PREFERENCE = [
  ("md", "# Preference optimization and RSO\n\nThe synthetic-gold protocol: a gold reward "
         "(ROUGE to the reference) plays the human and labels pairs sampled from a policy other "
         "than the SFT model; a proxy reward model is trained on those pairs only; policies are "
         "trained with DPO (sigmoid-norm) and hinge losses on *direct*, *sft-sample-rank* and "
         "*rso-sample-rank* pairs and judged by proxy and gold win rates against the SFT policy."),
  ("code", SETUP),
  ("code", MESH),
  ("md", "## RSO's rejection sampler on its own\n\n`rso_sample` thins N samples of the SFT "
         "policy to M draws from π ∝ π_sft · exp(r/β). Small β keeps the top rewards, large β "
         "accepts almost uniformly; the first-round acceptance rate is E[exp((r − r_max)/β)]."),
  ("code", '''import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np

from slicjax.preference import rejection_sampling as rs

rewards = jax.random.normal(jax.random.PRNGKey(0), (256, 64))
mask = jnp.ones_like(rewards, bool)
betas = [0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 8.0]
acc, mean_r = [], []
for beta in betas:
    idx, count = rs.rso_sample(jax.random.PRNGKey(1), rewards, mask, num_accept=8, beta=beta)
    chosen = jnp.take_along_axis(rewards, jnp.maximum(idx, 0), axis=1)
    acc.append(float(jnp.mean(rs.expected_acceptance_rate(rewards, mask, beta=beta))))
    mean_r.append(float(jnp.mean(chosen)))
    print(f"beta={beta:<5} acceptance {acc[-1]:.3f}  mean accepted reward {mean_r[-1]:+.3f}")
fig, ax = plt.subplots(1, 2, figsize=(9, 3.2))
ax[0].semilogx(betas, acc, "o-")
ax[0].set_xlabel("beta")
ax[0].set_ylabel("acceptance rate")
ax[1].semilogx(betas, mean_r, "o-", label="accepted")
ax[1].axhline(float(jnp.mean(rewards)), color="gray", ls="--", label="all samples")
ax[1].set_xlabel("beta")
ax[1].set_ylabel("mean reward")
ax[1].legend()
plt.tight_layout()
plt.show()'''),
  ("md", "## The whole experiment\n\n`SIZE = \"colab\"` runs the `smoke` preset (the "
         "synthetic reverse task, a one-layer model) with more data, training and evaluation (a "
         "minute or two on 2 CPU cores); `\"full\"` runs the `default` preset (stdlib docstrings, a "
         "small transformer: about an hour on 2 CPU cores, minutes on a GPU); `\"tiny\"` the "
         "`smoke` preset as is. The `smoke` proxy reward is weak (held-out pair accuracy near "
         "chance), so its policies need not beat SFT on the gold reward. The `default` preset's "
         "reward model reaches 0.71 held-out accuracy over three seeds, and there DPO on every "
         "pair source beats SFT on the gold reward beyond noise "
         "(`docs/results/preference_study.md`, with intervals)."),
  ("code", '''import tempfile

from slicjax.pipelines import gold_experiment

workdir = tempfile.mkdtemp(prefix="rso_")
preset = "default" if SIZE == "full" else "smoke"
overrides = {"mesh_shape": tuple(mesh.devices.shape)}
if SIZE == "colab":
    overrides.update({"data.num_train": 2048, "train.steps": 600, "human.policy_steps": 60,
                      "human.num_prompts": 1024, "reward.steps": 600, "rso.num_examples": 512,
                      "preference.steps": 300, "experiment.eval_examples": 128})
res = gold_experiment.synthetic_gold_experiment(overrides, workdir=workdir, preset=preset)'''),
  ("code", '''from IPython.display import Markdown, display

display(Markdown(open(res["report"]).read()))
rows = [r for r in res["rows"] if r["policy"] != "SFT"]
x = np.arange(len(rows))
plt.figure(figsize=(max(6, 0.9 * len(rows)), 3.5))
plt.bar(x - 0.2, [100 * r["proxy_win_vs_sft"] for r in rows], 0.4, label="proxy reward")
plt.bar(x + 0.2, [100 * r["gold_win_vs_sft"] for r in rows], 0.4, label="gold reward")
plt.axhline(50, color="gray", ls="--")
plt.xticks(x, [r["policy"] for r in rows], rotation=30, ha="right")
plt.ylabel("win rate vs SFT (%)")
plt.legend()
plt.tight_layout()
plt.show()'''),
]

NOTEBOOKS = {"01_slic_quickstart.ipynb": QUICKSTART,
             "02_preference_rso.ipynb": PREFERENCE,
             "03_decoders_ssm_diffusion.ipynb": DECODERS}

MAX_STREAM_LINES = 60  # a longer log keeps its first and last 30 lines in the saved notebook


def build(filename):
  """The notebook ``filename`` as this file defines it, without outputs."""
  return nb(filename, NOTEBOOKS[filename])


def _clean_text(text, clip=False):
  tmp = re.escape(tempfile.gettempdir().rstrip("/"))
  text = re.sub(r"\x1b\[[0-9;]*[A-Za-z]", "", text)  # terminal colors and cursor moves
  text = text.replace(ROOT, "<repo>").replace(os.path.expanduser("~") + "/", "~/")
  text = re.sub(r"/\S*/(site|dist)-packages/", r".../\1-packages/", text)  # the local venv
  # mkdtemp's random suffix (8 characters) -> XXXXXXXX, so a re-run does not change the text.
  text = re.sub(tmp + r"/([\w.-]*?)[a-z0-9_]{8}(?=[/\s'\")]|$)", r"/tmp/\1XXXXXXXX", text,
                flags=re.M)
  lines = [line.rsplit("\r", 1)[-1] for line in text.split("\n")]  # progress bars: last state
  if clip and len(lines) > MAX_STREAM_LINES:
    half = MAX_STREAM_LINES // 2
    lines = lines[:half] + [f"[... {len(lines) - 2 * half} lines left out of the saved "
                            "notebook ...]"] + lines[-half:]
  return "\n".join(lines)


def clean_outputs(notebook):
  """Merges consecutive stream outputs and strips run-specific noise (see _clean_text)."""
  for cell in notebook.cells:
    if cell.cell_type != "code":
      continue
    cell.metadata.pop("execution", None)
    outs = []
    for out in cell.outputs:
      if (out.output_type == "stream" and outs and outs[-1].output_type == "stream"
          and outs[-1].name == out.name):
        outs[-1].text += out.text
      else:
        outs.append(out)
    for out in outs:
      if out.output_type == "stream":
        out.text = _clean_text(out.text, clip=True)
      elif out.output_type in ("display_data", "execute_result") and "text/plain" in out.data:
        out.data["text/plain"] = _clean_text(out.data["text/plain"])
      elif out.output_type == "display_data" and "text/markdown" in out.data:
        out.data["text/markdown"] = _clean_text(out.data["text/markdown"])
    cell.outputs = outs
  return notebook


def execute(notebook, timeout=3600):
  """Runs ``notebook`` in place in a fresh python3 kernel started in colab/ (as Jupyter does),
  at the size it ships with; raises on the first failing cell."""
  import nbclient

  env_before = {k: os.environ.get(k) for k in ("SLICJAX_NOTEBOOK_TINY", "SLICJAX_NOTEBOOK_SIZE",
                                               "SLICJAX_REPO", "MPLBACKEND")}
  for k in env_before:  # the shipped settings, and matplotlib's inline backend (PNG outputs)
    os.environ.pop(k, None)
  try:
    nbclient.NotebookClient(notebook, timeout=timeout, kernel_name="python3",
                            record_timing=False, resources={"metadata": {"path": HERE}}).execute()
  finally:
    for k, v in env_before.items():
      if v is not None:
        os.environ[k] = v
  return clean_outputs(notebook)


def keep_outputs(new, old):
  """Carries the saved outputs of ``old`` over to the cells of ``new`` whose source is unchanged."""
  saved = {c.get("id"): c for c in old.cells}
  for cell in new.cells:
    prev = saved.get(cell.id)
    if cell.cell_type == "code" and prev is not None and prev.source == cell.source:
      cell.outputs, cell.execution_count = prev.outputs, prev.execution_count
  if "language_info" in old.metadata:
    new.metadata["language_info"] = old.metadata["language_info"]
  return new


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--execute", action="store_true",
                      help="run the notebooks and save their outputs")
  parser.add_argument("names", nargs="*", help="notebook files to write (default: all)")
  args = parser.parse_args(argv)
  for name in args.names or NOTEBOOKS:
    name = os.path.basename(name)
    path = os.path.join(HERE, name)
    notebook = build(name)
    if args.execute:
      t0 = time.time()
      execute(notebook)
      print(f"executed {name} in {time.time() - t0:.0f} s")
    elif os.path.exists(path):
      keep_outputs(notebook, nbformat.read(path, as_version=4))
    nbformat.write(notebook, path)
    missing = [c.id for c in notebook.cells if c.cell_type == "code" and not c.outputs]
    print("wrote", name, f"(code cells without outputs: {missing}; run with --execute)"
          if missing else "")


if __name__ == "__main__":
  sys.exit(main())
