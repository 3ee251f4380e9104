"""Preference-optimization config: reward model, RSO sampling and preference training sections
on top of the MLE config. Every key exists here, so any can be set on the command line
(``--helpconfig`` lists them with their defaults and meanings).

  python experiments/train_reward.py --config=experiments/configs/preference.py \
      --config.reward.pairs=data/pairs.jsonl --config.reward.init_from=runs/mle \
      --workdir=runs/reward
  python experiments/rso_sample.py --config=experiments/configs/preference.py \
      --config.rso.sft_workdir=runs/mle --config.rso.reward_workdir=runs/reward \
      --workdir=runs/pairs_rso
  python experiments/train_preference.py --config=experiments/configs/preference.py \
      --config.preference.sft_workdir=runs/mle --config.preference.pairs=runs/pairs_rso \
      --config.preference.pair_source=rso-sample-rank --config.preference.loss=sigmoid_norm \
      --workdir=runs/dpo_rso
  python experiments/train_preference.py --experiment=smoke --workdir=runs/gold_smoke

``optimizer`` is the preference stage's optimizer; ``reward_optimizer`` the reward model's.
``reward_model`` defaults to the policy's architecture (a ranker on a token-id task needs
``vocab_size >= task vocabulary + 5``).
"""

import ml_collections

from slicjax import optim
from slicjax.models import factory
from slicjax.pipelines import common, mle, preference, reward, rso, tasks


def get_config():
  # The MLE config's model and data (self-contained: config files are loaded by path, so this
  # one imports only the installed package).
  c = ml_collections.ConfigDict()
  model = dict(
    family="transformer",
    preset="small",
    vocab_size=2048,
    max_len=320,
    num_encoder_layers=0,
    num_layers=3,
    d_model=128,
    d_ff=512,
    num_heads=4,
    num_kv_heads=4,
    head_dim=32,
    dropout_rate=0.0,
  )
  # Every key of every model family; the unset ones are typed placeholders (None: the preset's
  # value, else the family's default), so any can be set on the command line.
  c.model = factory.model_config(**model)
  c.data = ml_collections.ConfigDict(
    {
      **tasks.DATA_KEYS,
      **dict(
        name="stdlib_docstrings",
        input_len=192,
        target_len=32,
        vocab_size=2000,
      ),
    }
  )
  c.train = ml_collections.ConfigDict(dict(mle.TRAIN_KEYS))
  c.pretrained = ml_collections.ConfigDict(dict(common.PRETRAINED_KEYS))
  c.lora = ml_collections.ConfigDict(dict(common.LORA_KEYS))
  c.mesh_shape = (-1, 1, 1)
  c.reward_model = factory.model_config(**model)
  c.reward = ml_collections.ConfigDict(dict(reward.REWARD_KEYS))
  c.reward_optimizer = ml_collections.ConfigDict(
    {
      **optim.DEFAULTS,
      **dict(learning_rate=1e-4, warmup_steps=20, schedule="constant", decay_steps=0),
    }
  )
  c.rso = ml_collections.ConfigDict(dict(rso.RSO_KEYS))
  c.preference = ml_collections.ConfigDict(dict(preference.PREFERENCE_KEYS))
  c.optimizer = ml_collections.ConfigDict(
    {
      **optim.DEFAULTS,
      **dict(learning_rate=3e-4, warmup_steps=10, schedule="constant", decay_steps=0),
    }
  )
  # JAX persistent compilation cache: "default" (~/.cache/slicjax/jax_compilation or
  # $SLICJAX_CACHE_DIR/jax_compilation), a directory, or "off".
  c.compilation_cache = "default"
  return c
