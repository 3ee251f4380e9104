"""Speculative decoding: tokens/s with and without a draft at equal output, acceptance per gamma.

  python benchmarks/speculative.py --task=synthetic               # (a) trained toy target + draft
  python benchmarks/speculative.py --task=smollm2 --draft_layers=6  # (b) SmolLM2-135M, self-draft
  ... --gammas=1,2,4 --out=benchmarks/results/speculative.md      # append a markdown table

(a) ``synthetic``: a transformer target (8 layers, d_model 128) and a 4x smaller draft (2 layers
of the same width) are trained briefly (``--train_steps`` Adam steps each, from scratch, the
same data) on sequences of a random first-order Markov chain whose tokens have 4 successors
(probabilities 0.55 / 0.25 / 0.12 / 0.08), so both models learn the same conditional
distributions and acceptance means something. (b) ``smollm2``: SmolLM2-135M-Instruct
(``load_pretrained("smollm2")``) with a layer-skip self-draft: its first ``--draft_layers`` of 30
blocks + final norm + head (``speculative.layer_skip_draft``, nothing trained).

Every decode goes through ``slicjax.decoding.decode``. EOS is disabled (``eos_id=-1``) so every
row generates exactly ``--max_len`` tokens. Greedy: the speculative tokens are asserted equal to
plain greedy decoding. Sampling (``--temperature > 0``): acceptance and tokens/s only (outputs
differ by randomness). Times exclude compilation (one warm-up call) and are the best of
``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import os
import pickle
import platform
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from slicjax.decoding import api, speculative
from slicjax.models.factory import build_model


def _timed(fn, repeats: int):
  out = fn()
  jax.block_until_ready(out)  # compile + warm-up
  best = float("inf")
  for _ in range(repeats):
    t0 = time.perf_counter()
    out = fn()
    jax.block_until_ready(out)
    best = min(best, time.perf_counter() - t0)
  return out, best


def _markov(vocab: int, seed: int):
  rng = np.random.default_rng(seed)
  succ = np.stack([rng.choice(np.arange(3, vocab), 4, replace=False) for _ in range(vocab)])
  return succ, np.array([0.55, 0.25, 0.12, 0.08])


def _chains(succ, probs, n: int, length: int, rng):
  out = np.zeros((n, length), np.int32)
  out[:, 0] = rng.integers(3, succ.shape[0], n)
  for j in range(1, length):
    pick = rng.choice(4, size=n, p=probs)
    out[:, j] = succ[out[:, j - 1], pick]
  return out


def _train(model, params, succ, probs, steps: int, prompt_len: int, seq_len: int, seed: int):
  opt = optax.adam(3e-3)
  state = opt.init(params)

  def loss_fn(p, inputs, targets):
    logits, _ = model.target_logits(p, {"inputs": inputs, "targets": targets})
    logp = jax.nn.log_softmax(logits, -1)
    return -jnp.mean(jnp.take_along_axis(logp, targets[..., None], -1))

  @jax.jit
  def step(p, s, inputs, targets):
    loss, g = jax.value_and_grad(loss_fn)(p, inputs, targets)
    upd, s = opt.update(g, s, p)
    return optax.apply_updates(p, upd), s, loss

  rng = np.random.default_rng(seed)
  loss = None
  for _ in range(steps):
    seqs = _chains(succ, probs, 32, prompt_len + seq_len, rng)
    params, state, loss = step(params, state, seqs[:, :prompt_len], seqs[:, prompt_len:])
  return params, float(loss)


def setup_synthetic(args):
  vocab, prompt_len = 64, 8
  common = dict(
    vocab_size=vocab,
    max_len=prompt_len + 1 + max(args.max_len, 48) + 8,
    d_model=128,
    num_heads=4,
    num_kv_heads=4,
    head_dim=32,
    d_ff=512,
  )
  target = build_model(dict(common, num_layers=8))
  draft = build_model(dict(common, num_layers=2))
  succ, probs = _markov(vocab, 0)
  t0 = time.perf_counter()
  if args.params_cache and os.path.exists(args.params_cache):
    with open(args.params_cache, "rb") as f:
      pt, pd, lt, ld, t_train = pickle.load(f)
    return _synthetic_result(args, target, draft, pt, pd, lt, ld, t_train, succ, probs, vocab)
  pt, lt = _train(
    target,
    jax.jit(target.init)(jax.random.PRNGKey(0)),
    succ,
    probs,
    args.train_steps,
    prompt_len,
    48,
    1,
  )
  pd, ld = _train(
    draft,
    jax.jit(draft.init)(jax.random.PRNGKey(1)),
    succ,
    probs,
    args.train_steps,
    prompt_len,
    48,
    2,
  )
  t_train = time.perf_counter() - t0
  if args.params_cache:
    with open(args.params_cache, "wb") as f:
      pickle.dump((jax.device_get(pt), jax.device_get(pd), lt, ld, t_train), f)
  return _synthetic_result(args, target, draft, pt, pd, lt, ld, t_train, succ, probs, vocab)


def _synthetic_result(args, target, draft, pt, pd, lt, ld, t_train, succ, probs, vocab):
  prompt_len = 8
  # entropy of the chain per token (the best achievable loss)
  h = float(-(probs * np.log(probs)).sum())
  note = (
    f"trained {args.train_steps} steps each in {t_train:.0f}s; final loss "
    f"target {lt:.3f}, draft {ld:.3f} (chain entropy {h:.3f} nats)"
  )
  prompts = _chains(succ, probs, args.batch, prompt_len, np.random.default_rng(3))
  return dict(
    target=(target, pt),
    draft=(draft, pd),
    prompts=jnp.asarray(prompts),
    name="synthetic: target 8x128 (2.1M block params) / draft 2x128",
    note=note,
  )


def setup_smollm2(args):
  from slicjax.interop.pretrained import load_pretrained

  texts = [
    "Write a short story about a robot learning to paint.",
    "Explain how a hash table works.",
    "List three tips for staying focused while studying.",
    "What is the capital of France, and what is it known for?",
    "Summarize the plot of Romeo and Juliet.",
    "Give a recipe for pancakes.",
    "Why is the sky blue?",
    "Describe the water cycle.",
  ]
  model, params, tok = load_pretrained("smollm2", max_len=256, dtype="float32")
  rows = [tok.encode_prompt(t) for t in texts[: args.batch]]
  width = max(len(r) for r in rows)
  prompts = np.zeros((len(rows), width), np.int32)
  for i, r in enumerate(rows):
    prompts[i, : len(r)] = r
  draft = speculative.layer_skip_draft(model, params, args.draft_layers)
  n = model.module.cfg.num_layers
  return dict(
    target=(model, params),
    draft=draft,
    prompts=jnp.asarray(prompts),
    name=f"SmolLM2-135M-Instruct, layer-skip draft {args.draft_layers}/{n} layers",
    note=f"{len(rows)} chat prompts of {min(map(len, rows))}-{width} tokens",
    tok=tok,
  )


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--task", choices=["synthetic", "smollm2"], default="synthetic")
  ap.add_argument("--gammas", default="1,2,4")
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--max_len", type=int, default=64)
  ap.add_argument("--train_steps", type=int, default=300)
  ap.add_argument("--draft_layers", type=int, default=6)
  ap.add_argument("--temperature", type=float, default=0.0)
  ap.add_argument("--repeats", type=int, default=2)
  ap.add_argument("--out", default="")
  ap.add_argument("--params_cache", default="", help="synthetic: pickle of the trained params")
  args = ap.parse_args(argv)
  gammas = [int(g) for g in args.gammas.split(",")]
  t_setup = time.perf_counter()
  cfg = setup_synthetic(args) if args.task == "synthetic" else setup_smollm2(args)
  print(f"setup {time.perf_counter() - t_setup:.0f}s: {cfg['note']}", flush=True)
  target, pt = cfg["target"]
  prompts = cfg["prompts"]
  b = prompts.shape[0]
  sampling = args.temperature > 0
  opts = dict(max_len=args.max_len, eos_id=-1, pad_id=0)
  if sampling:
    opts.update(temperature=args.temperature, rng=jax.random.PRNGKey(0))
    base = lambda: api.decode(target, pt, prompts, method="sample", **opts)
  else:
    base = lambda: api.decode(target, pt, prompts, method="greedy", **opts)
  ref, t_base = _timed(base, args.repeats)
  tokens = b * args.max_len
  kind = "sampling" if sampling else "greedy"
  rows = [(f"plain {kind} (target)", "-", "-", "-", tokens / t_base, 1.0)]
  print(rows[-1], flush=True)
  # the draft alone: its per-token cost relative to the target's bounds the speedup
  dm, dp = cfg["draft"]
  _, t_draft = _timed(
    lambda: api.decode(dm, dp, prompts, method="sample" if sampling else "greedy", **opts),
    args.repeats,
  )
  rows.append((f"plain {kind} (draft alone)", "-", "-", "-", tokens / t_draft, t_base / t_draft))
  print(rows[-1], flush=True)
  for g in gammas:
    run = lambda g=g: api.decode(
      target, pt, prompts, method="speculative", draft=cfg["draft"], num_draft=g, **opts
    )
    got, t = _timed(run, args.repeats)
    if not sampling:
      np.testing.assert_array_equal(np.asarray(got.tokens_BxKxL), np.asarray(ref.tokens_BxKxL))
    st = got.stats
    rows.append(
      (
        f"speculative gamma={g}",
        f"{float(st.acceptance_rate):.3f}",
        f"{float(st.tokens_per_target_call):.2f}",
        int(st.num_rounds),
        tokens / t,
        t_base / t,
      )
    )
    print(rows[-1], flush=True)
  if "tok" in cfg:
    print("sample output:", cfg["tok"].decode(np.asarray(ref.tokens_BxKxL[0, 0]).tolist())[:300])
  lines = [
    f"### {cfg['name']} ({'sampling T=' + str(args.temperature) if sampling else 'greedy'})",
    "",
    f"`python {' '.join(['benchmarks/speculative.py'] + sys.argv[1:])}`",
    "",
    f"batch {b}, {args.max_len} new tokens per row (EOS off), best of {args.repeats} after a "
    f"warm-up; {cfg['note']}; {platform.processor() or platform.machine()}, "
    f"{os.cpu_count()} CPUs, JAX {jax.__version__} on {jax.devices()[0].platform}.",
    "",
    "| decode | acceptance | tokens / target call | rounds | tokens/s | speedup |",
    "|---|---|---|---|---|---|",
  ]
  for name, acc, tpc, rounds, tps, sp in rows:
    lines.append(f"| {name} | {acc} | {tpc} | {rounds} | {tps:.1f} | {sp:.2f}x |")
  text = "\n".join(lines) + "\n\n"
  print(text)
  if args.out:
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "a") as f:
      f.write(text)


if __name__ == "__main__":
  main()
