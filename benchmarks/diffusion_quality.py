"""Diffusion decoding: quality vs network evaluations per output token, per sampler, next to an
autoregressive transformer of the same size, on the embedded stdlib_docstrings task.

  python benchmarks/diffusion_quality.py --workdir=runs/bench_diffusion        # ~15 min, 2 CPUs
  python benchmarks/diffusion_quality.py --steps=20 --eval_examples=16          # seconds

Both models use the demo's default transformer size (``slicjax.pipelines.demo``, preset
``default``) and the same MLE training budget (``--steps``); the diffusion model is the same
transformer run bidirectionally under the masked-diffusion ELBO. Every sampler decodes greedily
(temperature 0) on a canvas of ``target_len`` slots, so "evaluations per output token" is the
number of batched denoiser calls divided by ``target_len`` (the autoregressive decoder needs one
KV-cached step per token, up to ``target_len``, and a beam of K does K per token). Seconds are
wall time over the whole eval set, compile excluded; one diffusion evaluation is a full
bidirectional pass over input + canvas, so it costs more than one cached AR step.
"""

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from slicjax import similarity
from slicjax.data import iterators
from slicjax.decoding import diffusion_sampling as ds
from slicjax.models import diffusion
from slicjax.models.seq_model import EOS_ID, PAD_ID
from slicjax.pipelines import demo, evaluate, mle

SAMPLERS = [
  # (name, sampler function, keyword arguments); T = target_len
  ("ancestral T=L", ds.ancestral_sample, dict(num_steps=1.0, temperature=0.0)),
  ("ancestral T=L/2", ds.ancestral_sample, dict(num_steps=0.5, temperature=0.0)),
  ("ancestral T=L/4", ds.ancestral_sample, dict(num_steps=0.25, temperature=0.0)),
  ("low-confidence, 1 block, L steps", ds.low_confidence_remasking_sample,
   dict(steps_per_block=None)),
  ("low-confidence, 1 block, L/2 steps", ds.low_confidence_remasking_sample,
   dict(steps_per_block=0.5)),
  ("low-confidence, blocks of 8, 8 steps", ds.low_confidence_remasking_sample,
   dict(block_length=8, steps_per_block=8)),
  ("threshold tau=0.9", ds.confidence_threshold_sample, dict(threshold=0.9)),
  ("threshold tau=0.7", ds.confidence_threshold_sample, dict(threshold=0.7)),
  ("threshold tau=0.5", ds.confidence_threshold_sample, dict(threshold=0.5)),
  ("threshold tau=0.9, blocks of 8", ds.confidence_threshold_sample,
   dict(threshold=0.9, block_length=8)),
  ("confident prefix, window 8, tau=0.9", ds.confident_prefix_sample,
   dict(block_length=8, threshold=0.9)),
  ("confident prefix, window 8, tau=0.7", ds.confident_prefix_sample,
   dict(block_length=8, threshold=0.7)),
]


def _resolve(kw, length):
  """Step counts given as fractions of L (floats) become integers."""
  steps = ("num_steps", "steps_per_block")
  return {k: max(1, round(v * length)) if k in steps and isinstance(v, float) else v
          for k, v in kw.items()}


def _config(family: str, steps: int):
  cfg = demo.build_config("default")
  cfg.model.family = family
  cfg.train.steps = steps
  return cfg


def _strip(row):
  ids = [int(t) for t in row]
  if EOS_ID in ids:
    ids = ids[: ids.index(EOS_ID)]
  return ids


