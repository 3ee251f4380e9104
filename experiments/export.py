"""Exports a trained slicjax transformer as a Hugging Face checkpoint.

  python experiments/export.py --workdir=runs/mle --out_dir=runs/mle_hf [--step=2000]

Reads ``<workdir>/config.json`` (its ``model`` section builds the model) and the parameters of
``<workdir>/checkpoints/<step>``; writes ``config.json``, ``generation_config.json`` and
safetensors that ``transformers`` loads (decoder-only -> ``LlamaForCausalLM``/``Qwen2ForCausalLM``,
encoder-decoder -> ``T5ForConditionalGeneration``).
"""

from absl import app, flags

from slicjax import cli, config_help
from slicjax.interop import hf_export
from slicjax.pipelines import common

_WORKDIR = flags.DEFINE_string(
  "workdir", None, "A training run's workdir (config.json, checkpoints/)."
)
_OUT_DIR = flags.DEFINE_string("out_dir", None, "Where the Hugging Face checkpoint is written.")
_STEP = flags.DEFINE_integer(
  "step", None, "Checkpoint step to export; default: the newest readable."
)
_DTYPE = flags.DEFINE_enum(
  "dtype",
  None,
  ["float32", "bfloat16", "float16"],
  "Saved dtype; default: the model's param_dtype.",
)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments {argv[1:]}; use --workdir and --out_dir.")
  common.log_devices()
  out = hf_export.export_from_workdir(
    _WORKDIR.value, _OUT_DIR.value, step=_STEP.value, dtype=_DTYPE.value
  )
  print(f"wrote {out}")


def _describe():
  from slicjax.models import factory

  keys = {k: None for k in factory.model_keys()}
  return config_help.describe(
    {"model": keys}, prefix="",
    title="export.py has no job config: it rebuilds the model from <workdir>/config.json, whose "
    "'model' section holds these keys (unset ones are omitted or null):",
  )


if __name__ == "__main__":
  cli.run(main, describe=_describe, required=["workdir", "out_dir"])
