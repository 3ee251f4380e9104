"""Hugging Face tokenizers: ``tokenizer.json`` (the ``tokenizers`` library) or SentencePiece.

:func:`load_hf_tokenizer` returns an :class:`HFTokenizer` with the interface of
:class:`slicjax.data.tokenizer.Tokenizer` (``encode``, ``decode``, ``vocab_size``, special ids).
Special ids are the checkpoint's own (Llama: bos 1, eos 2; T5: pad 0, eos 1, unk 2); an absent
special token is ``None``.
"""

from __future__ import annotations

import json
import os
from typing import Any, Sequence

import numpy as np

SPM_FILES = ("spiece.model", "tokenizer.model")
SPECIALS = ("pad", "eos", "bos", "unk")


def _token_content(tok) -> str | None:
  if isinstance(tok, dict):
    return tok.get("content")
  return tok


def _read_json(path: str) -> dict[str, Any]:
  if os.path.isfile(path):
    with open(path) as f:
      return json.load(f)
  return {}


class HFTokenizer:
  """A checkpoint's tokenizer.

  Attributes:
    pad_id, eos_id, bos_id, unk_id: special ids (``None`` when the tokenizer has none).
    kind: ``"tokenizers"`` or ``"sentencepiece"``.
    chat_template: the checkpoint's Jinja chat template, or ``None`` when it has none.
  """

  def __init__(
    self,
    backend,
    kind: str,
    specials: dict[str, int | None],
    path: str,
    *,
    chat_template: str | None = None,
  ):
    self._backend = backend
    self.kind = kind
    self.path = path
    self.chat_template = chat_template
    self.pad_id = specials.get("pad")
    self.eos_id = specials.get("eos")
    self.bos_id = specials.get("bos")
    self.unk_id = specials.get("unk")

  @property
  def vocab_size(self) -> int:
    if self.kind == "tokenizers":
      return self._backend.get_vocab_size(with_added_tokens=True)
    return self._backend.GetPieceSize()

  def encode(self, text: str, *, add_bos: bool = False, add_eos: bool = False) -> list[int]:
    """Token ids of ``text``; no special tokens unless asked for.

    Raises:
      ValueError: when ``add_bos``/``add_eos`` is asked of a tokenizer without that token.
    """
    if not isinstance(text, str):
      raise TypeError(f"encode expects str, got {type(text).__name__}; decode bytes first.")
    if self.kind == "tokenizers":
      ids = list(self._backend.encode(text, add_special_tokens=False).ids)
    else:
      ids = list(self._backend.EncodeAsIds(text))
    for flag, tid, name in ((add_bos, self.bos_id, "bos"), (add_eos, self.eos_id, "eos")):
      if flag and tid is None:
        raise ValueError(f"this tokenizer has no {name} token; call encode without add_{name}.")
    if add_bos:
      ids = [self.bos_id] + ids
    if add_eos:
      ids = ids + [self.eos_id]
    return ids

  def decode(self, ids: Sequence[int], *, stop_at_eos: bool = True) -> str:
    """Text of ``ids``: stops at the first EOS (unless told not to), drops pad and BOS.

    Raises:
      ValueError: for an id outside the vocabulary.
    """
    keep = []
    for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist():
      if stop_at_eos and i == self.eos_id:
        break
      if i in (self.pad_id, self.bos_id, self.eos_id):
        continue
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size}).")
      keep.append(i)
    if self.kind == "tokenizers":
      return self._backend.decode(keep, skip_special_tokens=False)
    return self._backend.DecodeIds(keep)

  def __repr__(self) -> str:
    return (
      f"HFTokenizer({self.path}, {self.kind}, vocab_size={self.vocab_size}, pad={self.pad_id}, "
      f"eos={self.eos_id}, bos={self.bos_id}, unk={self.unk_id})"
    )


def _specials_from_config(directory: str, lookup) -> dict[str, int | None]:
  """Special ids from tokenizer_config.json / special_tokens_map.json, then config.json."""
  out: dict[str, int | None] = {}
  tok_cfg = _read_json(os.path.join(directory, "tokenizer_config.json"))
  special_map = _read_json(os.path.join(directory, "special_tokens_map.json"))
  model_cfg = _read_json(os.path.join(directory, "config.json"))
  for name in SPECIALS:
    content = _token_content(tok_cfg.get(f"{name}_token")) or _token_content(
      special_map.get(f"{name}_token")
    )
    tid = lookup(content) if content else None
    if tid is None and model_cfg.get(f"{name}_token_id") is not None:
      tid = model_cfg[f"{name}_token_id"]
      tid = tid[0] if isinstance(tid, list) else tid
    out[name] = tid
  return out


def _chat_template(directory: str) -> str | None:
  """``chat_template.jinja``, else tokenizer_config.json's ``chat_template`` (the default one)."""
  jinja = os.path.join(directory, "chat_template.jinja")
  if os.path.isfile(jinja):
    with open(jinja) as f:
      return f.read()
  template = _read_json(os.path.join(directory, "tokenizer_config.json")).get("chat_template")
  if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}, ...]
    named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
    template = named.get("default")
  return template if isinstance(template, str) else None


def load_hf_tokenizer(path: str) -> HFTokenizer:
  """Loads the tokenizer of a Hugging Face checkpoint directory (or one tokenizer file).

  ``tokenizer.json`` is preferred; otherwise ``spiece.model`` (T5) or ``tokenizer.model``
  (SentencePiece Llama). Special tokens come from ``tokenizer_config.json`` /
  ``special_tokens_map.json`` / ``config.json``, falling back to the SentencePiece model's own;
  the chat template from ``chat_template.jinja`` or tokenizer_config.json's ``chat_template``.

  Raises:
    FileNotFoundError: when no tokenizer file is found, naming the files looked for.
  """
  if os.path.isfile(path):
    directory, files = os.path.dirname(path), [path]
  elif os.path.isdir(path):
    directory = path
    files = [os.path.join(path, f) for f in ("tokenizer.json",) + SPM_FILES]
    files = [f for f in files if os.path.isfile(f)]
  else:
    raise FileNotFoundError(f"tokenizer path {path} does not exist; pass a local directory.")
  if not files:
    raise FileNotFoundError(
      f"no tokenizer.json, spiece.model or tokenizer.model in {path}; copy the model's "
      "tokenizer files there."
    )
  fn = files[0]
  if fn.endswith(".json"):
    try:
      from tokenizers import Tokenizer
    except ImportError as e:  # pragma: no cover
      raise ImportError(
        "tokenizer.json needs the tokenizers package: pip install 'slicjax[hf]'."
      ) from e
    backend = Tokenizer.from_file(fn)
    specials = _specials_from_config(directory, backend.token_to_id)
    return HFTokenizer(backend, "tokenizers", specials, fn, chat_template=_chat_template(directory))
  import sentencepiece as spm

  backend = spm.SentencePieceProcessor()
  backend.Load(fn)

  def lookup(piece):
    i = backend.PieceToId(piece)
    return None if i == backend.unk_id() and piece != backend.IdToPiece(i) else i

  specials = _specials_from_config(directory, lookup)
  own = {
    "pad": backend.pad_id(),
    "eos": backend.eos_id(),
    "bos": backend.bos_id(),
    "unk": backend.unk_id(),
  }
  for name in SPECIALS:
    if specials[name] is None and own[name] >= 0:
      specials[name] = own[name]
  return HFTokenizer(
    backend, "sentencepiece", specials, fn, chat_template=_chat_template(directory)
  )
