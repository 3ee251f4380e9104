"""Hugging Face Llama / Qwen2 interop: logits, cached decoding, greedy, export, sharding, errors.

Every reference number comes from ``transformers`` running a tiny randomly initialised model that
the test builds and saves itself (no downloads).
"""

import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the hf extra (torch) is not installed")
transformers = pytest.importorskip("transformers", reason="the hf extra is not installed")

from jax.sharding import PartitionSpec as P  # noqa: E402
from safetensors.numpy import load_file, save_file  # noqa: E402

from slicjax import sharding  # noqa: E402
from slicjax.decoding.sampling import greedy_search  # noqa: E402
from slicjax.interop import (  # noqa: E402
  export_hf_checkpoint,
  load_hf_checkpoint,
  load_hf_tokenizer,
)
from slicjax.interop.hf_import import abstract_params  # noqa: E402
from slicjax.models.factory import build_model  # noqa: E402

V = 64
SMALL = dict(
  vocab_size=V, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4
)
VARIANTS = {
  "llama_gqa_untied": (
    transformers.LlamaConfig,
    dict(num_key_value_heads=2, tie_word_embeddings=False, rope_theta=5000.0, rms_norm_eps=1e-5),
  ),
  "llama_tied": (transformers.LlamaConfig, dict(num_key_value_heads=4, tie_word_embeddings=True)),
  "qwen2_bias": (transformers.Qwen2Config, dict(num_key_value_heads=2, tie_word_embeddings=False)),
  # The sliding window is longer than every sequence here, as import requires.
  "mistral_gqa": (
    transformers.MistralConfig,
    dict(num_key_value_heads=2, tie_word_embeddings=False, sliding_window=256,
         max_position_embeddings=256),
  ),
}
ARCH = {
  "LlamaConfig": transformers.LlamaForCausalLM,
  "Qwen2Config": transformers.Qwen2ForCausalLM,
  "MistralConfig": transformers.MistralForCausalLM,
}


def _randomize(model, seed):
  """Non-trivial values everywhere (norm scales != 1, biases != 0) so mix-ups show."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif p.ndim == 1:
        p.copy_(0.3 * noise)
      else:
        p.copy_(noise / np.sqrt(p.shape[1]))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_llama")
  out = {}
  for i, (name, (cls, kw)) in enumerate(VARIANTS.items()):
    torch.manual_seed(i)
    cfg = cls(**SMALL, **kw)
    model = _randomize(ARCH[cls.__name__](cfg), seed=i).eval()
    path = str(root / name)
    # one variant sharded, to exercise model.safetensors.index.json
    model.save_pretrained(path, **({"max_shard_size": "20KB"} if name == "qwen2_bias" else {}))
    out[name] = path
  return out


def _hf(path):
  return transformers.AutoModelForCausalLM.from_pretrained(
    path, dtype=torch.float32, attn_implementation="eager"
  ).eval()


def _hf_logits(path, tokens):
  with torch.no_grad():
    return _hf(path)(torch.tensor(np.asarray(tokens))).logits.numpy()


TOKENS = np.random.RandomState(0).randint(3, V, size=(2, 9)).astype(np.int32)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_teacher_forced_logits_match_transformers(hf_dirs, name):
  model, params = load_hf_checkpoint(hf_dirs[name])
  cfg = model.module.cfg
  assert cfg.tie_embeddings == (name == "llama_tied")
  assert cfg.qkv_bias == (name == "qwen2_bias")
  assert cfg.num_kv_heads == VARIANTS[name][1]["num_key_value_heads"]
  assert ("lm_head" in params.get("head", {})) == (name != "llama_tied")
  ref = _hf_logits(hf_dirs[name], TOKENS)
  assert np.std(ref) > 0.3  # the random model is far from uniform: the check has teeth
  got = jax.jit(model.module.apply)({"params": params}, jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decode_steps_match_transformers(hf_dirs, name):
  model, params = load_hf_checkpoint(hf_dirs[name], max_len=16)
  ref = _hf_logits(hf_dirs[name], TOKENS)
  module = model.module
  cache = model._empty_cache(lambda r, t: module.init(r, t, decode=True), TOKENS.shape[0])

  @jax.jit
  def step(tokens, cache):
    logits, mut = module.apply(
      {"params": params, "cache": cache}, tokens, decode=True, mutable=["cache"]
    )
    return logits, mut["cache"]

  # a 3-token prefill chunk, then one token per step
  logits, cache = step(jnp.asarray(TOKENS[:, :3]), cache)
  np.testing.assert_allclose(np.asarray(logits), ref[:, :3], atol=1e-4, rtol=1e-4)
  for t in range(3, TOKENS.shape[1]):
    logits, cache = step(jnp.asarray(TOKENS[:, t : t + 1]), cache)
    np.testing.assert_allclose(np.asarray(logits[:, 0]), ref[:, t], atol=1e-4, rtol=1e-4)


def _greedy(step, tokens, cache, n):
  """Greedy decoding with the library's loop (stops rows at EOS = 1, pads with 0)."""
  run = jax.jit(lambda c: greedy_search(step, tokens, c, max_len=n, eos_id=1, pad_id=0))
  result = run(cache)
  return np.asarray(result.tokens_BxKxL[:, 0]), np.asarray(result.lengths_BxK[:, 0])


