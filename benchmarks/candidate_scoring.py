"""Candidate scoring: shared-prefix (one prompt prefill per input) vs K copies of the prompt.

  python benchmarks/candidate_scoring.py                          # 7.4M Llama-shaped model
  python benchmarks/candidate_scoring.py --init_from=smollm2 --batch=4 --cands=4

Times ``scoring.score_candidates`` (forward) and its gradient (the calibration step's cost)
for ``PrefixLM.shared_prefix_scoring`` True and False on the same random prompts and
candidates, after a compile call; median of ``--rounds``, alternating the two. Prints the
seconds and the speed-up, and the largest difference of the sequence log-likelihoods.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--init_from", default="", help="a load_pretrained path/name; default: random")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--cands", type=int, default=8)
  ap.add_argument("--input_len", type=int, default=192)
  ap.add_argument("--target_len", type=int, default=32)
  ap.add_argument("--rounds", type=int, default=3)
  args = ap.parse_args()

  from slicjax import scoring
  from slicjax.models.factory import build_model

  total = args.input_len + 1 + args.target_len
  if args.init_from:
    from slicjax.interop.pretrained import load_pretrained

    model, params, _ = load_pretrained(args.init_from, max_len=total)
  else:
    model = build_model(dict(
      preset="small", d_model=256, num_layers=4, num_heads=4, num_kv_heads=4, head_dim=64,
      d_ff=688, vocab_size=8192, max_len=total,
    ))
    params = model.init(jax.random.PRNGKey(0))
  rng = np.random.default_rng(0)
  b, k, s, length = args.batch, args.cands, args.input_len, args.target_len
  inputs = jnp.asarray(rng.integers(3, model.vocab_size, (b, s)), jnp.int32)
  cands = rng.integers(3, model.vocab_size, (b, k, length))
  cands[..., -1] = 1
  cands = jnp.asarray(cands, jnp.int32)
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
  print(f"# {n_params / 1e6:.1f}M params; B={b} K={k} S={s} L={length}; "
        f"{jax.devices()[0].device_kind}", flush=True)

  fns = {}
  for shared in (True, False):
    m = dataclasses.replace(model, shared_prefix_scoring=shared)
    logp = jax.jit(lambda p, m=m: scoring.score_candidates(m, p, inputs, cands)["logp"])
    grad = jax.jit(jax.grad(lambda p, m=m: jnp.sum(
      scoring.score_candidates(m, p, inputs, cands)["logp"])))
    fns[shared] = (logp, grad)
  ref = {sh: np.asarray(fns[sh][0](params)) for sh in (True, False)}
  print(f"max |logp difference| {np.max(np.abs(ref[True] - ref[False])):.2e}", flush=True)
  for i, what in enumerate(("forward", "gradient")):
    jax.block_until_ready(fns[True][i](params))
    jax.block_until_ready(fns[False][i](params))
    times = {True: [], False: []}
    for _ in range(args.rounds):
      for sh in (True, False):
        t = time.perf_counter()
        jax.block_until_ready(fns[sh][i](params))
        times[sh].append(time.perf_counter() - t)
    a, c = statistics.median(times[True]), statistics.median(times[False])
    print(f"{what:9s} shared prefix {a:.3f} s, copies {c:.3f} s: {c / a:.2f}x", flush=True)


if __name__ == "__main__":
  main()