def diffusion_rows(model, params, data, examples, refs, batch_size):
  length = data.target_len
  batches = [iterators.pad_batch(examples[i:i + batch_size], data.input_len, length)
             for i in range(0, len(examples), batch_size)]
  rows = []
  for name, fn, kw in SAMPLERS:
    kw = _resolve(kw, length)

    @jax.jit
    def run(p, inputs, rng, fn=fn, kw=kw):
      tokens, tmask = diffusion.prefix_layout(inputs, target_len=length,
                                              mask_id=model.lm.mask_id)
      out, stats = fn(model.lm.denoiser(p), tokens, tmask == 0, rng, mask_id=model.lm.mask_id,
                      **kw)
      start = jnp.sum(inputs != PAD_ID, axis=-1)[:, None] + 1
      gen = jnp.take_along_axis(out, start + jnp.arange(length)[None, :], axis=1)
      return gen, stats.num_evals

    first = jnp.asarray(batches[0]["inputs"])
    jax.block_until_ready(run(params, first, jax.random.PRNGKey(0)))  # compile
    texts, evals, t0 = [], [], time.perf_counter()
    for b in batches:
      gen, n_evals = run(params, jnp.asarray(b["inputs"]), jax.random.PRNGKey(0))
      gen = np.asarray(gen)
      texts += [data.detokenize(_strip(r)) for r in gen[: len(b["inputs"])]]
      evals.append(int(n_evals))
    seconds = time.perf_counter() - t0
    texts = texts[: len(refs)]
    rouge = similarity.rouge_scores(texts, refs)
    rows.append(dict(
      decoder="diffusion", sampler=name, rougeL=100 * float(np.mean(rouge["rougeL"])),
      rouge1=100 * float(np.mean(rouge["rouge1"])),
      evals_per_token=float(np.mean(evals)) / length, seconds=round(seconds, 2),
    ))
    print(rows[-1], flush=True)
  return rows


def ar_rows(model, params, data, examples, refs, batch_size):
  rows = []
  for beam in (1, 4):
    decode = functools.partial(evaluate.decode_split, model, params, data, beam_size=beam,
                               alpha=0.0, batch_size=batch_size, max_len=data.target_len)
    decode(examples[:batch_size])  # compile
    t0 = time.perf_counter()
    texts, toks = decode(examples)
    seconds = time.perf_counter() - t0
    rouge = similarity.rouge_scores(texts, refs)
    # One cached step per generated position (EOS included), K of them for a beam of K.
    mean_len = float(np.mean([len(t) + 1 for t in toks]))
    rows.append(dict(
      decoder="autoregressive", sampler="greedy" if beam == 1 else f"beam {beam}",
      rougeL=100 * float(np.mean(rouge["rougeL"])), rouge1=100 * float(np.mean(rouge["rouge1"])),
      evals_per_token=float(beam), mean_output_tokens=round(mean_len, 1),
      seconds=round(seconds, 2),
    ))
    print(rows[-1], flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="runs/bench_diffusion")
  ap.add_argument("--steps", type=int, default=900, help="MLE steps for each model")
  ap.add_argument("--eval_examples", type=int, default=128)
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}", flush=True)
  rows, info = [], {}
  for family in ("transformer", "diffusion"):
    t0 = time.perf_counter()
    state, model, data = mle.run(_config(family, a.steps), os.path.join(a.workdir, family))
    info[family] = dict(train_seconds=round(time.perf_counter() - t0, 1),
                        params=int(sum(x.size for x in jax.tree.leaves(state.params))))
    examples = data.eval_examples[: a.eval_examples]
    refs = [data.detokenize(e["targets"]) for e in examples]
    fn = ar_rows if family == "transformer" else diffusion_rows
    rows += fn(model, state.params, data, examples, refs, a.batch_size)
  print(f"\n{a.eval_examples} eval examples, target_len {data.target_len}, {a.steps} MLE steps "
        f"each; params {info}")
  print("decoder | sampler | ROUGE-L | ROUGE-1 | evals / output token | seconds")
  for r in rows:
    print(f"{r['decoder']} | {r['sampler']} | {r['rougeL']:.2f} | {r['rouge1']:.2f} | "
          f"{r['evals_per_token']:.3f} | {r['seconds']}")
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(rows=rows, models=info, steps=a.steps), f, indent=2)


if __name__ == "__main__":
  main()