def test_greedy_prefix_lm_decoding_matches_transformers_generate(hf_dirs):
  path = hf_dirs["llama_gqa_untied"]
  model, params = load_hf_checkpoint(path, max_len=24)
  prompts = [[5, 9, 17, 4, 30], [11, 7]]
  inputs = np.zeros((2, 5), np.int32)
  for i, p in enumerate(prompts):
    inputs[i, : len(p)] = p
  n = 8
  step, tokens, cache = model.decode_state(params, jnp.asarray(inputs), max_len=n)
  ours, lengths = _greedy(step, tokens, cache, n)
  hf = _hf(path)
  hf.generation_config.eos_token_id = 1  # slicjax's EOS; HF's Llama default (2) is our BOS
  for i, p in enumerate(prompts):
    prompt = torch.tensor([p + [2]])  # the prefix-LM layout: inputs + [BOS]
    out = hf.generate(prompt, max_new_tokens=n, do_sample=False, num_beams=1, pad_token_id=0)
    want = np.zeros(n, np.int64)
    gen = out[0, len(p) + 1 :].numpy()
    want[: len(gen)] = gen
    np.testing.assert_array_equal(ours[i], want)
  assert lengths.min() >= 4  # long enough to compare several steps
  assert len(set(ours.reshape(-1).tolist())) > 2  # not a degenerate constant sequence


def _native(**kw):
  base = dict(
    family="transformer",
    vocab_size=V,
    d_model=32,
    num_heads=4,
    num_kv_heads=2,
    head_dim=8,
    d_ff=48,
    num_layers=2,
    max_len=32,
  )
  return build_model({**base, **kw})


def _random_params(model, seed):
  """Random values for every parameter, straight from the shapes (no init compile)."""
  rng = np.random.RandomState(seed)

  def draw(path, a):
    if "norm" in jax.tree_util.keystr(path):
      return (1.0 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
    return (0.3 * rng.standard_normal(a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(model)))


@pytest.mark.parametrize(
  "kw",
  [
    dict(tie_embeddings=False, rope_theta=1234.0),
    dict(tie_embeddings=True),
    dict(qkv_bias=True, tie_embeddings=False),
  ],
  ids=["untied", "tied", "qwen2"],
)
def test_export_loads_in_transformers_and_round_trips_exactly(tmp_path, kw):
  model = _native(**kw)
  params = _random_params(model, 4)
  out = export_hf_checkpoint(model, params, str(tmp_path / "hf"))
  cfg = json.load(open(os.path.join(out, "config.json")))
  assert cfg["architectures"] == ["Qwen2ForCausalLM" if kw.get("qkv_bias") else "LlamaForCausalLM"]
  ours = np.asarray(jax.jit(model.module.apply)({"params": params}, jnp.asarray(TOKENS)))
  np.testing.assert_allclose(_hf_logits(out, TOKENS), ours, atol=1e-4, rtol=1e-4)
  model2, params2 = load_hf_checkpoint(out, max_len=32)
  assert model2.module.cfg == model.module.cfg
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2
  )


def test_sharded_load_matches_unsharded_and_is_sharded(hf_dirs):
  mesh = sharding.make_mesh((2, 2, 2))
  path = hf_dirs["qwen2_bias"]  # saved as 6 safetensors shards with an index
  assert os.path.isfile(os.path.join(path, "model.safetensors.index.json"))
  _, plain = load_hf_checkpoint(path)
  model, sharded = load_hf_checkpoint(path, mesh=mesh)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), plain, sharded
  )
  q = sharded["decoder"]["layer_0"]["self_attention"]["query"]["kernel"]  # [D, H, K]
  assert q.sharding.spec == P("fsdp", "tensor", None)
  assert q.addressable_shards[0].data.shape == (16, 2, 8)
  emb = sharded["token_embed"]["embedding"]  # [V, D] over (tensor, fsdp)
  assert emb.addressable_shards[0].data.shape == (V // 2, 16)
  bias = sharded["decoder"]["layer_1"]["self_attention"]["key"]["bias"]  # [G, K]
  assert bias.sharding.spec == P("tensor", None)
  ref = _hf_logits(path, TOKENS)
  with sharding.use_mesh(mesh):
    got = jax.jit(lambda p, t: model.module.apply({"params": p}, t))(sharded, jnp.asarray(TOKENS))
  np.testing.assert_allclose(np.asarray(got), ref, atol=1e-4, rtol=1e-4)


def test_bfloat16_checkpoint_loads_exact_values(tmp_path, hf_dirs):
  hf = _hf(hf_dirs["llama_tied"]).to(torch.bfloat16)
  hf.save_pretrained(str(tmp_path / "bf16"))
  model, params = load_hf_checkpoint(str(tmp_path / "bf16"), dtype="float32")
  want = hf.model.layers[1].mlp.down_proj.weight.detach().float().numpy().T  # [F, D]
  got = params["decoder"]["layer_1"]["mlp"]["down"]["kernel"]
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), want)
  _, p16 = load_hf_checkpoint(str(tmp_path / "bf16"), dtype="bfloat16")
  assert p16["token_embed"]["embedding"].dtype == jnp.bfloat16


