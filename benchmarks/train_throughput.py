"""Training throughput: tokens/s (and MFU on GPU/TPU) of the MLE train step for named sizes.

  python benchmarks/train_throughput.py --sizes=10m,100m --batch=8 --seq=256 --steps=5

FLOPs per step use the standard dense estimate 6 * params * tokens (+ attention
12 * layers * d_model * seq per token), the same count used for MFU in the literature.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

from slicjax import optim, sharding, training
from slicjax.models.factory import PRESETS, build_model

PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0, "TPU v4": 275.0, "TPU v5": 197.0}


def peak_flops() -> float | None:
  kind = jax.devices()[0].device_kind
  for name, tf in PEAK_TFLOPS.items():
    if name.lower() in kind.lower():
      return tf * 1e12
  return None


def bench(size: str, batch: int, seq: int, steps: int, dtype: str) -> dict:
  cfg = dict(preset=size, max_len=2 * seq + 1, dtype=dtype)
  model = build_model(cfg)
  tx, _ = optim.make_optimizer(dict(learning_rate=1e-4), steps + 2)
  mesh = sharding.make_mesh()
  state, sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(0), init_kwargs=dict(input_len=seq, target_len=seq)
  )
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))
  step = training.make_train_step(training.mle_loss_fn(model), tx, mesh, sh)
  rng = np.random.default_rng(0)
  vocab = model.vocab_size
  b = {
    "inputs": rng.integers(4, vocab, (batch, seq)).astype(np.int32),
    "targets": rng.integers(4, vocab, (batch, seq)).astype(np.int32),
  }
  b = sharding.shard_batch(b, mesh)
  t0 = time.time()
  state, m = step(state, b)
  jax.block_until_ready(m["loss"])
  compile_s = time.time() - t0
  t0 = time.time()
  for _ in range(steps):
    state, m = step(state, b)
  jax.block_until_ready(m["loss"])
  dt = (time.time() - t0) / steps
  tokens = batch * (2 * seq + 1)  # prefix LM: inputs + BOS + targets per row
  p = PRESETS[size]
  flops = 6 * n_params * tokens + 12 * p["num_layers"] * p["d_model"] * (2 * seq + 1) * tokens
  peak = peak_flops()
  return dict(
    size=size, params_m=round(n_params / 1e6, 1), batch=batch, seq=2 * seq + 1, dtype=dtype,
    step_s=round(dt, 4), tokens_per_s=round(tokens / dt, 1), compile_s=round(compile_s, 1),
    achieved_tflops=round(flops / dt / 1e12, 4), mfu=round(flops / dt / peak, 4) if peak else None, device=jax.devices()[0].device_kind,
    n_devices=jax.device_count(),
  )


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--sizes", default="10m,100m")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128, help="input and target length each")
  ap.add_argument("--steps", type=int, default=3)
  ap.add_argument("--dtype", default="float32")
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  rows = [bench(s, a.batch, a.seq, a.steps, a.dtype) for s in a.sizes.split(",")]
  keys = list(rows[0])
  print(" | ".join(keys))
  for r in rows:
    print(" | ".join(str(r[k]) for k in keys))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(rows, f, indent=2)


if __name__ == "__main__":
  main()
