"""Where the MLE train step spends its time: a ``jax.profiler`` trace aggregated by model part.

  python benchmarks/profile_train_step.py                  # the vs_hf.py Llama, one core
  python benchmarks/profile_train_step.py --d_model=128 --layers=2 --vocab=512 --steps=1

The model is the one ``benchmarks/vs_hf.py`` trains (Llama layout: d 256, 4 layers, 4 heads,
SwiGLU 688, RMSNorm, RoPE, untied head, V 8192), built directly from a ``TransformerConfig``
(no PyTorch needed); the step is ``training.make_train_step`` on prefix-LM rows of 128 input +
BOS + 128 target tokens, float32, AdamW. The process is pinned to one core and XLA to one
thread per op, as in vs_hf.py. After a warm-up the step is timed (best of ``--repeats``), then
``--steps`` steps are traced with ``jax.profiler`` (Perfetto trace), every executed XLA op is
matched to the ``op_name`` its HLO instruction carries, and the time is summed per part:

* the module from the Flax path: ``head`` (the vocabulary projection), ``attention`` (RoPE
  included), ``mlp``, ``norm``, ``embedding``, or ``loss/glue`` (cross-entropy, the gather of
  target positions, casts and copies outside any module);
* the phase from JAX's autodiff wrappers: ``forward``, ``backward``, or ``optimizer update``
  (AdamW, the gradient norm and metrics: ops after the gradient).

Printed: the step time and a table of milliseconds per step and share per part, then the
``--top`` most expensive ops with their HLO op names.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import os
import re
import tempfile
import time

os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
os.environ["XLA_FLAGS"] = " ".join(
  [os.environ.get("XLA_FLAGS", ""), "--xla_cpu_multi_thread_eigen=false",
   "intra_op_parallelism_threads=1"]
).strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402

# (module, regular expression on the HLO op_name), first match wins
MODULES = [
  ("head", r"lm_head|logits_from_hidden|/attend"),
  ("attention", r"self_attention"),
  ("mlp", r"/mlp/"),
  ("norm", r"norm"),
  ("embedding", r"token_embed"),
]


def build(args):
  from slicjax import optim, sharding, training
  from slicjax.models.factory import build_model

  model = build_model(dict(
    family="transformer", vocab_size=args.vocab, d_model=args.d_model, num_layers=args.layers,
    num_heads=args.heads, num_kv_heads=args.heads, head_dim=args.d_model // args.heads,
    d_ff=int(args.d_model * 2.6875), norm="rms", position="rope", mlp="swiglu",
    tie_embeddings=False, max_len=2 * args.seq + 1,
  ))
  mesh = sharding.make_mesh()
  tx, _ = optim.make_optimizer(dict(learning_rate=1e-4, warmup_steps=0), 10_000)
  state, sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(0),
    init_kwargs=dict(input_len=args.seq, target_len=args.seq),
  )
  step = training.make_train_step(training.mle_loss_fn(model), tx, mesh, sh)
  rng = np.random.default_rng(0)
  batch = sharding.shard_batch({
    "inputs": rng.integers(3, args.vocab, (args.batch, args.seq)).astype(np.int32),
    "targets": rng.integers(3, args.vocab, (args.batch, args.seq)).astype(np.int32),
  }, mesh)
  with sharding.use_mesh(mesh):
    hlo = step.jitted.lower(state, batch).compile().as_text()
  return step, state, batch, hlo


def op_names(hlo: str) -> dict[str, str]:
  """HLO instruction name -> the op_name of its metadata (fusions: their own or a callee's)."""
  out = {}
  for m in re.finditer(r"%([\w.\-]+) = [^\n]*?metadata=\{op_name=\"([^\"]*)\"", hlo):
    out.setdefault(m.group(1), m.group(2))
  return out


def part_of(op_name: str) -> str:
  """``module phase``: phase from JAX's autodiff wrappers in the op name (``jvp(...)`` forward,
  ``transpose(jvp(...))`` backward, neither: the optimizer update and metrics after the
  gradient); module from the Flax path (``loss/glue`` for ops outside any module)."""
  if "transpose(jvp" in op_name:
    phase = "backward"
  elif "jvp(" in op_name:
    phase = "forward"
  else:
    return "optimizer update"
  for module, pattern in MODULES:
    if re.search(pattern, op_name):
      return f"{module} {phase}"
  return f"loss/glue {phase}"


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--vocab", type=int, default=8192)
  ap.add_argument("--d_model", type=int, default=256)
  ap.add_argument("--layers", type=int, default=4)
  ap.add_argument("--heads", type=int, default=4)
  ap.add_argument("--batch", type=int, default=8)
  ap.add_argument("--seq", type=int, default=128, help="input and target length each")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--steps", type=int, default=2, help="steps traced")
  ap.add_argument("--top", type=int, default=12)
  ap.add_argument("--json", default="")
  args = ap.parse_args()

  step, state, batch, hlo = build(args)
  state, m = step(state, batch)
  jax.block_until_ready(m["loss"])
  times = []
  for _ in range(args.repeats):
    t0 = time.perf_counter()
    state, m = step(state, batch)
    jax.block_until_ready(m["loss"])
    times.append(time.perf_counter() - t0)
  with tempfile.TemporaryDirectory() as d:
    jax.profiler.start_trace(d, create_perfetto_trace=True)
    for _ in range(args.steps):
      state, m = step(state, batch)
      jax.block_until_ready(m["loss"])
    jax.profiler.stop_trace()
    traces = sorted(glob.glob(os.path.join(d, "**", "*.trace.json.gz"), recursive=True))
    if not traces:
      raise SystemExit(f"jax.profiler wrote no Perfetto trace under {d}; nothing to aggregate.")
    with gzip.open(traces[-1]) as f:
      events = json.load(f)["traceEvents"]

  names = op_names(hlo)
  per_part, per_op = collections.Counter(), collections.Counter()
  for e in events:
    if e.get("ph") != "X" or "dur" not in e or e["name"] not in names:
      continue
    ms = e["dur"] / 1e3 / args.steps
    per_part[part_of(names[e["name"]])] += ms
    per_op[e["name"]] += ms
  total = sum(per_part.values())
  print(f"# step {min(times):.3f} s (best of {args.repeats}); traced ops {total:.1f} ms/step; "
        f"JAX {jax.__version__} on {jax.default_backend()}, 1 core")
  print(f"{'part':<22}{'ms/step':>10}{'share':>8}")
  for part, ms in per_part.most_common():
    print(f"{part:<22}{ms:>10.1f}{ms / total:>8.1%}")
  print(f"\ntop {args.top} ops:")
  for op, ms in per_op.most_common(args.top):
    print(f"{ms:8.1f} ms  {op:<28} {names[op][:90]}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(dict(step_s=min(times), parts_ms=dict(per_part),
                     top_ops={k: [v, names[k]] for k, v in per_op.most_common(args.top)}), f,
                indent=1)


if __name__ == "__main__":
  main()
