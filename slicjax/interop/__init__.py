"""Hugging Face interop: load and export T5 and Llama-family checkpoints, load their tokenizers;
load llama.cpp GGUF files (Llama, Qwen2) and their tokenizers.

Needs the ``hf`` extra for ``safetensors`` / ``tokenizers`` (``transformers`` and ``torch`` only
for the tests). No network access: paths are local directories saved with ``save_pretrained``.
"""

from slicjax.interop.gguf_import import (
  GGUFSource,
  gguf_hf_config,
  load_gguf_checkpoint,
  load_gguf_tokenizer,
)
from slicjax.interop.hf_config import ARCHITECTURES
from slicjax.interop.hf_export import export_from_workdir, export_hf_checkpoint, hf_state_dict
from slicjax.interop.hf_import import SafetensorsSource, load_hf_checkpoint
from slicjax.interop.hf_tokenizer import HFTokenizer, load_hf_tokenizer

__all__ = [
  "ARCHITECTURES",
  "GGUFSource",
  "HFTokenizer",
  "SafetensorsSource",
  "export_from_workdir",
  "export_hf_checkpoint",
  "gguf_hf_config",
  "hf_state_dict",
  "load_gguf_checkpoint",
  "load_gguf_tokenizer",
  "load_hf_checkpoint",
  "load_hf_tokenizer",
]
