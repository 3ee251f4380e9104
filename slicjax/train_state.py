"""The training state: parameters, optimizer state, step and RNG (plus optional frozen params)."""

from __future__ import annotations

from typing import Any

import flax
import jax
import optax


@flax.struct.dataclass
class TrainState:
  """Everything a resumed run needs besides the data iterator position.

  Fields:
    step: int32 scalar, number of optimizer updates applied.
    params: the trainable parameter tree.
    opt_state: the optax state for ``params``.
    rng: the PRNG key; each step folds in ``step`` so the stream does not depend on restarts.
    ref_params: frozen parameters (the fine-tuned model for KL regularization or preference
      references), or ``None``. Never updated.
  """

  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  ref_params: Any = None

  def apply_gradients(self, grads, tx: optax.GradientTransformation) -> TrainState:
    updates, opt_state = tx.update(grads, self.opt_state, self.params)
    return self.replace(
      step=self.step + 1, params=optax.apply_updates(self.params, updates), opt_state=opt_state
    )

  @classmethod
  def create(cls, params, tx: optax.GradientTransformation, rng, ref_params=None) -> TrainState:
    return cls(
      step=jax.numpy.zeros((), jax.numpy.int32), params=params, opt_state=tx.init(params),
      rng=rng, ref_params=ref_params,
    )
