"""Preference-optimization config: reward model, RSO sampling and preference training sections
on top of the MLE config. Every key exists here, so any can be set on the command line.

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

from experiments.configs import mle as mle_config
from slicjax import optim
from slicjax.pipelines import preference, reward, rso


def get_config():
  c = mle_config.get_config()
  c.reward_model = ml_collections.ConfigDict(c.model.to_dict())
  c.reward = ml_collections.ConfigDict(dict(reward.REWARD_KEYS))
  c.reward_optimizer = ml_collections.ConfigDict({**optim.DEFAULTS, **dict(
    learning_rate=1e-4, warmup_steps=20, schedule="constant", decay_steps=0)})
  c.rso = ml_collections.ConfigDict(dict(rso.RSO_KEYS))
  c.preference = ml_collections.ConfigDict(dict(preference.PREFERENCE_KEYS))
  c.optimizer = ml_collections.ConfigDict({**optim.DEFAULTS, **dict(
    learning_rate=3e-4, warmup_steps=10, schedule="constant", decay_steps=0)})
  return c
