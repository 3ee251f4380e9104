"""Hugging Face T5 interop: relative buckets, logits, cached decoding, greedy, export, tokenizer.

Every reference number comes from ``transformers`` running a tiny randomly initialised T5 that
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

from slicjax.checkpoint import Checkpointer  # noqa: E402
from slicjax.decoding.sampling import greedy_search  # noqa: E402
from slicjax.interop import (  # noqa: E402
  export_from_workdir,
  export_hf_checkpoint,
  load_hf_checkpoint,
  load_hf_tokenizer,
)
from slicjax.interop.hf_import import abstract_params  # noqa: E402
from slicjax.models.factory import build_model  # noqa: E402
from slicjax.models.layers import relative_position_bucket  # noqa: E402

V = 64
SMALL = dict(
  vocab_size=V,
  d_model=32,
  d_kv=8,
  d_ff=48,
  num_layers=2,
  num_decoder_layers=3,
  num_heads=4,
  relative_attention_num_buckets=8,
  relative_attention_max_distance=20,
  decoder_start_token_id=0,
  dropout_rate=0.0,
)
VARIANTS = {
  "t5_v1_0_relu_tied": dict(feed_forward_proj="relu"),
  "t5_v1_1_geglu_untied": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False),
}

INPUTS = np.array([[5, 9, 17, 4, 30, 8, 1], [11, 7, 23, 1, 0, 0, 0]], np.int32)  # padded row 2
TARGETS = np.array([[12, 40, 33, 7, 1], [9, 9, 51, 1, 0]], np.int32)


def _randomize(model, seed):
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g)
      if "layer_norm" in name:
        p.copy_(1.0 + 0.2 * noise)
      elif "relative_attention_bias" in name or name == "shared.weight":
        p.copy_(noise)  # T5 initialises the embedding with unit variance
      else:
        p.copy_(noise / np.sqrt(p.shape[1]))
  return model


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("hf_t5")
  out = {}
  for i, (name, kw) in enumerate(VARIANTS.items()):
    torch.manual_seed(i)
    model = transformers.T5ForConditionalGeneration(transformers.T5Config(**SMALL, **kw))
    if kw.get("tie_word_embeddings") is False:  # give the head its own weights
      model.lm_head.weight = torch.nn.Parameter(torch.empty(V, SMALL["d_model"]))
    _randomize(model, seed=10 + i).eval()
    model.save_pretrained(str(root / name))
    out[name] = str(root / name)
  return out


def _hf(path):
  return transformers.T5ForConditionalGeneration.from_pretrained(
    path, dtype=torch.float32, attn_implementation="eager"
  ).eval()


def _hf_logits(path, inputs, targets):
  with torch.no_grad():
    return _hf(path)(
      input_ids=torch.tensor(inputs),
      attention_mask=torch.tensor(inputs != 0),
      labels=torch.tensor(targets.astype(np.int64)),
    ).logits.numpy()


def test_relative_position_buckets_equal_transformers():
  bucket = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket
  rel = np.arange(-700, 700)
  ours = jax.jit(
    relative_position_bucket, static_argnames=("bidirectional", "num_buckets", "max_distance")
  )
  for nb, md in [(32, 128), (8, 20), (16, 64), (64, 256), (6, 10)]:
    for bidi in (True, False):
      want = bucket(torch.tensor(rel), bidirectional=bidi, num_buckets=nb, max_distance=md).numpy()
      got = ours(jnp.asarray(rel), bidirectional=bidi, num_buckets=nb, max_distance=md)
      np.testing.assert_array_equal(np.asarray(got), want)
      assert len(np.unique(want)) > nb // 2  # the range reaches the log-spaced buckets


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_teacher_forced_logits_match_transformers(hf_dirs, name):
  model, params = load_hf_checkpoint(hf_dirs[name])
  cfg = model.module.cfg
  untied = name.endswith("untied")
  assert (cfg.tie_embeddings, cfg.tied_logit_scale) == ((False, False) if untied else (True, True))
  assert cfg.mlp == ("geglu" if untied else "relu")
  assert (cfg.num_encoder_layers, cfg.num_layers, cfg.decoder_start_id) == (2, 3, 0)
  ref = _hf_logits(hf_dirs[name], INPUTS, TARGETS)
  assert np.std(ref) > 0.3
  batch = {"inputs": jnp.asarray(INPUTS), "targets": jnp.asarray(TARGETS)}
  logits, _ = jax.jit(lambda p, b: model.target_logits(p, b))(params, batch)
  np.testing.assert_allclose(np.asarray(logits), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_cached_decode_state_steps_match_transformers(hf_dirs, name):
  model, params = load_hf_checkpoint(hf_dirs[name], max_len=16)
  ref = _hf_logits(hf_dirs[name], INPUTS, TARGETS)
  step, tokens, cache = model.decode_state(params, jnp.asarray(INPUTS), max_len=8)
  np.testing.assert_array_equal(np.asarray(tokens), [0, 0])
  step = jax.jit(step)
  for t in range(TARGETS.shape[1]):
    logits, cache = step(tokens, cache)
    np.testing.assert_allclose(np.asarray(logits), ref[:, t], atol=1e-4, rtol=1e-4)
    tokens = jnp.asarray(TARGETS[:, t])


def test_greedy_decoding_matches_transformers_generate(hf_dirs):
  path = hf_dirs["t5_v1_1_geglu_untied"]
  model, params = load_hf_checkpoint(path, max_len=16)
  n = 8
  step, tokens, cache = model.decode_state(params, jnp.asarray(INPUTS), max_len=n)
  run = jax.jit(lambda c: greedy_search(step, tokens, c, max_len=n, eos_id=1, pad_id=0))
  result = run(cache)
  ours = np.asarray(result.tokens_BxKxL[:, 0])
  hf = _hf(path)
  hf.generation_config.eos_token_id = 1
  out = hf.generate(
    input_ids=torch.tensor(INPUTS),
    attention_mask=torch.tensor(INPUTS != 0),
    max_new_tokens=n,
    do_sample=False,
    num_beams=1,
    pad_token_id=0,
    use_cache=False,  # transformers' T5 cache assumes equal encoder/decoder depths
  ).numpy()
  assert (out[:, 0] == 0).all()  # decoder start
  want = np.zeros_like(ours)
  want[:, : out.shape[1] - 1] = out[:, 1:]
  np.testing.assert_array_equal(ours, want)
  assert np.asarray(result.lengths_BxK).min() >= 4  # long enough to compare several steps
  assert len(set(ours.reshape(-1).tolist())) > 2


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_export_of_loaded_model_round_trips_exactly(hf_dirs, name, tmp_path):
  model, params = load_hf_checkpoint(hf_dirs[name])
  out = export_hf_checkpoint(model, params, str(tmp_path / "export"), max_shard_bytes=20_000)
  assert os.path.isfile(os.path.join(out, "model.safetensors.index.json"))
  np.testing.assert_allclose(
    _hf_logits(out, INPUTS, TARGETS),
    _hf_logits(hf_dirs[name], INPUTS, TARGETS),
    atol=1e-5,
    rtol=1e-5,
  )
  model2, params2 = load_hf_checkpoint(out)
  assert model2.module.cfg == model.module.cfg
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2
  )


def _native_t5(**kw):
  base = dict(
    family="transformer",
    vocab_size=V,
    d_model=32,
    num_heads=4,
    num_kv_heads=4,
    head_dim=8,
    d_ff=48,
    num_layers=2,
    num_encoder_layers=2,
    position="relative",
    relative_buckets=8,
    relative_max_distance=20,
    mlp="geglu",
    decoder_start_id=0,
    max_len=16,
  )
  return build_model({**base, **kw})


def _random_params(model, seed):
  rng = np.random.RandomState(seed)

  def draw(path, a):
    if "norm" in jax.tree_util.keystr(path):
      return (1.0 + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)
    return (0.3 * rng.standard_normal(a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(draw, nn.unbox(abstract_params(model)))


@pytest.mark.parametrize(
  "kw",
  [
    dict(),
    dict(mlp="relu", tied_logit_scale=True, scale_queries=False),
    dict(mlp="swiglu", tie_embeddings=False),
  ],
  ids=["tied_unscaled_scaled_queries", "t5_classic", "gated_silu_untied"],
)
def test_native_model_exports_to_transformers(tmp_path, kw):
  """slicjax defaults (1/sqrt(d) queries, unscaled tied head) are folded into T5's layout."""
  model = _native_t5(**kw)
  params = _random_params(model, 7)
  out = export_hf_checkpoint(model, params, str(tmp_path / "export"))
  batch = {"inputs": jnp.asarray(INPUTS), "targets": jnp.asarray(TARGETS)}
  ours, _ = jax.jit(lambda p, b: model.target_logits(p, b))(params, batch)
  np.testing.assert_allclose(
    _hf_logits(out, INPUTS, TARGETS), np.asarray(ours), atol=1e-4, rtol=1e-4
  )
  if kw.get("scale_queries") is False:  # a layout T5 expresses as-is: the params come back
    _, params2 = load_hf_checkpoint(out)
    jax.tree.map(
      lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2
    )


