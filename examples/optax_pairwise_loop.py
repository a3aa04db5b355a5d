"""Compose MOPO with your own optax training loop on pairwise (chosen/rejected) data.

Two objectives labelled on disjoint pairs (as in HH-RLHF: a pair carries a helpfulness *or* a harmlessness label),
a log-linear policy over response features, and the MOPO pieces a user needs, around a ``MOPOState``:

* ``mopo_jax.mopo(config)``: the ``init`` / ``estimate_from_pairs`` / ``update_from_estimates`` of the dual side;
* ``mopo_jax.mopo_pairwise_loss``: the policy step (regress the log-ratio margin onto the closed-form margin, each
  objective's term renormalised over the pairs that carry its label).

The dual reads its estimate on *held-out* pairs, drawn like the training pairs but never trained on: on the pairs it
fits, the policy's estimated value over-reads its true value, and a dual fed from them releases the constraint
while it is violated (docs/algorithm.md, section 4).

The policy is ``pi(y) ∝ pi_ref(y) exp(theta . phi(y))`` with ``pi_ref`` the distribution the responses were drawn
from (standard normal features), so ``log pi/pi_ref = theta . phi - log Z``: the constant cancels in every margin
and in the self-normalised value estimate. ``true_values`` measures the trained policy's win rates by an independent
Monte-Carlo simulation of the preference model.

Run: ``python examples/optax_pairwise_loop.py``.
"""

import jax
import jax.numpy as jnp
import numpy as np
import optax

import mopo_jax as mj

DIM = 8


def preference_model(seed: int = 0):
    """Bradley-Terry preferences of two conflicting objectives over response features."""
    rng = np.random.default_rng(seed)
    helpful, harmless = rng.normal(size=(2, DIM))
    harmless = harmless - 0.8 * helpful
    return np.stack([helpful, harmless])  # [K, DIM]


def make_pairs(directions, seed: int = 1, num_pairs: int = 512):
    rng = np.random.default_rng(seed)
    chosen, rejected = rng.normal(size=(2, num_pairs, DIM))  # responses drawn from pi_ref
    probs = 1 / (1 + np.exp(-((chosen - rejected) @ directions.T)))  # [B, K]
    labels = (rng.random(probs.shape) < probs).astype(np.float32)  # one human label per objective
    mask = np.zeros_like(labels, dtype=bool)
    mask[np.arange(num_pairs), rng.integers(0, 2, num_pairs)] = True  # each pair labelled for one objective
    return jnp.asarray(chosen), jnp.asarray(rejected), jnp.asarray(np.where(mask, labels, 0.0)), jnp.asarray(mask)


def true_values(params, directions, samples: int = 20000, seed: int = 2) -> np.ndarray:
    """``V_k(pi) = E_{y~pi, y'~pi_ref}[P_k(y > y')]`` by self-normalised importance sampling on fresh draws."""
    rng = np.random.default_rng(seed)
    y, y_ref = rng.normal(size=(2, samples, DIM))
    log_w = y @ np.asarray(params, np.float64)
    w = np.exp(log_w - log_w.max())
    win = 1 / (1 + np.exp(-((y - y_ref) @ directions.T)))
    return (w[:, None] * win).sum(0) / w.sum()


def main(steps: int = 400, threshold: float = 0.58, tau: float = 0.5, verbose: bool = True):
    directions = preference_model()
    chosen, rejected, labels, mask = make_pairs(directions)
    held_chosen, held_rejected, held_labels, held_mask = make_pairs(directions, seed=3)
    margins = mj.pairwise_win_rate_margins(labels, mask)  # [B, K]: P - 1/2, 0 where unlabelled
    config = mj.MOPOConfig(tau=tau, multiplier_lr=1.0, eps=0.0, refresh_every=None)
    transformation = mj.mopo(config)
    mopo_state = transformation.init(jnp.array([threshold]))
    params = jnp.zeros(DIM)  # the reference policy is params = 0
    optimizer = optax.adam(0.05)
    opt_state = optimizer.init(params)

    @jax.jit
    def train_step(params, opt_state, mopo_state):
        # log pi/pi_ref of both held-out responses, up to the constant -log Z shared by all of them.
        log_ratios = jnp.stack([held_chosen @ params, held_rejected @ params], axis=-1)  # [B, 2]

        def loss_fn(params):
            h = (chosen - rejected) @ params
            zeros = jnp.zeros_like(h)  # the loss only uses the margin h
            return mj.mopo_pairwise_loss(h, zeros, zeros, zeros, margins, mopo_state.multipliers, config.tau,
                                         label_mask=mask).mean()

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        # The dual step measures the policy before its update, as the library's objectives do.
        estimate = transformation.estimate_from_pairs(mopo_state, log_ratios, held_labels, held_mask)
        mopo_state = transformation.update_from_estimates(mopo_state, estimate)
        return optax.apply_updates(params, updates), opt_state, mopo_state, loss

    for step in range(steps):
        params, opt_state, mopo_state, loss = train_step(params, opt_state, mopo_state)
        if verbose and (step % 100 == 0 or step == steps - 1):
            print(f"step {step:4d}  loss {float(loss):.4f}  harmless estimate "
                  f"{float(mopo_state.secondary_estimates[0]):.3f} (>= {threshold})  "
                  f"lambda {float(mopo_state.multipliers[0]):.3f}")
    values = true_values(params, directions)
    if verbose:
        print(f"true win rates of the trained policy: helpful {values[0]:.3f}, harmless {values[1]:.3f}")
    return values, mopo_state


if __name__ == "__main__":
    main()