# --- errors ---------------------------------------------------------------------------------


def _copy(src, dst, edit_config=None, edit_tensors=None):
  os.makedirs(dst)
  cfg = json.load(open(os.path.join(src, "config.json")))
  if edit_config:
    edit_config(cfg)
  json.dump(cfg, open(os.path.join(dst, "config.json"), "w"))
  tensors = load_file(os.path.join(src, "model.safetensors"))
  if edit_tensors:
    edit_tensors(tensors)
  save_file(tensors, os.path.join(dst, "model.safetensors"), {"format": "pt"})
  return dst


def test_bad_checkpoints_raise_naming_the_problem(hf_dirs, tmp_path):
  src = hf_dirs["llama_gqa_untied"]
  cases = [
    (
      dict(edit_config=lambda c: c.update(architectures=["GPT2LMHeadModel"])),
      "unsupported architecture.*GPT2LMHeadModel",
    ),
    (
      dict(edit_tensors=lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
      "lacks tensor.*model.layers.1.mlp.up_proj.weight",
    ),
    (
      dict(
        edit_tensors=lambda t: t.update(
          {"model.layers.2.mlp.up_proj.weight": np.zeros((2, 2), np.float32)}
        )
      ),
      "unexpected tensor.*model.layers.2.mlp.up_proj.weight",
    ),
    (
      dict(edit_config=lambda c: c.update(intermediate_size=48)),
      "tensor model\\.layers\\.0\\.mlp\\.\\w+_proj\\.weight has shape .* config.json implies",
    ),
    (
      dict(edit_tensors=lambda t: t.update({"model.norm.weight": np.ones(32, np.int8)})),
      "model.norm.weight has dtype I8",
    ),
    (
      dict(
        edit_config=lambda c: c.update(rope_parameters={"rope_type": "llama3", "rope_theta": 1e4})
      ),
      "RoPE type 'llama3'",
    ),
    (dict(edit_config=lambda c: c.update(hidden_act="gelu")), "hidden_act='gelu'"),
  ]
  for i, (kw, pattern) in enumerate(cases):
    bad = _copy(src, str(tmp_path / f"bad{i}"), **kw)
    with pytest.raises(ValueError, match=pattern):
      load_hf_checkpoint(bad)
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_hf_checkpoint(str(tmp_path / "nowhere"))
  os.makedirs(tmp_path / "bin_only")
  json.dump({}, open(tmp_path / "bin_only" / "config.json", "w"))
  open(tmp_path / "bin_only" / "pytorch_model.bin", "w").close()
  with pytest.raises(FileNotFoundError, match="safetensors"):
    load_hf_checkpoint(str(tmp_path / "bin_only"))


def test_export_rejects_configs_llama_cannot_express(tmp_path):
  model = _native(norm="layer", position="learned")
  params = _random_params(model, 0)
  with pytest.raises(ValueError, match="norm='layer'.*position='learned'"):
    export_hf_checkpoint(model, params, str(tmp_path / "x"))
  with pytest.raises(ValueError, match="params do not match"):
    export_hf_checkpoint(_native(), {"token_embed": params["token_embed"]}, str(tmp_path / "y"))


# --- tokenizer.json -------------------------------------------------------------------------


def test_tokenizer_json_encode_decode_and_special_ids(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4, "big": 5}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.decoder = tokenizers.decoders.WordPiece()  # joins words with spaces
  tok.save(str(tmp_path / "tokenizer.json"))
  json.dump(
    {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "unk_token": "<unk>"},
    open(tmp_path / "tokenizer_config.json", "w"),
  )
  t = load_hf_tokenizer(str(tmp_path))
  assert (t.bos_id, t.eos_id, t.unk_id, t.pad_id) == (1, 2, 0, None)
  assert t.vocab_size == 6
  assert t.encode("hello big world zebra") == [3, 5, 4, 0]
  assert t.encode("hello", add_bos=True, add_eos=True) == [1, 3, 2]
  assert t.decode([1, 3, 4, 2, 5]) == "hello world"  # drops BOS, stops at EOS
  with pytest.raises(ValueError, match="no pad token|outside the vocabulary"):
    t.decode([3, 99])
  os.makedirs(tmp_path / "empty")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    load_hf_tokenizer(str(tmp_path / "empty"))