def test_export_from_training_workdir(tmp_path):
  model_cfg = dict(
    family="transformer",
    preset="tiny",
    vocab_size=V,
    max_len=16,
    num_encoder_layers=1,
    position="relative",
    mlp="relu",
    num_kv_heads=4,
    tied_logit_scale=True,
    scale_queries=False,
    decoder_start_id=0,
  )
  model = build_model(model_cfg)
  params = _random_params(model, 3)
  workdir = tmp_path / "run"
  ckpt = Checkpointer(str(workdir / "checkpoints"))
  ckpt.save(5, {"params": params, "step": np.int32(5)}, force=True)
  ckpt.close()
  json.dump({"model": model_cfg, "train": {"steps": 5}}, open(workdir / "config.json", "w"))
  out = export_from_workdir(str(workdir), str(tmp_path / "hf"))
  _, params2 = load_hf_checkpoint(out)
  jax.tree.map(
    lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), params, params2
  )
  with pytest.raises(FileNotFoundError, match="config.json"):
    export_from_workdir(str(tmp_path), str(tmp_path / "hf2"))


def test_export_rejects_what_t5_cannot_express(tmp_path):
  model = _native_t5(num_kv_heads=2, position="rope")
  with pytest.raises(ValueError, match="position='rope'.*num_kv_heads=2"):
    export_hf_checkpoint(model, _random_params(model, 0), str(tmp_path / "x"))
  with pytest.raises(ValueError, match="family 'ssm' cannot be exported"):
    export_hf_checkpoint({"family": "ssm"}, {}, str(tmp_path / "y"))


