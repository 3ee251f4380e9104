"""slicjax against Hugging Face ``transformers`` (PyTorch) on the same Llama weights, one core.

  python benchmarks/vs_hf.py                       # every case, 5 interleaved rounds
  python benchmarks/vs_hf.py --cases=greedy,ttft --rounds=3 --json=/tmp/vs_hf.json

A random Llama (``--d_model`` 256, 4 layers, vocab 8192: 7.3M parameters) is built in
``transformers``, saved with ``save_pretrained`` and imported with
``slicjax.interop.load_hf_checkpoint``; teacher-forced logits are compared first (the run stops if
they differ by more than 1e-3). The process is pinned to one CPU core (``sched_setaffinity``)
and PyTorch to one thread, XLA to one thread per op, so both libraries get the same compute.
Each case is run once to compile / warm up, then ``--rounds`` times alternating slicjax and
transformers; the ratio of a round is ``transformers seconds / slicjax seconds`` (> 1: slicjax
is faster). Printed: the median ratio and its [min, max] over rounds, and the median seconds of
each side.

Cases (EOS disabled on both sides so every row generates exactly the requested tokens):

* ``train``: one step of next-token cross-entropy, backward and AdamW on 8 x 256 tokens;
* ``greedy``: 8 prompts of 32 tokens, 64 new tokens; ``beam4``: the same with 4 beams
  (length penalty off on both sides);
* ``prompt512``: 1 prompt of 512 tokens, 32 new tokens (total time);
* ``ttft``: 1 prompt of 512 tokens, 1 new token (time to first token);
* ``buffer``: slicjax greedy (8 x 32 -> 64) with a 256-slot and a 4096-slot cache buffer; the
  per-token time ratio 4096 / 256 is printed (1.0 = decode cost independent of the buffer).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})  # one core for both libraries
# XLA:CPU runs one thread per op as PyTorch does with set_num_threads(1): without these flags its
# Eigen pool still spawns threads that contend for the one core (greedy ratio 1.31 vs 1.76 with
# them, beam 4 1.06 vs 1.07; see BENCHMARKS.md).
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false",
   "intra_op_parallelism_threads=1"]
).strip()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402


def build_hf(args, path):
  import torch
  from transformers import LlamaConfig, LlamaForCausalLM

  torch.manual_seed(0)
  cfg = LlamaConfig(
    vocab_size=args.vocab, hidden_size=args.d_model, intermediate_size=int(args.d_model * 2.6875),
    num_hidden_layers=args.layers, num_attention_heads=args.heads,
    num_key_value_heads=args.heads, max_position_embeddings=4096, tie_word_embeddings=False,
    bos_token_id=2, eos_token_id=1, pad_token_id=0,
  )
  model = LlamaForCausalLM(cfg).eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


def check_logits(sj_model, sj_params, hf_model, vocab):
  import torch

  rng = np.random.default_rng(1)
  toks = rng.integers(3, vocab, (2, 48)).astype(np.int32)
  with torch.no_grad():
    want = hf_model(torch.tensor(toks, dtype=torch.long)).logits.numpy()
  got = np.asarray(sj_model.module.apply({"params": sj_params}, jnp.asarray(toks)))
  diff = float(np.max(np.abs(got - want)))
  if diff > 1e-3:
    raise SystemExit(f"logits differ by {diff:.3g} > 1e-3: the comparison would not be fair.")
  return diff


def _time(fn):
  t0 = time.perf_counter()
  fn()
  return time.perf_counter() - t0


def make_cases(args, hf, path):
  import torch

  from slicjax import optim, sharding, training
  from slicjax.decoding import api
  from slicjax.interop import load_hf_checkpoint

  torch.set_num_threads(1)
  rng = np.random.default_rng(0)
  models = {n: load_hf_checkpoint(path, max_len=n) for n in (256, 4096, 640)}
  vocab = args.vocab
  prompts = rng.integers(3, vocab, (8, 32)).astype(np.int32)
  long_prompt = rng.integers(3, vocab, (1, 512)).astype(np.int32)
  mesh = sharding.make_mesh()

  def sj_decode(n_slots, inputs, new, **opts):
    model, params = models[n_slots]
    x = jnp.asarray(inputs)
    method = "beam" if opts.get("beam_size", 1) > 1 else "greedy"

    def run():
      res = api.decode(model, params, x, method=method, max_len=new, eos_id=-1, **opts)
      jax.block_until_ready(res.tokens_BxKxL)

    return run

  def hf_decode(inputs, new, beams=1):
    x = torch.tensor(inputs, dtype=torch.long)
    beam_opts = dict(num_beams=beams, length_penalty=0.0, early_stopping=False) if beams > 1 else {}

    def run():
      with torch.no_grad():
        hf.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                    do_sample=False, eos_token_id=None, pad_token_id=0, **beam_opts)

    return run

  # Train step: slicjax's own MLE step (prefix LM, 128 inputs + 128 targets) and the same
  # causal-LM loss, backward and AdamW in PyTorch on 8 x 256 tokens.
  model, _ = models[640]
  tx, _ = optim.make_optimizer(dict(learning_rate=1e-4, warmup_steps=0), 10_000)
  state, sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(0), init_kwargs=dict(input_len=128, target_len=128)
  )
  step = training.make_train_step(training.mle_loss_fn(model), tx, mesh, sh)
  batch = sharding.shard_batch({
    "inputs": rng.integers(3, vocab, (8, 128)).astype(np.int32),
    "targets": rng.integers(3, vocab, (8, 128)).astype(np.int32),
  }, mesh)
  box = {"state": state}

  def sj_train():
    box["state"], m = step(box["state"], batch)
    jax.block_until_ready(m["loss"])

  opt = torch.optim.AdamW(hf.parameters(), lr=1e-4)
  hf_tokens = torch.tensor(rng.integers(3, vocab, (8, 256)), dtype=torch.long)

  def hf_train():
    hf.train()
    out = hf(hf_tokens, labels=hf_tokens)
    out.loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    hf.eval()

  return {
    "train": (sj_train, hf_train, 8 * 256),
    "greedy": (sj_decode(256, prompts, 64), hf_decode(prompts, 64), 8 * 64),
    "beam4": (sj_decode(256, prompts, 64, beam_size=4, alpha=0.0), hf_decode(prompts, 64, 4),
              8 * 64),
    "prompt512": (sj_decode(640, long_prompt, 32), hf_decode(long_prompt, 32), 32),
    "ttft": (sj_decode(640, long_prompt, 1), hf_decode(long_prompt, 1), 1),
    "buffer": (sj_decode(4096, prompts, 64), sj_decode(256, prompts, 64), 8 * 64),
  }


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--cases", default="train,greedy,beam4,prompt512,ttft,buffer")
  ap.add_argument("--rounds", type=int, default=5)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  from slicjax.interop import load_hf_checkpoint

  with tempfile.TemporaryDirectory() as path:
    hf = build_hf(args, path)
    n_params = sum(p.numel() for p in hf.parameters())
    sj_model, sj_params = load_hf_checkpoint(path, max_len=256)
    diff = check_logits(sj_model, sj_params, hf, args.vocab)
    print(f"# {n_params / 1e6:.1f}M-parameter Llama; max |logit difference| {diff:.2e}; "
          f"JAX {jax.__version__} on {jax.devices()[0].device_kind}, 1 core", flush=True)
    cases = make_cases(args, hf, path)
    results = []
    for name in args.cases.split(","):
      sj, ref, tokens = cases[name]
      warm_sj, warm_ref = _time(sj), _time(ref)  # compile / warm up
      sj_s, ref_s = [], []
      for _ in range(args.rounds):
        sj_s.append(_time(sj))
        ref_s.append(_time(ref))
      ratios = [r / s for s, r in zip(sj_s, ref_s)]
      row = dict(
        case=name, tokens=tokens, sj_s=statistics.median(sj_s), other_s=statistics.median(ref_s),
        ratio=statistics.median(ratios), ratio_min=min(ratios), ratio_max=max(ratios),
        sj_first_s=warm_sj, other_first_s=warm_ref,
      )
      results.append(row)
      if name == "buffer":  # both sides are slicjax: 4096-slot time / 256-slot time
        print(f"{name:10s} per-token time 4096 slots / 256 slots = "
              f"{1 / row['ratio']:.2f} [{1 / row['ratio_max']:.2f}, {1 / row['ratio_min']:.2f}]  "
              f"(4096: {row['sj_s']:.3f} s, 256: {row['other_s']:.3f} s)", flush=True)
      else:
        print(f"{name:10s} ratio {row['ratio']:.2f} [{row['ratio_min']:.2f}, "
              f"{row['ratio_max']:.2f}]  slicjax {row['sj_s']:.3f} s ({tokens / row['sj_s']:.0f} "
              f"tok/s), transformers {row['other_s']:.3f} s ({tokens / row['other_s']:.0f} tok/s)"
              f"; first call {warm_sj:.1f} s / {warm_ref:.1f} s", flush=True)
    if args.json:
      with open(args.json, "w") as f:
        json.dump(dict(params=n_params, logit_diff=diff, results=results), f, indent=2)


if __name__ == "__main__":
  main()
