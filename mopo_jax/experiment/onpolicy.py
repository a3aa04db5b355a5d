"""Algorithm 1's data: candidates sampled from the current (lagged) reference on each batch of prompts, labelled
by the run's labelers."""

from __future__ import annotations

import jax
import numpy as np


def onpolicy_batches(config, train_config, model_config, params, lower_config, lower, prompts, labelers, mesh,
                     rows: slice, end_of_turn: int, pad: int):
    """MOPO's on-policy data (the published algorithm): per prompt, ``N`` responses sampled from the *current*
    reference (the lagged policy of the train state the step will update), every pair labelled by the labelers
    (``P_k = sigmoid(r_k(y) - r_k(y'))``), and the activations of the frozen blocks for the upper-layer step.

    Sampling and features run on the mesh for the whole global batch (every process gets every row back); each
    process then gets its ``rows`` of prompts. Responses end at ``end_of_turn`` and are padded with ``pad``.
    Returns the loop's ``next_batch(position, state)``."""
    from mopo_jax.data import batch_at
    from mopo_jax.evaluation.policy_eval import batched_residual_stream, generate_responses, response_rows
    from mopo_jax.evaluation.preference_models import response_features, rewards
    from mopo_jax.models import join_layers
    from mopo_jax.training import reference_params

    count, per_prompt = config.training.batch_pairs, config.onpolicy.candidates
    prompt_arrays = {"prompt_tokens": prompts["prompt_tokens"], "prompt_mask": prompts["prompt_mask"]}

    def next_batch(position, state):
        prompt_batch, next_position = batch_at(prompt_arrays, count, config.seed, position)
        upper = reference_params(train_config.trainable, state)
        reference = upper if lower is None else join_layers(lower, upper)
        step = int(jax.device_get(state.step))
        repeated = {k: np.repeat(v, per_prompt, axis=0) for k, v in prompt_batch.items()}
        responses, response_mask = generate_responses(
            model_config, reference, prompt_batch["prompt_tokens"], prompt_batch["prompt_mask"],
            config.onpolicy.max_new_tokens or config.data.max_response_tokens,
            jax.random.fold_in(jax.random.PRNGKey(config.seed + 1), step),
            temperature=config.onpolicy.temperature, top_p=None, eos_id=end_of_turn, pad_id=pad,
            batch_size=count, mesh=mesh, num_samples=per_prompt,
        )
        tokens, attention, completion = response_rows(
            repeated["prompt_tokens"], repeated["prompt_mask"], responses, response_mask)
        features = response_features(model_config, params, tokens, attention, completion,
                                     layer=config.preference.feature_layer, batch_size=count * per_prompt,
                                     mesh=mesh)
        scores = np.stack([np.asarray(rewards(m, features)) for m in labelers]).reshape(len(labelers), count,
                                                                                          per_prompt)
        preferences = 1.0 / (1.0 + np.exp(-(scores[..., :, None] - scores[..., None, :])))
        shape = (count, per_prompt, tokens.shape[-1])
        batch = {
            "tokens": tokens.reshape(shape),
            "attention_mask": attention.reshape(shape),
            "completion_mask": completion.reshape(shape),
            "candidate_preferences": np.moveaxis(preferences, 0, 1).astype(np.float32),
            "candidate_label_mask": np.ones((count, len(labelers), per_prompt, per_prompt), bool),
        }
        if lower is not None:
            batch["inputs_hidden"] = batched_residual_stream(lower_config, lower, tokens, attention, len(tokens),
                                                             mesh).reshape(shape + (-1,))
        return {k: v[rows] for k, v in batch.items()}, next_position

    return next_batch
