"""Diffusion decoding: quality vs tokens per network evaluation vs seconds, for a block-diffusion
model trained from scratch and one adapted from the autoregressive model, next to that AR
model's greedy and beam decoding, on the embedded stdlib_docstrings task.

  python benchmarks/diffusion_quality.py --workdir=runs/bench_diffusion   # ~17 min, 2 CPUs
  python benchmarks/diffusion_quality.py --steps=20 --eval_examples=16 --workdir=/tmp/smoke  # ~3 min

Models (the demo's default transformer size, ``slicjax.pipelines.demo`` preset ``default``):

* ``ar``: the autoregressive prefix LM, ``--steps`` MLE steps;
* ``diffusion (scratch)``: a block-causal masked-diffusion LM (blocks of ``--block_length``
  canvas slots; the prompt bidirectional), ``--steps + --adapt_steps`` steps of −ELBO from a
  random init: the same number of optimizer steps as the AR-initialized model has seen in
  total (AR training + adaptation), i.e. equal training compute;
* ``diffusion (AR-init)``: the ``ar`` parameters plus a [MASK] embedding row, with the AR shift
  (slot j read at position j - 1) and a causal prompt, trained ``--adapt_steps`` more steps of
  −ELBO with the attention mask annealed from causal to block-causal over ``--anneal_steps``
  (``slicjax.pipelines.diffusion_adapt``).

Block length: LLaDA's default is 32, but the canvas here has 24 slots, so blocks of 8 (3 blocks;
the cached sampler needs a divisor of the canvas).

Every diffusion sampler is the KV-cached block sampler (``cached_block_sample``; greedy,
EOS rule on): ``top-1`` commits one slot per evaluation (the reference), ``threshold`` τ and
``factor`` f are Fast-dLLM's rules. Reported per sampler: ROUGE-L with a 95% bootstrap
interval over examples (1000 resamples), the paired-bootstrap difference to the same model's
top-1 run, real tokens per evaluation (output tokens incl. EOS, summed over examples, divided by
the evaluations those rows needed), canvas slots per evaluation (24 per row, padding included),
and wall seconds over the eval set (compile excluded; batched, rows in lockstep per block). The
prompt prefill pass is counted in neither decoder's evaluations. AR: one cached step per
generated token (K per token for a beam of K). Per-example outputs go to
``<workdir>/predictions_<tag>.jsonl``, the results to ``<workdir>/results_<tag>.json``, with
``<tag> = b<block_length>_a<adapt_steps>_n<anneal_steps>_lr<adapt_lr>``; checkpoints are
reused when the script is rerun (subdirectories name the block length and adaptation
settings).
"""

import argparse
import functools
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from slicjax import similarity, training
from slicjax.data import iterators
from slicjax.evaluation import metrics
from slicjax.models.seq_model import EOS_ID
from slicjax.pipelines import demo, diffusion_adapt, evaluate, mle

SAMPLERS = [
  # (name, rule, keyword arguments); top-1 first: the paired reference
  ("top-1 per eval", "topk", dict(steps_per_block=None)),
  ("threshold tau=0.9", "threshold", dict(threshold=0.9)),
  ("threshold tau=0.7", "threshold", dict(threshold=0.7)),
  ("threshold tau=0.5", "threshold", dict(threshold=0.5)),
  ("factor f=1", "factor", dict(factor=1.0)),
  ("factor f=2", "factor", dict(factor=2.0)),
  ("factor f=4", "factor", dict(factor=4.0)),
  ("top-1 per eval, EOS rule off", "topk", dict(steps_per_block=None, eos_fill=False)),
]


def _config(family: str, steps: int, **model):
  cfg = demo.build_config("default")
  cfg.model.family = family
  for k, v in model.items():
    cfg.model[k] = v
  cfg.train.steps = steps
  return cfg


def _strip(row):
  ids = [int(t) for t in row]
  if EOS_ID in ids:
    ids = ids[: ids.index(EOS_ID)]
  return ids


def _batches(examples, data, batch_size):
  return [iterators.pad_batch(examples[i:i + batch_size], data.input_len, data.target_len)
          for i in range(0, len(examples), batch_size)]


def heldout_loss(model, params, data, examples, batch_size):
  """Mean per-target-token NLL (AR) or one-sample −ELBO (diffusion, fixed keys) on ``examples``."""
  loss_fn = jax.jit(training.mle_loss_fn(model))
  total, tokens = 0.0, 0.0
  for i, b in enumerate(_batches(examples, data, batch_size)):
    b = {k: jnp.asarray(v) for k, v in b.items() if k in ("inputs", "targets")}
    loss, m = loss_fn(params, b, jax.random.PRNGKey(i), None)
    total += float(loss) * float(m["tokens"])
    tokens += float(m["tokens"])
  return total / max(tokens, 1.0)


