"""Compose MOPO with your own optax training loop on pairwise (chosen/rejected) data.

Two objectives labelled on disjoint pairs (as in HH-RLHF: a pair carries a helpfulness *or* a harmlessness label),
a log-linear policy over response features, and the two MOPO pieces a user needs:

* ``mopo_jax.mopo_pairwise_loss``: the policy step (regress the log-ratio margin onto the closed-form margin);
* ``mopo_jax.update_multipliers``: the projected dual step driven by the policy's estimated secondary value.

Run: ``python examples/optax_pairwise_loop.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mopo_jax as mj


def make_pairs(seed: int = 0, num_pairs: int = 512, dim: int = 8):
    rng = np.random.default_rng(seed)
    helpful, harmless = rng.normal(size=(2, dim))
    harmless = harmless - 0.8 * helpful  # conflicting objectives
    chosen, rejected = rng.normal(size=(2, num_pairs, dim))
    rewards = lambda x: np.stack([x @ helpful, x @ harmless], axis=-1)  # noqa: E731
    probs = 1 / (1 + np.exp(-(rewards(chosen) - rewards(rejected))))
    labels = (rng.random(probs.shape) < probs).astype(np.float32)  # one human label per objective
    mask = np.zeros_like(labels, dtype=bool)
    mask[np.arange(num_pairs), rng.integers(0, 2, num_pairs)] = True  # each pair labelled for one objective
    return jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(labels), jnp.asarray(mask)


def main(steps: int = 400, threshold: float = 0.58, tau: float = 0.5, verbose: bool = True):
    chosen, rejected, labels, mask = make_pairs()
    margins = mj.pairwise_win_rate_margins(labels, mask)  # [B, K]; 0 where an objective is unlabelled
    params = jnp.zeros(chosen.shape[-1])  # the reference policy is params = 0
    optimizer = optax.adam(0.05)
    opt_state = optimizer.init(params)
    multipliers, chi = jnp.zeros(1), jnp.ones(1)
    thresholds = jnp.array([threshold])

    def log_ratio_margin(params):
        # log pi(y) = params . features(y) + const, and pi_ref has params = 0, so log pi/pi_ref is linear.
        return chosen @ params - rejected @ params

    @jax.jit
    def train_step(params, opt_state, multipliers, chi):
        values = mj.pairwise_objective_values(log_ratio_margin(params), labels, mask)
        multipliers, chi = mj.update_multipliers(multipliers, chi, values[1:], thresholds, multiplier_lr=1.0)

        def loss_fn(params):
            h = log_ratio_margin(params)
            zeros = jnp.zeros_like(h)
            # Feed h as the chosen side's log-ratio: the loss only ever uses the margin.
            return mj.mopo_pairwise_loss(h, zeros, zeros, zeros, margins, multipliers, tau).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, multipliers, chi, loss, values

    for step in range(steps):
        params, opt_state, multipliers, chi, loss, values = train_step(params, opt_state, multipliers, chi)
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {float(loss):.4f}  helpful {float(values[0]):.3f}  "
                  f"harmless {float(values[1]):.3f} (>= {threshold})  lambda {float(multipliers[0]):.3f}")
    return values, multipliers


if __name__ == "__main__":
    main()
