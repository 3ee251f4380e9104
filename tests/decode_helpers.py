"""Jitted access to a model's ``decode_state`` for tests that step a decoder by hand.

Stepping eagerly runs every Flax op one at a time (each compiled on first use), which made
these tests take tens of seconds each on CPU; one jitted prefill and one jitted step do the
same arithmetic in two programs.
"""

import jax


def jitted_decode_state(model, params, inputs, max_len):
  """``(step, first_tokens, cache)`` like ``model.decode_state``, with the prefill and the step
  compiled (``step(tokens, cache) -> (logits, cache)``)."""
  first, cache = jax.jit(lambda p, x: model.decode_state(p, x, max_len)[1:])(params, inputs)
  # the step is traced from decode_state itself (its unused prefill is dead code under jit)
  step_p = jax.jit(lambda p, x, t, c: model.decode_state(p, x, max_len)[0](t, c))
  return (lambda tokens, c: step_p(params, inputs, tokens, c)), first, cache
