"""Model FLOPs utilization (MFU) of the training step: forward + backward + AdamW update.

  # ~1.1B Llama-style model (TinyLlama-1.1B shape) on one GPU/TPU, bfloat16 compute:
  python benchmarks/mfu.py --batch=4 --seq=2048 --dtype=bfloat16 --scan_layers --remat
  # CPU smoke run:
  python benchmarks/mfu.py --config=tiny --steps=3

The step is a causal-LM pretraining step over ``batch x seq`` tokens: the library's
``TransformerLM`` forward, token cross-entropy (``slicjax.losses.mle``), ``jax.value_and_grad``,
and ``TrainState.apply_gradients`` with AdamW from ``slicjax.optim.make_optimizer``, compiled
like ``slicjax.training.make_train_step`` (sharded over all devices on the ``data`` axis, state
donated). Compile and ``--warmup`` steps are excluded; the reported step time is the median of
``--steps`` timed steps, each ending in ``block_until_ready``.

Model FLOPs (PaLM convention, Chowdhery et al. 2022, "PaLM: Scaling Language Modeling with
Pathways", Appendix B): per token of a training step (forward + backward = 3x forward)

    6 * N + 12 * L * H * Q * T

with N the parameters that take part in a matmul per token, L layers, H query heads, Q head
dimension (H * Q = d_model in the configs here), T the sequence length. N counts every
non-embedding parameter (attention, MLP, norms) plus the vocabulary projection V * D (the LM
head, tied or not, is a real matmul); the token-embedding lookup is a gather and is not counted.
The attention term counts the full T x T score and value matmuls (PaLM's convention; causal
masking does not halve it). Remat recomputation is not model FLOPs: MFU with ``--remat`` counts
the same FLOPs as without. The optimizer update (~10 FLOPs per parameter per step) is ignored.
As a cross-check the script also prints XLA's own count (``compiled.cost_analysis()["flops"]``)
of the compiled step; XLA counts hardware FLOPs (remat included) and counts a ``while`` loop
body once, so with ``--scan_layers`` it sees roughly one layer, not L.

MFU = achieved model FLOP/s / peak dense bfloat16 FLOP/s of all devices used. Peaks (dense, no
sparsity) are looked up from ``jax.devices()[0].device_kind`` in :data:`PEAK_FLOPS`;
``--peak`` overrides (FLOP/s per device, e.g. ``--peak=989e12``). On an unknown device (CPU)
the script prints the achieved FLOP/s and reports MFU as unavailable unless ``--peak`` is given.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from slicjax import optim, sharding, training
from slicjax.losses import mle
from slicjax.models.factory import build_model
from slicjax.models.transformer import TransformerConfig

# Dense bfloat16 peak FLOP/s per device (no structured sparsity), from the vendors' data sheets.
# Matched as substrings of device_kind, case-insensitively, first match wins (so "v5 lite" /
# "v5e" come before "v5p" / "v5").
PEAK_FLOPS: tuple[tuple[str, float], ...] = (
  ("H200", 989e12),
  ("H100", 989e12),  # SXM; the PCIe card is 756e12: pass --peak for it
  ("A100", 312e12),
  ("TPU v4", 275e12),
  ("TPU v5 lite", 197e12),  # v5e reports device_kind "TPU v5 lite"
  ("TPU v5e", 197e12),
  ("TPU v5p", 459e12),
  ("TPU v5", 459e12),  # v5p reports device_kind "TPU v5"
)

# Model configs (TransformerConfig fields). "1b" is the TinyLlama-1.1B shape: Llama-2
# architecture (RMSNorm, RoPE, SwiGLU, untied head) with grouped-query attention (4 KV heads).
CONFIGS: dict[str, dict[str, Any]] = {
  "1b": dict(vocab_size=32000, d_model=2048, num_heads=32, num_kv_heads=4, head_dim=64,
             d_ff=5632, num_layers=22, tie_embeddings=False, cache_bucket=0),
  "tiny": dict(vocab_size=256, d_model=64, num_heads=4, num_kv_heads=2, head_dim=16, d_ff=128,
               num_layers=2, tie_embeddings=False, cache_bucket=0),
}
DEFAULT_SEQ = {"1b": 2048, "tiny": 64}
DEFAULT_BATCH = {"1b": 4, "tiny": 8}


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind, or None if unknown."""
  kind = device_kind.lower()
  for name, peak in PEAK_FLOPS:
    if name.lower() in kind:
      return peak
  return None


