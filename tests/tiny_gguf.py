"""A tiny Llama GGUF with a real byte-level BPE tokenizer and a ChatML chat template.

It has SmolLM2's layout of special tokens (``<|endoftext|>`` 0, ``<|im_start|>`` 1,
``<|im_end|>`` 2 = EOS = padding), so the vocabulary map, the chat prompt and every binary are
exercised as with the real model, in seconds instead of minutes.
"""

from __future__ import annotations

import inspect
import json

import numpy as np

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
  "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
  " + '<|im_end|>' + '\n' }}{% endfor %}{% if add_generation_prompt %}"
  "{{ '<|im_start|>assistant\n' }}{% endif %}"
)
D, L, H, G, K, F = 32, 2, 4, 2, 8, 64


def _train_bpe(vocab_size: int):
  import json as json_mod
  import textwrap

  import tokenizers
  from tokenizers import decoders, models, pre_tokenizers, trainers

  texts = [inspect.getsource(m) for m in (json_mod, textwrap)]
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size, special_tokens=SPECIALS,
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
  )
  tok.train_from_iterator(texts, trainer)
  return tok


def write_tiny_gguf(path, *, vocab_size: int = 400, seed: int = 0, context: int = 256) -> str:
  """Writes a 2-layer Llama GGUF (F32) with a byte-level BPE tokenizer; returns ``path``."""
  import gguf

  tok = _train_bpe(vocab_size)
  model = json.loads(tok.to_str())["model"]
  vocab = model["vocab"]
  tokens = [None] * len(vocab)
  for t, i in vocab.items():
    tokens[i] = t
  merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
  v = len(tokens)
  rng = np.random.default_rng(seed)

  def mat(*shape, scale=0.2):
    return (rng.standard_normal(shape) * scale).astype(np.float32)

  w = gguf.GGUFWriter(str(path), "llama")
  w.add_name("tiny chat model")
  w.add_context_length(context)
  w.add_embedding_length(D)
  w.add_block_count(L)
  w.add_feed_forward_length(F)
  w.add_head_count(H)
  w.add_head_count_kv(G)
  w.add_rope_dimension_count(K)
  w.add_rope_freq_base(10000.0)
  w.add_layer_norm_rms_eps(1e-5)
  w.add_vocab_size(v)
  w.add_tokenizer_model("gpt2")
  w.add_tokenizer_pre("smollm")
  w.add_token_list(tokens)
  w.add_token_types([3 if t in SPECIALS else 1 for t in tokens])
  w.add_token_merges(merges)
  w.add_bos_token_id(1)
  w.add_eos_token_id(2)
  w.add_unk_token_id(0)
  w.add_pad_token_id(2)
  w.add_add_bos_token(False)
  w.add_chat_template(CHATML)
  w.add_tensor("token_embd.weight", mat(v, D, scale=0.5))
  w.add_tensor("output_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
  for i in range(L):
    p = f"blk.{i}."
    w.add_tensor(p + "attn_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    w.add_tensor(p + "ffn_norm.weight", (1.0 + 0.1 * rng.standard_normal(D)).astype(np.float32))
    w.add_tensor(p + "attn_q.weight", mat(H * K, D))
    w.add_tensor(p + "attn_k.weight", mat(G * K, D))
    w.add_tensor(p + "attn_v.weight", mat(G * K, D))
    w.add_tensor(p + "attn_output.weight", mat(D, H * K))
    w.add_tensor(p + "ffn_gate.weight", mat(F, D))
    w.add_tensor(p + "ffn_up.weight", mat(F, D))
    w.add_tensor(p + "ffn_down.weight", mat(D, F))
  w.write_header_to_file()
  w.write_kv_data_to_file()
  w.write_tensors_to_file()
  w.close()
  return str(path)
