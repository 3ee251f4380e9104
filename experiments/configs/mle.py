"""MLE fine-tuning config. Every key exists here, so any can be overridden on the command line:
``--config=experiments/configs/mle.py --config.train.steps=200 --config.data.name=reverse
--config.model.num_layers=2``. ``--helpconfig`` lists every key with its default and meaning.

``model`` lists every key of every model family (``factory.model_config``): the ones not set
below are placeholders (``None``: the preset's value, else the family's default).
"""

import ml_collections

from slicjax import optim
from slicjax.models import factory
from slicjax.pipelines import common, mle, tasks


def get_config():
  c = ml_collections.ConfigDict()
  c.model = factory.model_config(
    family="transformer", preset="small", vocab_size=2048, max_len=320, num_encoder_layers=0,
  )
  c.data = ml_collections.ConfigDict({**tasks.DATA_KEYS, **dict(
    name="stdlib_docstrings", input_len=192, target_len=32, vocab_size=2000,
  )})
  c.optimizer = ml_collections.ConfigDict({**optim.DEFAULTS, **dict(
    learning_rate=2e-3, warmup_steps=100, weight_decay=0.01, decay_steps=0,
  )})
  c.train = ml_collections.ConfigDict({**mle.TRAIN_KEYS, **dict(
    steps=2000, batch_size=32, eval_every=500, checkpoint_every=500,
  )})
  # Start from a pretrained checkpoint (a .gguf file, a Hugging Face directory or a workdir)
  # instead of `model`: --config.pretrained.init_from=path; LoRA: --config.lora.rank=8.
  c.pretrained = ml_collections.ConfigDict(dict(common.PRETRAINED_KEYS))
  c.lora = ml_collections.ConfigDict(dict(common.LORA_KEYS))
  c.mesh_shape = (-1, 1, 1)
  # JAX persistent compilation cache: "default" (~/.cache/slicjax/jax_compilation or
  # $SLICJAX_CACHE_DIR/jax_compilation), a directory, or "off".
  c.compilation_cache = "default"
  return c