def test_unsupported_t5_activation_raises(hf_dirs, tmp_path):
  bad = tmp_path / "bad"
  bad.mkdir()
  src = hf_dirs["t5_v1_0_relu_tied"]
  cfg = json.load(open(os.path.join(src, "config.json")))
  cfg["feed_forward_proj"] = "gelu"
  json.dump(cfg, open(bad / "config.json", "w"))
  os.symlink(os.path.join(src, "model.safetensors"), bad / "model.safetensors")
  with pytest.raises(ValueError, match="feed_forward_proj='gelu'"):
    load_hf_checkpoint(str(bad))


def test_sentencepiece_tokenizer_t5_special_ids(tmp_path):
  spm = pytest.importorskip("sentencepiece")
  text = ["the cat sat on the mat", "a dog ran to the park", "cats and dogs play"] * 20
  (tmp_path / "corpus.txt").write_text("\n".join(text))
  spm.SentencePieceTrainer.Train(
    input=str(tmp_path / "corpus.txt"),
    model_prefix=str(tmp_path / "spiece"),
    vocab_size=26,
    model_type="unigram",
    pad_id=0,
    eos_id=1,
    unk_id=2,
    bos_id=-1,
  )
  json.dump(
    {"eos_token": "</s>", "pad_token": "<pad>", "unk_token": "<unk>"},
    open(tmp_path / "tokenizer_config.json", "w"),
  )
  tok = load_hf_tokenizer(str(tmp_path))
  assert tok.kind == "sentencepiece"
  assert (tok.pad_id, tok.eos_id, tok.unk_id, tok.bos_id) == (0, 1, 2, None)
  ids = tok.encode("the cat ran", add_eos=True)
  assert ids[-1] == 1 and 1 not in ids[:-1] and min(ids[:-1]) >= 3
  assert tok.decode(ids + [5, 6]) == "the cat ran"  # stops at EOS
  assert tok.decode([0] + ids[:-1] + [0]) == "the cat ran"  # drops padding
  sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "spiece.model"))
  assert "".join(sp.IdToPiece(i) for i in ids[:-1]) == "\u2581the\u2581cat\u2581ran"
  with pytest.raises(ValueError, match="no bos token"):
    tok.encode("x", add_bos=True)
