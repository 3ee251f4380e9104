"""Decode a dataset split from a checkpoint and write the candidates with their scores.

  python experiments/decode.py --config=experiments/configs/slic.py \
      --config.candidates.finetuned_workdir=runs/mle --config.candidates.split=validation \
      --config.candidates.method=beam --config.candidates.num_candidates=4 --workdir=runs/decode

Output format: see ``slicjax/pipelines/candidates.py`` (chunked JSON lines; ``logp`` is each
candidate's sequence log-likelihood; ``sim`` is filled when ``candidates.similarity`` is not
``none``).
"""

from absl import flags

from slicjax import cli, distributed
from slicjax.pipelines import candidates, common

_CONFIG = cli.define_config_file("config", "experiments/configs/slic.py", "Job config.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Output directory.")
_SIMILARITY = flags.DEFINE_enum("similarity", "none", ["none", "latent", "rouge", "token_embedding"],
                                "Also score each candidate against the target.")
distributed.define_flags()


def main(argv):
  del argv
  distributed.initialize_from_flags()
  common.log_devices()
  config = _CONFIG.value
  config.candidates.similarity = _SIMILARITY.value
  out = candidates.generate(config, common.prepare_workdir(_WORKDIR.value, config))
  print(f"decoded candidates written to {out}")


if __name__ == "__main__":
  cli.run(main, config=_CONFIG, required=["workdir"], resumable_on_sigterm=True)
