"""Hugging Face interop: load and export T5 and Llama-family checkpoints, load their tokenizers.

Needs the ``hf`` extra for ``safetensors`` / ``tokenizers`` (``transformers`` and ``torch`` only
for the tests). No network access: paths are local directories saved with ``save_pretrained``.
"""

from slicjax.interop.hf_config import ARCHITECTURES
from slicjax.interop.hf_export import export_from_workdir, export_hf_checkpoint, hf_state_dict
from slicjax.interop.hf_import import SafetensorsSource, load_hf_checkpoint
from slicjax.interop.hf_tokenizer import HFTokenizer, load_hf_tokenizer

__all__ = [
  "ARCHITECTURES",
  "HFTokenizer",
  "SafetensorsSource",
  "export_from_workdir",
  "export_hf_checkpoint",
  "hf_state_dict",
  "load_hf_checkpoint",
  "load_hf_tokenizer",
]
