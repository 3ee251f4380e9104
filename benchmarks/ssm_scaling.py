"""Per-token decoding time against context length: state-space models vs a KV-cached transformer;
and training tokens/s against sequence length at matched parameter counts.

  python benchmarks/ssm_scaling.py                       # 1k, 4k, 16k; s4d, s5, selective, transformer
  python benchmarks/ssm_scaling.py --contexts=1024,4096 --variants=selective --steps=64
  python benchmarks/ssm_scaling.py --train_lengths=512,2048,8192 --contexts=   # training only

Training (``--train_lengths``): one jitted forward + backward pass of the next-token
cross-entropy (no optimizer update) on ``--train_tokens`` tokens per step, i.e. batch
``train_tokens / L`` at length L, so every row does the same number of tokens. The transformer's
``d_ff`` is solved so its parameter count equals the SSM's (printed in the table); its
attention is the library's dense causal attention (O(L^2) time and memory).

An SSM's decoding state has a fixed size, so its per-token time should be flat in the context
length. The transformer's step attends over its whole KV cache (``max_len = context + steps``
slots), so its per-token time grows with the context.

What is timed: ``--steps`` greedy decoding steps (argmax fed back) inside one jitted
``lax.scan``, after a warm-up call; reported as milliseconds per token (batch ``--batch``).
The SSM state is really prefilled with ``context`` random tokens (associative-scan prefill in
chunks of ``--chunk``). For the transformer the KV buffers are sized for the context and the
cache positions are set to ``context`` without running the prefill: the step's cost depends on
the buffer length (every slot is scored, then masked), not on the cached values.
"""

from __future__ import annotations

import argparse
import json
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from slicjax.models.ssm import SSMLM, SSMConfig, init_cache


def _decode_loop(apply_step, steps: int):
  """A jitted function running ``steps`` greedy steps from ``(cache, token_Bx1)``."""

  def run(params, cache, token_Bx1):
    def body(carry, _):
      cache, tok = carry
      logits, cache = apply_step(params, cache, tok)
      nxt = jnp.argmax(logits[:, -1], axis=-1).astype(jnp.int32)[:, None]
      return (cache, nxt), None

    (cache, tok), _ = jax.lax.scan(body, (cache, token_Bx1), None, length=steps)
    return cache, tok

  return jax.jit(run)


def _time(fn, *args, repeats: int) -> float:
  jax.block_until_ready(fn(*args))  # compile + warm-up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - t0)
  return best


def bench_ssm(variant, contexts, a) -> list[dict]:
  cfg = SSMConfig(
    vocab_size=a.vocab,
    d_model=a.d_model,
    n_layers=a.layers,
    d_state=a.d_state,
    variant=variant,
    init="real" if variant == "selective" else "lin",
  )
  model = SSMLM(cfg)
  params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
  params = params["params"]

  def apply_step(p, cache, tok):
    logits, mut = model.apply({"params": p, "cache": cache}, tok, decode=True, mutable=["cache"])
    return logits, mut["cache"]

  prefill = jax.jit(apply_step)
  loop = _decode_loop(apply_step, a.steps)
  rng = np.random.default_rng(0)
  rows = []
  for ctx in contexts:
    cache = init_cache(cfg, a.batch)
    t0 = time.perf_counter()
    for start in range(0, ctx, a.chunk):
      n = min(a.chunk, ctx - start)
      toks = jnp.asarray(rng.integers(4, a.vocab, (a.batch, n)), jnp.int32)
      _, cache = prefill(params, cache, toks)
    jax.block_until_ready(cache)
    prefill_s = time.perf_counter() - t0
    first = jnp.full((a.batch, 1), 5, jnp.int32)
    dt = _time(loop, params, cache, first, repeats=a.repeats)
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    rows.append(
      dict(
        model=f"ssm-{variant}",
        context=ctx,
        ms_per_token=round(1e3 * dt / a.steps, 4),
        cache_kib=round(state_bytes / 1024, 1),
        prefill_s=round(prefill_s, 2),
      )
    )
    print(rows[-1], flush=True)
  return rows


def bench_transformer(contexts, a) -> list[dict]:
  from slicjax.models.transformer import TransformerConfig, TransformerLM

  rows = []
  for ctx in contexts:
    cfg = TransformerConfig(
      vocab_size=a.vocab,
      d_model=a.d_model,
      num_heads=4,
      num_kv_heads=4,
      head_dim=a.d_model // 4,
      d_ff=4 * a.d_model,
      num_layers=a.layers,
      max_len=ctx + a.steps + 1,
    )
    model = TransformerLM(cfg)
    tok0 = jnp.zeros((a.batch, 1), jnp.int32)
    params = nn.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tok0))["params"]
    shapes = jax.eval_shape(lambda r: model.init(r, tok0, decode=True), jax.random.PRNGKey(0))
    cache = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), nn.unbox(shapes["cache"]))
    # pretend `ctx` tokens are cached: only the write/read positions matter for the step cost
    cache = jax.tree_util.tree_map_with_path(
      lambda path, x: (
        jnp.full_like(x, ctx)
        if str(getattr(path[-1], "key", "")) in ("cache_index", "position")
        else x
      ),
      cache,
    )

    def apply_step(p, cache, tok, model=model):
      logits, mut = model.apply({"params": p, "cache": cache}, tok, decode=True, mutable=["cache"])
      return logits, mut["cache"]

    loop = _decode_loop(apply_step, a.steps)
    dt = _time(loop, params, cache, jnp.full((a.batch, 1), 5, jnp.int32), repeats=a.repeats)
    kv_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    rows.append(
      dict(
        model="transformer",
        context=ctx,
        ms_per_token=round(1e3 * dt / a.steps, 4),
        cache_kib=round(kv_bytes / 1024, 1),
        prefill_s=None,
      )
    )
    print(rows[-1], flush=True)
  return rows


