"""MOPO's dual read from the policy's own samples: ``V_k(pi) = E_x E_{y ~ pi, y' ~ pi_ref} P_k(y > y')``.

The constraint of Eq. 2 is on the policy's win rate against the reference, which the evaluation measures from the
policy's samples. The pairwise estimate over offline pairs (importance weights ``pi/pi_ref`` on responses that the
reference did not draw) measures something else, and over-reads once the policy has fitted the pairs it is measured
on (docs/algorithm.md, section 4). :class:`PolicySampleDual` measures ``V_k`` directly, with the evaluation's own
statistic, on a *dual prompt set* of its own:

* prompts: distinct prompts of the labeler-train split (disjoint by construction from the policy-train pairs and
  from the evaluation's prompts, :func:`mopo_jax.data.split_by_prompt`), half from each objective's pairs;
* ``dual.samples`` responses per prompt from the policy and as many from the reference, drawn with common random
  numbers (the key ``dual.seed``, the same at every measurement, as the evaluation does with ``eval.seed``), up to
  ``eval.max_new_tokens`` tokens at ``eval.temperature``;
* scored by the run's labelers (the gold models under the gold protocol) on the judges' features, as the expected
  win rate per prompt (:func:`mopo_jax.evaluation.paired.expected_win_rates`), averaged over prompts, with its
  standard error over prompts.

The reference's samples and features are drawn once per run (a few seconds) rather than cached, so they always come
from this run's model, mesh and settings.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import numpy as np

from mopo_jax.evaluation import paired


class DualMeasurement(NamedTuple):
    """``V_k`` of the secondary objectives ``[K-1]`` on the dual prompts, its standard error over prompts, and the
    number of prompts."""

    values: np.ndarray
    stderr: np.ndarray
    prompts: int


def dual_prompt_rows(prompt_tokens: np.ndarray, objective: np.ndarray, count: int) -> np.ndarray:
    """Rows of ``count`` distinct prompts, half from each objective's pairs (in the split's order)."""
    _, first = np.unique(np.asarray(prompt_tokens), axis=0, return_index=True)
    distinct = np.sort(first)
    groups = [distinct[objective[distinct] == k] for k in np.unique(objective)]
    share = [count // len(groups) + (i < count % len(groups)) for i in range(len(groups))]
    rows = np.sort(np.concatenate([g[:n] for g, n in zip(groups, share)]))
    if len(rows) < count:
        raise ValueError(f"dual.prompts: the labeler-train split has {len(rows)} distinct prompts balanced over the "
                         f"objectives, fewer than the {count} asked for")
    return rows


class PolicySampleDual:
    """Measures a policy's secondary win rates against the reference on the dual prompts (see the module
    docstring). ``measure(policy_params)`` takes the full model's parameters."""

    def __init__(self, config, model, prompts: dict, labelers: list, eos_id: int, pad_id: int, mesh):
        from mopo_jax.evaluation.preference_models import response_features

        self.config, self.mesh = config, mesh
        self.model_config, self.base_params = model
        self.labelers = labelers
        self.eos_id, self.pad_id = eos_id, pad_id
        rows = dual_prompt_rows(prompts["prompt_tokens"], prompts["objective"], config.dual.prompts)
        self.prompt_tokens, self.prompt_mask = prompts["prompt_tokens"][rows], prompts["prompt_mask"][rows]
        self.key = jax.random.PRNGKey(config.dual.seed)
        self._features = lambda rows: response_features(
            self.model_config, self.base_params, *rows, layer=config.preference.feature_layer,
            batch_size=self._batch, mesh=mesh)
        self.reference_rewards = self._rewards(self.base_params)

    @property
    def _batch(self) -> int:
        return len(self.prompt_tokens) * self.config.dual.samples

    def _rewards(self, params) -> np.ndarray:
        """``[K-1, prompts, samples]`` labeler rewards of ``params``' samples on the dual prompts."""
        from mopo_jax.evaluation.policy_eval import generate_responses, response_rows
        from mopo_jax.evaluation.preference_models import rewards

        samples = self.config.dual.samples
        responses = generate_responses(
            self.model_config, params, self.prompt_tokens, self.prompt_mask, self.config.eval.max_new_tokens,
            self.key, temperature=self.config.eval.temperature, top_p=self.config.eval.top_p, eos_id=self.eos_id,
            pad_id=self.pad_id, batch_size=len(self.prompt_tokens), mesh=self.mesh, num_samples=samples)
        features = self._features(response_rows(np.repeat(self.prompt_tokens, samples, axis=0),
                                                np.repeat(self.prompt_mask, samples, axis=0), *responses))
        return np.stack([np.asarray(rewards(m, features), np.float64).reshape(-1, samples) for m in self.labelers])

    def measure(self, policy_params) -> DualMeasurement:
        policy = self._rewards(policy_params)
        per_prompt = np.stack([paired.expected_win_rates(p, r) for p, r in zip(policy, self.reference_rewards)])
        count = per_prompt.shape[1]
        return DualMeasurement(per_prompt.mean(axis=1), per_prompt.std(axis=1, ddof=1) / np.sqrt(count), count)


def with_policy_sample_dual(next_batch, dual: PolicySampleDual, every: int, policy_of_state):
    """Wraps a method's ``next_batch(position, state)``: at every step ``t`` with ``t % every == 0`` (``t`` the step
    of the state the batch will update, so a resumed run measures at the same steps) the current policy is measured
    and the batch carries it as ``dual_estimates`` / ``dual_stderr`` and ``dual_counts`` (the number of prompts);
    other steps carry ``dual_counts = 0``, so the multipliers keep their values until the next measurement."""

    def wrapped(position, state):
        drawn = next_batch(position, state)
        if drawn is None:
            return None
        batch, next_position = drawn
        rows = len(next(iter(batch.values())))
        shape = (rows, len(dual.labelers))
        extra = {"dual_estimates": np.full(shape, 0.5, np.float32), "dual_stderr": np.zeros(shape, np.float32),
                 "dual_counts": np.zeros(shape, np.float32)}
        if int(jax.device_get(state.step)) % every == 0:
            measured = dual.measure(policy_of_state(state))
            extra = {"dual_estimates": np.broadcast_to(measured.values, shape).astype(np.float32),
                     "dual_stderr": np.broadcast_to(measured.stderr, shape).astype(np.float32),
                     "dual_counts": np.full(shape, measured.prompts, np.float32)}
        return {**batch, **extra}, next_position

    return wrapped
