"""MOPO inside a Flax NNX model's own training loop: your model, your optimiser, the library's objective.

The model is a user's own ``nnx.Module`` (a one-block causal transformer written here, not mopo-jax's); the library
contributes three things:

* ``mopo_jax.completion_log_probs(logits, tokens, completion_mask)``: sequence log-probabilities of the completions
  from any causal LM's logits (float32 log-softmax, masked sum);
* ``mopo_jax.MOPOPairwise``: the MOPO objective on pairwise data, a frozen dataclass whose ``init`` / ``prepare`` /
  ``loss`` / ``update`` are pure functions (the same object the library's sharded step trains with);
* ``mopo_jax.policy_objectives.ResponseLogProbs``: how the objective receives the policy's and the reference's
  log-probabilities.

The task: completions of 4 tokens over a 16-token vocabulary, two conflicting preferences (helpfulness likes tokens
below 8, harmlessness dislikes tokens below 4 and likes 8-11); every step draws a fresh batch of pairs of completions
from the reference, each labelled for one objective by a Bradley-Terry draw. MOPO maximises helpfulness while keeping harmlessness's win rate
against the reference above the threshold. ``win_rates_by_sampling`` measures the trained policy independently:
completions sampled from it and from the reference, compared under the true preference model.

Run: ``python examples/nnx_mopo_loop.py``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import mopo_jax as mj
from mopo_jax.policy_objectives import ResponseLogProbs

VOCAB, PROMPT, COMPLETION = 16, 4, 4
LENGTH = PROMPT + COMPLETION


class TinyCausalLM(nnx.Module):
    """Token and position embeddings, one causal self-attention block, an unembedding."""

    def __init__(self, rngs: nnx.Rngs, dim: int = 32):
        self.embed = nnx.Embed(VOCAB, dim, rngs=rngs)
        self.position = nnx.Embed(LENGTH, dim, rngs=rngs)
        self.attention = nnx.MultiHeadAttention(num_heads=2, in_features=dim, decode=False, rngs=rngs)
        self.mlp = nnx.Linear(dim, dim, rngs=rngs)
        self.head = nnx.Linear(dim, VOCAB, rngs=rngs)

    def __call__(self, tokens):
        x = self.embed(tokens) + self.position(jnp.arange(tokens.shape[-1]))
        causal = nnx.make_causal_mask(tokens)
        x = x + self.attention(x, mask=causal)
        x = x + jax.nn.gelu(self.mlp(x))
        return self.head(x)


def rewards(completions):
    """``[..., 2]`` rewards of completions ``[..., COMPLETION]`` under the two (true) preferences."""
    helpful = jnp.sum(completions < 8, axis=-1)
    harmless = jnp.sum((completions >= 8) & (completions < 12), axis=-1) - jnp.sum(completions < 4, axis=-1)
    return jnp.stack([helpful, harmless], axis=-1).astype(jnp.float32)


PROMPTS = jnp.asarray(np.random.default_rng(100).integers(0, VOCAB, (4, PROMPT)), jnp.int32)  # the task's prompts


def sample(model, prompts, key, temperature: float = 1.0):
    """Completions sampled token by token (the full forward each time: 4 tokens, a tiny model)."""
    tokens = jnp.concatenate([prompts, jnp.zeros((prompts.shape[0], COMPLETION), jnp.int32)], axis=1)
    for t in range(PROMPT, LENGTH):
        key, sub = jax.random.split(key)
        logits = model(tokens)[:, t - 1] / temperature
        tokens = tokens.at[:, t].set(jax.random.categorical(sub, logits))
    return tokens


def labelled_pairs(reference, key, num_pairs: int = 256):
    """A fresh batch: pairs of reference completions for the task's prompts, each labelled for one objective by a
    Bradley-Terry draw (the responses are reference draws, as the pairwise value estimate assumes)."""
    prompt_key, first_key, second_key, label_key, which_key = jax.random.split(key, 5)
    prompts = PROMPTS[jax.random.randint(prompt_key, (num_pairs,), 0, PROMPTS.shape[0])]
    first, second = sample(reference, prompts, first_key), sample(reference, prompts, second_key)
    margin = rewards(first[:, PROMPT:]) - rewards(second[:, PROMPT:])
    wins = jax.random.uniform(label_key, margin.shape) < jax.nn.sigmoid(margin)
    labels = jax.nn.one_hot(jax.random.randint(which_key, (num_pairs,), 0, 2), 2, dtype=bool)
    completion = jnp.zeros((num_pairs, 2, LENGTH), bool).at[..., PROMPT:].set(True)
    return {
        "tokens": jnp.stack([first, second], axis=1),
        "completion_mask": completion,
        "preference_probs": jnp.where(labels, wins, 0.5).astype(jnp.float32),
        "label_mask": labels,
        "response_valid": jnp.ones((num_pairs, 2), bool),
    }


def win_rates_by_sampling(policy, reference, samples: int = 4096, seed: int = 7) -> np.ndarray:
    """``E_x E_{y~pi, y'~pi_ref}[P_k(y > y')]`` of both objectives from fresh samples and the true preferences."""
    key = jax.random.PRNGKey(seed)
    prompts = PROMPTS[jax.random.randint(key, (samples,), 0, PROMPTS.shape[0])]
    mine = sample(policy, prompts, jax.random.fold_in(key, 1))[:, PROMPT:]
    theirs = sample(reference, prompts, jax.random.fold_in(key, 2))[:, PROMPT:]
    return np.asarray(jnp.mean(jax.nn.sigmoid(rewards(mine) - rewards(theirs)), axis=0))


def sequence_log_probs(model, batch):
    """``[B, 2]`` log-probabilities of both completions of every pair."""
    tokens = batch["tokens"].reshape(-1, LENGTH)
    logits = model(tokens)
    log_probs = mj.completion_log_probs(logits, tokens, batch["completion_mask"].reshape(-1, LENGTH))
    return log_probs.reshape(-1, 2)


def main(steps: int = 300, threshold: float = 0.56, verbose: bool = True):
    model = TinyCausalLM(nnx.Rngs(0))
    reference = nnx.clone(model)  # frozen: never handed to the optimiser
    objective = mj.MOPOPairwise(mj.MOPOConfig(tau=0.5, multiplier_lr=0.5, eps=0.0, refresh_every=None,
                                              estimate_window=4), thresholds=(threshold,))
    objective.check_batch(jax.tree.map(np.asarray, labelled_pairs(reference, jax.random.PRNGKey(0))))
    optimizer = nnx.Optimizer(model, optax.adam(3e-3), wrt=nnx.Param)
    objective_state = objective.init()

    @nnx.jit
    def train_step(model, reference, optimizer, objective_state, key):
        batch = labelled_pairs(reference, key)
        state, rows = objective.prepare(objective_state, batch)
        batch = {**batch, **rows}
        reference_log_probs = sequence_log_probs(reference, batch)

        def loss_fn(model):
            log_probs = ResponseLogProbs(policy=sequence_log_probs(model, batch), reference=reference_log_probs)
            terms, aux = objective.loss(state, batch, log_probs)
            return terms.mean(), aux

        (loss, aux), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model)
        optimizer.update(model, grads)
        return loss, objective.update(state, batch, aux)

    for step in range(steps):
        loss, objective_state = train_step(model, reference, optimizer, objective_state,
                                           jax.random.fold_in(jax.random.PRNGKey(1), step))
        if verbose and (step % 50 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {float(loss):.4f}  harmless estimate "
                  f"{float(objective_state.secondary_estimates[0]):.3f} (>= {threshold})  "
                  f"lambda {float(objective_state.multipliers[0]):.3f}")
    values = win_rates_by_sampling(model, reference)
    if verbose:
        print(f"win rates against the reference, by sampling: helpful {values[0]:.3f}, harmless {values[1]:.3f}")
    return values, objective_state


if __name__ == "__main__":
    main()