def matmul_params(cfg: TransformerConfig) -> int:
  """N of the FLOP formula: non-embedding parameters plus the vocabulary projection V * D."""
  d, h, g, k, f = cfg.d_model, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.d_ff
  attn = d * h * k + 2 * d * g * k + h * k * d
  if cfg.use_bias:
    attn += h * k + 2 * g * k + d
  elif cfg.qkv_bias:
    attn += h * k + 2 * g * k
  n_mats = 3 if cfg.mlp in ("swiglu", "geglu") else 2
  mlp = n_mats * d * f + ((n_mats - 1) * f + d if cfg.use_bias else 0)
  norms = (2 if cfg.norm == "rms" else 4) * d  # two per block (LayerNorm: scale and bias)
  final_norm = d if cfg.norm == "rms" else 2 * d
  return cfg.num_layers * (attn + mlp + norms) + final_norm + cfg.vocab_size * d


def flops_per_token(cfg: TransformerConfig, seq: int) -> float:
  """Training FLOPs per token: 6 * N + 12 * L * H * Q * T (PaLM, Appendix B)."""
  return 6.0 * matmul_params(cfg) + 12.0 * cfg.num_layers * cfg.num_heads * cfg.head_dim * seq


def _xla_flops(compiled) -> float | None:
  try:
    cost = compiled.cost_analysis()
  except Exception:  # some backends do not implement it
    return None
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or "flops" not in cost:
    return None
  return float(cost["flops"])


def run(
  config: str = "tiny", batch: int | None = None, seq: int | None = None, steps: int = 10,
  warmup: int = 2, dtype: str = "bfloat16", scan_layers: bool = False, remat: bool = False,
  peak: float | None = None, seed: int = 0,
) -> dict[str, Any]:
  """Builds, compiles and times the train step; returns the measurements as a dict."""
  if config not in CONFIGS:
    raise ValueError(f"unknown --config {config!r}; choose from {sorted(CONFIGS)}.")
  if steps < 1 or warmup < 0:
    raise ValueError(f"need steps >= 1 and warmup >= 0, got steps={steps} warmup={warmup}.")
  batch = batch or DEFAULT_BATCH[config]
  seq = seq or DEFAULT_SEQ[config]
  n_dev = jax.device_count()
  if batch % n_dev:
    raise ValueError(f"--batch={batch} must be a multiple of the device count {n_dev}.")
  model_cfg = dict(CONFIGS[config], max_len=seq, dtype=dtype, param_dtype="float32",
                   scan_layers=scan_layers, remat=remat)
  model = build_model(model_cfg)
  module = model.module
  cfg: TransformerConfig = module.cfg

  tx, _ = optim.make_optimizer(dict(name="adamw", learning_rate=1e-4, weight_decay=0.1),
                               warmup + steps + 1)
  mesh = sharding.make_mesh()
  state, state_sh = training.create_train_state(
    model, tx, mesh, jax.random.PRNGKey(seed), init_kwargs=dict(input_len=1, target_len=1)
  )
  n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state.params))

  def loss_fn(params, tokens_BxT1):
    logits_BxTxV = module.apply({"params": params}, tokens_BxT1[:, :-1])
    loss_BxT, _ = mle.token_cross_entropy(logits_BxTxV, tokens_BxT1[:, 1:])
    return jnp.mean(loss_BxT)

  def step(state, tokens_BxT1):
    loss, grads = jax.value_and_grad(loss_fn)(state.params, tokens_BxT1)
    return state.apply_gradients(grads, tx), loss

  batch_sh = NamedSharding(mesh, PartitionSpec(("data", "fsdp")))
  jitted = jax.jit(step, in_shardings=(state_sh, batch_sh), out_shardings=(state_sh, None),
                   donate_argnums=(0,))
  rng = np.random.default_rng(seed)
  tokens = rng.integers(4, cfg.vocab_size, (batch, seq + 1)).astype(np.int32)
  tokens = jax.device_put(tokens, batch_sh)

  with sharding.use_mesh(mesh):
    t0 = time.perf_counter()
    compiled = jitted.lower(state, tokens).compile()
    compile_s = time.perf_counter() - t0
    for _ in range(warmup):
      state, loss = compiled(state, tokens)
      jax.block_until_ready((state, loss))
    times = []
    for _ in range(steps):
      t0 = time.perf_counter()
      state, loss = compiled(state, tokens)
      jax.block_until_ready((state, loss))
      times.append(time.perf_counter() - t0)
  step_s = statistics.median(times)

  tokens_per_step = batch * seq
  model_flops = flops_per_token(cfg, seq) * tokens_per_step
  xla_flops = _xla_flops(compiled)
  kind = jax.devices()[0].device_kind
  per_device_peak = peak if peak is not None else peak_flops(kind)
  achieved = model_flops / step_s
  mfu = achieved / (per_device_peak * n_dev) if per_device_peak else None
  return dict(
    device=kind, n_devices=n_dev, config=config, params=n_params,
    matmul_params=matmul_params(cfg), batch=batch, seq=seq, dtype=dtype,
    scan_layers=scan_layers, remat=remat, compile_s=compile_s, step_s=step_s,
    step_s_all=times, tokens_per_s=tokens_per_step / step_s, model_flops_per_step=model_flops,
    xla_flops_per_step=xla_flops, achieved_flops=achieved, peak_flops=per_device_peak,
    mfu=mfu, loss=float(loss),
  )


