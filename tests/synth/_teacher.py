"""Bot B's log-probs over its answers, recomputed from full prompts in one batched forward (each sequence
right-padded to the longest: a causal model's logits before the padding are the same), so that a test
compiles the model once instead of once per conversation length."""
import jax
import jax.numpy as jnp
import numpy as np


def teacher_logprobs(model, pairs) -> list[np.ndarray]:
  """pairs: (prompt ids, answer ids) per conversation -> [Ta, V] f32 log-probs over each answer's positions."""
  seqs = [list(p) + list(a) for p, a in pairs]
  width = max(len(s) for s in seqs)
  batch = np.zeros((len(seqs), width), np.int32)
  for i, s in enumerate(seqs):
    batch[i, :len(s)] = s
  logits, _ = model(jnp.asarray(batch), jnp.broadcast_to(jnp.arange(width), batch.shape))
  lp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
  return [lp[i, len(p) - 1:len(s) - 1] for i, ((p, _), s) in enumerate(zip(pairs, seqs))]