def _row(model_name, sampler, per_example, resamples, **extra):
  mean, lo, hi = metrics.bootstrap_ci(100 * np.asarray(per_example), num_resamples=resamples)
  return dict(model=model_name, sampler=sampler, rougeL=mean, rougeL_lo=lo, rougeL_hi=hi,
              **extra)


def diffusion_rows(name, model, params, data, examples, refs, a, out):
  length = data.target_len
  batches = _batches(examples, data, a.batch_size)
  rows, per = [], {}
  for sampler, rule, kw in SAMPLERS:

    @jax.jit
    def run(p, inputs, rng, rule=rule, kw=kw):
      gen, stats = model.sample(p, inputs, rng, max_len=length, sampler=rule, **kw)
      return gen, stats.real_tokens_B, stats.row_evals_B, stats.num_evals

    first = jnp.asarray(batches[0]["inputs"])
    jax.block_until_ready(run(params, first, jax.random.PRNGKey(0)))  # compile
    texts, real, evals, batch_evals, t0 = [], [], [], [], time.perf_counter()
    for b in batches:
      gen, r, e, n = jax.block_until_ready(run(params, jnp.asarray(b["inputs"]),
                                               jax.random.PRNGKey(0)))
      n_real = len(b["inputs"])
      texts += [data.detokenize(_strip(row)) for row in np.asarray(gen)[:n_real]]
      real += list(np.asarray(r)[:n_real])
      evals += list(np.asarray(e)[:n_real])
      batch_evals.append(int(n))
    seconds = time.perf_counter() - t0
    texts, real, evals = texts[: len(refs)], real[: len(refs)], evals[: len(refs)]
    scores = similarity.rouge_scores(texts, refs)["rougeL"]
    per[sampler] = scores
    row = _row(name, sampler, scores, a.resamples,
               real_tokens_per_eval=float(np.sum(real) / max(np.sum(evals), 1)),
               slots_per_eval=float(length * len(evals) / max(np.sum(evals), 1)),
               evals_per_example=float(np.mean(evals)), mean_output_tokens=float(np.mean(real)),
               batch_evals=int(np.sum(batch_evals)), seconds=round(seconds, 2))
    if sampler != SAMPLERS[0][0]:
      d, lo, hi = metrics.paired_bootstrap_ci(100 * np.asarray(scores),
                                              100 * np.asarray(per[SAMPLERS[0][0]]),
                                              num_resamples=a.resamples)
      row.update(diff_vs_top1=d, diff_vs_top1_lo=lo, diff_vs_top1_hi=hi)
    rows.append(row)
    for i, (t, ref) in enumerate(zip(texts, refs)):
      out.write(json.dumps(dict(model=name, sampler=sampler, example=i, prediction=t,
                                reference=ref, rougeL=float(scores[i]), real_tokens=int(real[i]),
                                evals=int(evals[i]))) + "\n")
    print(row, flush=True)
  return rows, per