def markdown_row(r: dict[str, Any]) -> str:
  mfu = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "n/a (unknown peak; pass --peak)"
  flags = ",".join(f for f in ("scan" if r["scan_layers"] else "",
                                "remat" if r["remat"] else "") if f) or "-"
  return (
    f"| {r['device']} x{r['n_devices']} | {r['config']} ({r['params'] / 1e6:.1f}M) "
    f"b{r['batch']} s{r['seq']} {r['dtype']} {flags} | {r['tokens_per_s']:,.0f} | "
    f"{r['achieved_flops'] / 1e12:.4g} | {mfu} |"
  )


HEADER = "| device | config | tokens/s | TFLOP/s | MFU |\n|---|---|---|---|---|"


def main(argv: list[str] | None = None) -> dict[str, Any]:
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--config", default="1b", choices=sorted(CONFIGS))
  ap.add_argument("--tiny", action="store_true", help="same as --config=tiny (CPU smoke run)")
  ap.add_argument("--batch", type=int, default=None, help="global batch (default: per config)")
  ap.add_argument("--seq", type=int, default=None, help="tokens per row (default: per config)")
  ap.add_argument("--steps", type=int, default=10, help="timed steps (median reported)")
  ap.add_argument("--warmup", type=int, default=2, help="untimed steps after compiling")
  ap.add_argument("--dtype", default="bfloat16", help="compute dtype; params stay float32")
  ap.add_argument("--scan_layers", action="store_true")
  ap.add_argument("--remat", action="store_true")
  ap.add_argument("--peak", type=float, default=None,
                  help="peak FLOP/s per device; overrides the device_kind lookup")
  a = ap.parse_args(argv)
  r = run(config="tiny" if a.tiny else a.config, batch=a.batch, seq=a.seq, steps=a.steps,
          warmup=a.warmup, dtype=a.dtype, scan_layers=a.scan_layers, remat=a.remat,
          peak=a.peak)
  xla = r["xla_flops_per_step"]
  print(f"device: {r['device']} x{r['n_devices']}; params {r['params']:,} "
        f"(N for FLOPs: {r['matmul_params']:,}); compile {r['compile_s']:.1f} s; "
        f"step median {r['step_s'] * 1e3:.2f} ms over {len(r['step_s_all'])} steps; "
        f"loss {r['loss']:.4f}")
  print(f"model FLOPs/step (6N + 12*L*H*Q*T per token): {r['model_flops_per_step']:.4e}; "
        f"XLA cost_analysis FLOPs/step: {'n/a' if xla is None else f'{xla:.4e}'}"
        + (f" (ratio XLA/model {xla / r['model_flops_per_step']:.3f})" if xla else ""))
  if r["mfu"] is None:
    print(f"MFU unavailable: no peak FLOP/s known for device kind {r['device']!r}; pass "
          f"--peak=<FLOP/s per device>. Achieved: {r['achieved_flops']:.4e} FLOP/s.")
  print(HEADER)
  print(markdown_row(r))
  sys.stdout.flush()
  return r


if __name__ == "__main__":
  main()