def _next_token_grad(apply_fn):
  def loss(p, tokens_BxL):
    logits = apply_fn({"params": p}, tokens_BxL[:, :-1]).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens_BxL[:, 1:, None], axis=-1))

  return jax.jit(jax.value_and_grad(loss))


def _num_params(tree) -> int:
  return int(sum(np.prod(x.shape) for x in jax.tree.leaves(tree)))


def _transformer_matching(n_target: int, a, max_len: int):
  """A TransformerLM whose parameter count is ``n_target`` (``d_ff`` solved; params are linear
  in it)."""
  from slicjax.models.transformer import TransformerConfig, TransformerLM

  def build(d_ff):
    cfg = TransformerConfig(vocab_size=a.vocab, d_model=a.d_model, num_heads=4, num_kv_heads=4,
                            head_dim=a.d_model // 4, d_ff=d_ff, num_layers=a.layers,
                            max_len=max_len)
    m = TransformerLM(cfg)
    shapes = jax.eval_shape(m.init, jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32))
    return m, _num_params(nn.unbox(shapes)["params"])

  _, n1 = build(64)
  _, n2 = build(128)
  d_ff = max(8, int(round(64 + (n_target - n1) * 64 / (n2 - n1))))
  return build(d_ff) + (d_ff,)


def bench_training(variants, lengths, a) -> list[dict]:
  rng = np.random.default_rng(0)
  rows = []
  for variant in variants:
    cfg = SSMConfig(vocab_size=a.vocab, d_model=a.d_model, n_layers=a.layers, d_state=a.d_state,
                    variant=variant, init="real" if variant == "selective" else "lin")
    ssm = SSMLM(cfg)
    p_ssm = nn.unbox(jax.jit(ssm.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
    p_ssm = p_ssm["params"]
    n_ssm = _num_params(p_ssm)
    models = [(f"ssm-{variant}", ssm, p_ssm, n_ssm)]
    if a.transformer:
      tf, n_tf, d_ff = _transformer_matching(n_ssm, a, max(lengths) + 1)
      p_tf = nn.unbox(jax.jit(tf.init)(jax.random.PRNGKey(0), jnp.zeros((1, 8), jnp.int32)))
      models.append((f"transformer (d_ff {d_ff}, vs {variant})", tf, p_tf["params"], n_tf))
    for name, module, params, n in models:
      step = _next_token_grad(module.apply)
      for length in lengths:
        batch = max(1, a.train_tokens // length)
        toks = jnp.asarray(rng.integers(4, a.vocab, (batch, length + 1)), jnp.int32)
        try:
          dt = _time(step, params, toks, repeats=a.repeats)
          tps = round(batch * length / dt, 1)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at long L: report, go on
          print(f"{name} L={length}: failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
          dt, tps = float("nan"), None
        rows.append(dict(model=name, params=n, length=length, batch=batch,
                         step_s=round(dt, 4), train_tokens_per_s=tps))
        print(rows[-1], flush=True)
  return rows


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--contexts", default="1024,4096,16384")
  ap.add_argument("--variants", default="s4d,s5,selective", help="SSM variants to time")
  ap.add_argument("--transformer", type=int, default=1, help="1: add the transformer rows")
  ap.add_argument("--d_model", type=int, default=128)
  ap.add_argument("--layers", type=int, default=2)
  ap.add_argument("--d_state", type=int, default=16)
  ap.add_argument("--vocab", type=int, default=512)
  ap.add_argument("--batch", type=int, default=1)
  ap.add_argument("--steps", type=int, default=32, help="decoding steps timed per context")
  ap.add_argument("--chunk", type=int, default=1024, help="SSM prefill chunk length")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--train_lengths", default="", help="e.g. 512,2048,8192: time training too")
  ap.add_argument("--train_tokens", type=int, default=8192, help="tokens per training step")
  ap.add_argument("--json", default="")
  a = ap.parse_args()
  contexts = [int(c) for c in a.contexts.split(",") if c]
  variants = [v for v in a.variants.split(",") if v]
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}", flush=True)
  rows = []
  if contexts:
    for v in variants:
      rows += bench_ssm(v, contexts, a)
    if a.transformer:
      rows += bench_transformer(contexts, a)
    models = list(dict.fromkeys(r["model"] for r in rows))
    print("\nms per decoded token (batch %d)" % a.batch)
    print("model | " + " | ".join(f"ctx {c}" for c in contexts) + " | cache KiB at max ctx")
    for m in models:
      mine = {r["context"]: r for r in rows if r["model"] == m}
      cells = [str(mine[c]["ms_per_token"]) for c in contexts]
      print(f"{m} | " + " | ".join(cells) + f" | {mine[contexts[-1]]['cache_kib']}")
  train_rows = []
  if a.train_lengths:
    lengths = [int(x) for x in a.train_lengths.split(",")]
    train_rows = bench_training(variants, lengths, a)
    print(f"\ntraining tokens/s (forward + backward, {a.train_tokens} tokens per step)")
    print("model | params | " + " | ".join(f"L {n}" for n in lengths))
    for m in dict.fromkeys(r["model"] for r in train_rows):
      mine = {r["length"]: r for r in train_rows if r["model"] == m}
      cells = [str(mine[n]["train_tokens_per_s"]) for n in lengths]
      print(f"{m} | {mine[lengths[0]]['params']} | " + " | ".join(cells))
  if a.json:
    with open(a.json, "w") as f:
      json.dump(dict(decode=rows, train=train_rows), f, indent=2)


if __name__ == "__main__":
  main()
