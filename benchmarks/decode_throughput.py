"""Decoding throughput: generated tokens/s of greedy, sampling and beam search vs output length.

  python benchmarks/decode_throughput.py                        # small MLP step, runs anywhere
  python benchmarks/decode_throughput.py --model=transformer:tiny --lengths=32,128
  python benchmarks/decode_throughput.py --model=ssm:small --json=/tmp/decode.json

Every run goes through ``slicjax.decoding.decode`` (one compiled program per method and length,
model prefill included). EOS is disabled (``eos_id=-1``), so every row generates exactly L
tokens and runs of the same L are comparable. ``tokens/s`` counts candidate tokens: ``B * K * L``
per decode, with K = 1 (greedy), ``--num_samples`` (sampling) or ``--beam_size`` (beam search).
Compile time is measured separately and excluded.

Models come from :func:`make_step`: ``mlp`` is a small pure-JAX recurrent step (embedding + one
tanh layer carrying a hidden state in the cache) that needs nothing else; ``<family>:<preset>``
(e.g. ``transformer:tiny``, ``ssm:small``) builds a ``slicjax.models.factory`` model with
random weights.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from slicjax.decoding import api

BOS_ID = 2


class MLPStepModel:
  """A tiny recurrent step: ``h' = tanh(embed[token] + h @ W_h)``, ``logits = h' @ W_out``.

  The cache is ``{"h": [B, D], "pos": [B]}``; the prompt is folded into ``h`` by a scan.
  """

  def __init__(self, vocab_size: int, d_model: int):
    self.vocab_size, self.d_model = vocab_size, d_model

  def init(self, rng):
    k1, k2, k3 = jax.random.split(rng, 3)
    d, v = self.d_model, self.vocab_size
    return {
      "embed": jax.random.normal(k1, (v, d)) * 0.5,
      "w_h": jax.random.normal(k2, (d, d)) / np.sqrt(d),
      "w_out": jax.random.normal(k3, (d, v)) / np.sqrt(d),
    }

  def decode_state(self, params, inputs_BxS, max_len: int):
    def step(tokens_B, cache):
      h_BxD = jnp.tanh(params["embed"][tokens_B] + cache["h"] @ params["w_h"])
      return h_BxD @ params["w_out"], {"h": h_BxD, "pos": cache["pos"] + 1}

    b = inputs_BxS.shape[0]
    cache = {"h": jnp.zeros((b, self.d_model)), "pos": jnp.zeros((b,), jnp.int32)}

    def prefill(c, tok_B):
      return step(tok_B, c)[1], None

    cache, _ = jax.lax.scan(prefill, cache, inputs_BxS.T)
    return step, jnp.full((b,), BOS_ID, jnp.int32), cache


def make_step(
  model_name: str, *, vocab_size: int, prompt_len: int, max_out_len: int, d_model: int = 256
) -> tuple[Any, Any]:
  """``(model, params)`` where ``model.decode_state(params, inputs, max_len)`` gives the step.

  Args:
    model_name: ``mlp`` or ``<family>:<preset>`` of ``slicjax.models.factory``.
    vocab_size: V.
    prompt_len: S, the prompt length the model must accept.
    max_out_len: the longest output length that will be decoded.
    d_model: hidden size of the ``mlp`` step.
  """
  if model_name == "mlp":
    model = MLPStepModel(vocab_size, d_model)
    return model, model.init(jax.random.PRNGKey(0))
  family, _, preset = model_name.partition(":")
  if not preset:
    raise ValueError(
      f"unknown model {model_name!r}; use 'mlp' or '<family>:<preset>', e.g. 'transformer:tiny'."
    )
  from slicjax.models import factory

  model = factory.build_model(
    dict(family=family, preset=preset, vocab_size=vocab_size, max_len=prompt_len + 1 + max_out_len)
  )
  params = model.init(jax.random.PRNGKey(0), batch_size=1, input_len=prompt_len, target_len=8)
  return model, params


def bench_one(model, params, inputs, method: str, length: int, options: dict, repeats: int):
  kw = dict(method=method, max_len=length, eos_id=-1, **options)
  if method == "sample":
    kw["rng"] = jax.random.PRNGKey(0)
  t0 = time.perf_counter()
  jax.block_until_ready(api.decode(model, params, inputs, **kw))
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  for _ in range(repeats):
    res = api.decode(model, params, inputs, **kw)
  jax.block_until_ready(res)
  dt = (time.perf_counter() - t0) / repeats
  b, k, gen = res.tokens_BxKxL.shape
  assert gen == length and int(jnp.min(res.lengths_BxK)) == length, "EOS should be disabled"
  return dict(
    method=method,
    length=length,
    batch=b,
    k=k,
    seconds=dt,
    compile_s=compile_s,
    tokens_per_s=b * k * length / dt,
    ms_per_step=1e3 * dt / length,
  )


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--model", default="mlp", help="mlp or <family>:<preset>, e.g. transformer:tiny")
  p.add_argument("--lengths", default="32,64,128,256,512", help="output lengths L")
  p.add_argument("--methods", default="greedy,sample,beam")
  p.add_argument("--batch", type=int, default=4, help="inputs per decode (B)")
  p.add_argument("--prompt_len", type=int, default=16)
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--num_samples", type=int, default=16)
  p.add_argument("--beam_size", type=int, default=8)
  p.add_argument("--repeats", type=int, default=2)
  p.add_argument("--json", default="", help="also write the rows to this JSON file")
  args = p.parse_args(argv)
  lengths = [int(x) for x in args.lengths.split(",")]
  methods = args.methods.split(",")
  options = {
    "greedy": {},
    "sample": dict(num_samples=args.num_samples),
    "beam": dict(beam_size=args.beam_size, alpha=0.6),
  }
  for m in methods:
    if m not in options:
      raise SystemExit(f"unknown method {m!r}; choose from {sorted(options)}")
  model, params = make_step(
    args.model, vocab_size=args.vocab, prompt_len=args.prompt_len, max_out_len=max(lengths)
  )
  rng = np.random.default_rng(0)
  inputs = jnp.asarray(rng.integers(3, args.vocab, (args.batch, args.prompt_len)), jnp.int32)
  dev = jax.devices()[0]
  print(
    f"model={args.model} device={dev.platform}:{dev.device_kind} B={args.batch} "
    f"V={args.vocab} S={args.prompt_len}"
  )
  print(
    f"{'method':8} {'K':>3} {'L':>5} {'compile s':>10} {'decode s':>9} {'ms/step':>8} "
    f"{'tokens/s':>11}"
  )
  rows = []
  for m in methods:
    for length in lengths:
      r = bench_one(model, params, inputs, m, length, options[m], args.repeats)
      r["model"] = args.model
      rows.append(r)
      print(
        f"{m:8} {r['k']:>3} {length:>5} {r['compile_s']:>10.2f} {r['seconds']:>9.4f} "
        f"{r['ms_per_step']:>8.3f} {r['tokens_per_s']:>11.0f}",
        flush=True,
      )
  if args.json:
    meta = dict(device=f"{dev.platform}:{dev.device_kind}", jax=jax.__version__, **vars(args))
    with open(args.json, "w") as f:
      json.dump(dict(meta=meta, rows=rows), f, indent=1)
    print(f"wrote {args.json}")
  return rows


if __name__ == "__main__":
  main()
