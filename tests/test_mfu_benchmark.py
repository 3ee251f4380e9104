"""benchmarks/mfu.py: the FLOP formula against a hand count, the peak lookup, and a 2-step CPU
run of ``main`` with the tiny config (MFU = achieved / peak when --peak is given)."""

import importlib.util
import pathlib

import numpy as np
import pytest

from slicjax.models.transformer import TransformerConfig

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "mfu.py"
_spec = importlib.util.spec_from_file_location("mfu_benchmark", _PATH)
mfu = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mfu)


def test_flops_formula_by_hand():
  cfg = TransformerConfig(vocab_size=100, d_model=8, num_heads=2, num_kv_heads=1, head_dim=4,
                          d_ff=16, num_layers=3, tie_embeddings=False)
  # per layer: q 8*8 + k 8*4 + v 8*4 + out 8*8 = 192; swiglu 3*8*16 = 384; 2 RMSNorm scales 16
  per_layer = 192 + 384 + 16
  n = 3 * per_layer + 8 + 100 * 8  # + final norm + vocabulary projection (embedding excluded)
  assert mfu.matmul_params(cfg) == n == 2584
  seq = 32
  assert mfu.flops_per_token(cfg, seq) == 6 * 2584 + 12 * 3 * 2 * 4 * seq == 24720
  # the tiny benchmark config: params in the model minus the embedding table
  tiny = TransformerConfig(**mfu.CONFIGS["tiny"])
  assert mfu.matmul_params(tiny) == 90_432  # 106,816 params - 256 * 64 embedding


def test_peak_lookup():
  assert mfu.peak_flops("NVIDIA H100 80GB HBM3") == 989e12
  assert mfu.peak_flops("NVIDIA H200") == 989e12
  assert mfu.peak_flops("NVIDIA A100-SXM4-40GB") == 312e12
  assert mfu.peak_flops("TPU v4") == 275e12
  assert mfu.peak_flops("TPU v5 lite") == 197e12
  assert mfu.peak_flops("TPU v5e") == 197e12
  assert mfu.peak_flops("TPU v5p") == 459e12
  assert mfu.peak_flops("TPU v5") == 459e12
  assert mfu.peak_flops("cpu") is None


def test_main_tiny_two_steps_on_cpu(capsys):
  # scanned layers: also trains the stacked params sharded over the test's 8-device mesh
  r = mfu.main(["--tiny", "--steps=2", "--warmup=1", "--seq=16", "--peak=1e12", "--scan_layers"])
  out = capsys.readouterr().out
  assert len(r["step_s_all"]) == 2 and r["step_s"] > 0 and r["scan_layers"]
  assert np.isfinite(r["loss"])
  cfg = TransformerConfig(**mfu.CONFIGS["tiny"])
  assert r["model_flops_per_step"] == mfu.flops_per_token(cfg, 16) * r["batch"] * 16
  assert r["achieved_flops"] == pytest.approx(r["model_flops_per_step"] / r["step_s"])
  assert r["mfu"] == pytest.approx(r["achieved_flops"] / (1e12 * r["n_devices"]))
  assert r["xla_flops_per_step"] is None or r["xla_flops_per_step"] > 0
  assert "| device | config | tokens/s | TFLOP/s | MFU |" in out
  assert f"{100 * r['mfu']:.1f}%" in out.splitlines()[-1]


def test_unknown_device_reports_mfu_unavailable(capsys, monkeypatch):
  seen = {}

  def fake_run(**kw):
    seen.update(kw)
    return dict(device="cpu", n_devices=1, config="tiny", params=1000, matmul_params=900,
                batch=8, seq=16, dtype="bfloat16", scan_layers=True, remat=True, compile_s=1.0,
                step_s=0.5, step_s_all=[0.5], tokens_per_s=256.0, model_flops_per_step=2e9,
                xla_flops_per_step=None, achieved_flops=4e9, peak_flops=None, mfu=None, loss=1.0)

  monkeypatch.setattr(mfu, "run", fake_run)
  mfu.main(["--config=tiny", "--scan_layers", "--remat", "--batch=8", "--dtype=float32"])
  assert seen["scan_layers"] and seen["remat"] and seen["batch"] == 8
  assert seen["dtype"] == "float32" and seen["peak"] is None
  out = capsys.readouterr().out
  assert "MFU unavailable" in out and "4.0000e+09 FLOP/s" in out
  assert out.splitlines()[-1].endswith("| n/a (unknown peak; pass --peak) |")
