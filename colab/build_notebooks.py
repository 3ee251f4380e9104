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
  for i, cell in enumerate(out.cells):  # stable ids: rebuilding an unchanged notebook is a no-op
    cell["id"] = f"cell-{i:02d}"
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


DECODERS = [
  ("md", "# Three decoder families under the same losses\n\nA state-space LM (S4D: FFT "
         "convolution for training, recurrence for decoding) and a masked diffusion LM (ELBO "
         "scoring, parallel sampling) train through the same MLE job and are scored by the same "
         "`scoring` functions the calibration and preference losses consume."),
  ("code", SETUP),
  ("code", MESH),
  ("code", '''import tempfile, time
import jax, jax.numpy as jnp, numpy as np, ml_collections
from slicjax import optim, scoring
from slicjax.pipelines import mle, tasks
steps = 30 if TINY else 400

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
                             on_log=lambda s, x: pts.append((s, x["loss"])))
    curves[name], runs[name] = pts, (m, state.params, data)
    print(f"{name:12s} final training loss {pts[-1][1]:.3f}")'''),
  ("code", '''import matplotlib.pyplot as plt
plt.figure(figsize=(5, 3.5))
for name, pts in curves.items():
    plt.plot([p[0] for p in pts], [p[1] for p in pts], label=name)
plt.xlabel("step"); plt.ylabel("loss per target token (diffusion: -ELBO)"); plt.legend()
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
plt.xlabel("confidence threshold tau"); plt.ylabel("tokens / network evaluation")
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
  ("code", '''import jax, jax.numpy as jnp, numpy as np
import matplotlib.pyplot as plt
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
ax[0].semilogx(betas, acc, "o-"); ax[0].set_xlabel("beta"); ax[0].set_ylabel("acceptance rate")
ax[1].semilogx(betas, mean_r, "o-", label="accepted")
ax[1].axhline(float(jnp.mean(rewards)), color="gray", ls="--", label="all samples")
ax[1].set_xlabel("beta"); ax[1].set_ylabel("mean reward"); ax[1].legend()
plt.tight_layout(); plt.show()'''),
  ("md", "## The whole experiment\n\n`smoke` (the synthetic reverse task, about a minute on "
         "a CPU) under the tiny setting; `default` (stdlib docstrings) otherwise."),
  ("code", '''import tempfile
from slicjax.pipelines import gold_experiment
workdir = tempfile.mkdtemp(prefix="rso_")
preset = "smoke" if TINY else "default"
res = gold_experiment.synthetic_gold_experiment(
    {"mesh_shape": tuple(mesh.devices.shape)}, workdir=workdir, preset=preset)'''),
  ("code", '''from IPython.display import Markdown, display
display(Markdown(open(res["report"]).read()))
rows = [r for r in res["rows"] if r["policy"] != "SFT"]
x = np.arange(len(rows))
plt.figure(figsize=(max(6, 0.9 * len(rows)), 3.5))
plt.bar(x - 0.2, [100 * r["proxy_win_vs_sft"] for r in rows], 0.4, label="proxy reward")
plt.bar(x + 0.2, [100 * r["gold_win_vs_sft"] for r in rows], 0.4, label="gold reward")
plt.axhline(50, color="gray", ls="--")
plt.xticks(x, [r["policy"] for r in rows], rotation=30, ha="right")
plt.ylabel("win rate vs SFT (%)"); plt.legend()
plt.tight_layout(); plt.show()'''),
]


def main():
  notebooks = {"01_slic_quickstart.ipynb": QUICKSTART,
               "02_preference_rso.ipynb": PREFERENCE,
               "03_decoders_ssm_diffusion.ipynb": DECODERS}
  for name, cells in notebooks.items():
    nbformat.write(nb(cells), os.path.join(HERE, name))
    print("wrote", name)


if __name__ == "__main__":
  main()