def ar_rows(model, params, data, examples, refs, a, out):
  rows, per = [], {}
  for beam in (1, 4):
    decode = functools.partial(evaluate.decode_split, model, params, data, beam_size=beam,
                               alpha=0.0, batch_size=a.batch_size, max_len=data.target_len)
    decode(examples[: a.batch_size])  # compile
    t0 = time.perf_counter()
    texts, toks = decode(examples)
    seconds = time.perf_counter() - t0
    scores = similarity.rouge_scores(texts, refs)["rougeL"]
    name = "greedy" if beam == 1 else f"beam {beam}"
    per[name] = scores
    # One cached step per generated position (EOS included), K of them for a beam of K.
    lens = [min(len(t) + 1, data.target_len) for t in toks]
    row = _row("ar", name, scores, a.resamples, real_tokens_per_eval=1.0 / beam,
               slots_per_eval=1.0 / beam, evals_per_example=float(beam * np.mean(lens)),
               mean_output_tokens=float(np.mean(lens)), seconds=round(seconds, 2))
    rows.append(row)
    for i, (t, ref) in enumerate(zip(texts, refs)):
      out.write(json.dumps(dict(model="ar", sampler=name, example=i, prediction=t, reference=ref,
                                rougeL=float(scores[i]))) + "\n")
    print(row, flush=True)
  return rows, per


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--workdir", default="runs/bench_diffusion")
  ap.add_argument("--steps", type=int, default=600, help="MLE steps of the AR model")
  ap.add_argument("--adapt_steps", type=int, default=0,
                  help="−ELBO steps of the AR-initialized model (0 = steps // 2)")
  ap.add_argument("--anneal_steps", type=int, default=0,
                  help="attention-mask annealing steps (0 = adapt_steps // 3)")
  ap.add_argument("--adapt_lr", type=float, default=1e-3)
  ap.add_argument("--block_length", type=int, default=8)
  ap.add_argument("--eval_examples", type=int, default=128)
  ap.add_argument("--split", default="validation", choices=("validation", "test"),
                  help="evaluation split: choose settings on validation, report on test")
  ap.add_argument("--batch_size", type=int, default=32)
  ap.add_argument("--resamples", type=int, default=1000)
  ap.add_argument("--skip_scratch", action="store_true",
                  help="only the AR and AR-initialized models (e.g. another block length)")
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  adapt = a.adapt_steps or max(1, a.steps // 2)
  anneal = a.anneal_steps or max(1, adapt // 3)
  os.makedirs(a.workdir, exist_ok=True)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}", flush=True)
  block = dict(block_length=a.block_length)
  rows, info, per = [], {}, {}
  tag = f"b{a.block_length}_a{adapt}_n{anneal}_lr{a.adapt_lr:g}"  # names this run's outputs
  if a.split != "validation":
    tag += f"_{a.split}"
  out = open(os.path.join(a.workdir, f"predictions_{tag}.jsonl"), "w")

  t0 = time.perf_counter()
  ar_state, ar_model, data = mle.run(_config("transformer", a.steps),
                                     os.path.join(a.workdir, f"ar_s{a.steps}"))
  info["ar"] = dict(steps=a.steps, train_seconds=round(time.perf_counter() - t0, 1))
  examples = data.split_examples(a.split)[: a.eval_examples]
  refs = [data.detokenize(e["targets"]) for e in examples]
  info["ar"]["heldout_nll"] = heldout_loss(ar_model, ar_state.params, data, examples, 32)
  r, per["ar"] = ar_rows(ar_model, ar_state.params, data, examples, refs, a, out)
  rows += r

  def measure(name, model, state, t0, **settings):
    """Training facts, held-out −ELBO and the sampler rows of one diffusion model."""
    info[name] = dict(settings, train_seconds=round(time.perf_counter() - t0, 1))
    info[name]["heldout_neg_elbo"] = heldout_loss(model, state.params, data, examples, 32)
    r, per[name] = diffusion_rows(name, model, state.params, data, examples, refs, a, out)
    return r

  if not a.skip_scratch:
    t0 = time.perf_counter()
    cfg = _config("diffusion", a.steps + adapt, **block)
    sub = f"diffusion_scratch_b{a.block_length}_s{a.steps + adapt}"
    state, model, _ = mle.run(cfg, os.path.join(a.workdir, sub))
    rows += measure("diffusion (scratch)", model, state, t0, steps=a.steps + adapt)

  t0 = time.perf_counter()
  cfg = _config("diffusion", adapt, shift=True, causal_prompt=True, **block)
  cfg.optimizer.learning_rate = a.adapt_lr
  sub = f"diffusion_ar_init_s{a.steps}_b{a.block_length}_a{adapt}_n{anneal}_lr{a.adapt_lr:g}"
  state, model, _ = diffusion_adapt.run(cfg, os.path.join(a.workdir, sub), ar_state.params,
                                        anneal_steps=anneal)
  rows += measure("diffusion (AR-init)", model, state, t0,
                  steps=f"{a.steps} AR + {adapt} adaptation", anneal_steps=anneal,
                  adapt_lr=a.adapt_lr)
  out.close()

  # AR-init vs the AR model it started from (paired over examples)
  comparisons = []
  for sampler in [s[0] for s in SAMPLERS]:
    d, lo, hi = metrics.paired_bootstrap_ci(100 * np.asarray(per["diffusion (AR-init)"][sampler]),
                                            100 * np.asarray(per["ar"]["greedy"]),
                                            num_resamples=a.resamples)
    comparisons.append(dict(a=f"diffusion (AR-init), {sampler}", b="ar greedy", diff=d, lo=lo,
                            hi=hi))
  print(f"\n{len(examples)} {a.split} examples, target_len {data.target_len}, block_length "
        f"{a.block_length}; models {json.dumps(info)}")
  print("model | sampler | ROUGE-L [95% CI] | diff vs top-1 [95% CI] | real tok/eval | "
        "slots/eval | seconds")
  for r in rows:
    diff = (f"{r['diff_vs_top1']:+.2f} [{r['diff_vs_top1_lo']:+.2f}, {r['diff_vs_top1_hi']:+.2f}]"
            if "diff_vs_top1" in r else "-")
    print(f"{r['model']} | {r['sampler']} | {r['rougeL']:.2f} [{r['rougeL_lo']:.2f}, "
          f"{r['rougeL_hi']:.2f}] | {diff} | {r['real_tokens_per_eval']:.2f} | "
          f"{r['slots_per_eval']:.2f} | {r['seconds']}")
  for c in comparisons:
    print(f"{c['a']} - {c['b']}: {c['diff']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]")
  result = dict(rows=rows, models=info, comparisons=comparisons, steps=a.steps,
                adapt_steps=adapt, anneal_steps=anneal, block_length=a.block_length,
                eval_examples=len(examples), split=a.split)
  with open(os.path.join(a.workdir, f"results_{tag}.json"), "w") as f:
    json.dump(result, f, indent=2)
  if a.json:
    with open(a.json, "w") as f:
      json.dump(result, f, indent=2)


if __name__ == "__main__":
  main()
