"""A PyTorch reference DPO training step, to compare the JAX step of ``mopo bench step`` against.

Same workload as the JAX benchmark: a small Llama (:data:`REFERENCE_LLAMA`: 4 layers, d_model 256, 8 query heads and
4 KV heads, MLP 768, vocabulary 8192, untied embeddings, RoPE theta 10000, RMSNorm eps 1e-5) in float32, and a batch
of 8 preference pairs, each a 64-token prompt followed by a 64-token response. Chosen and rejected sequences are
concatenated on the batch axis (chosen first), so the policy runs ONE forward pass over 16 sequences of 128 tokens;
the frozen reference model runs its forward under ``torch.no_grad()``. The step is::

    loss = -logsigmoid(beta * ((pi_c - ref_c) - (pi_r - ref_r))).mean()      # beta = 0.1
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()            # AdamW(lr=1e-5, weight_decay=0)

where ``pi_*`` / ``ref_*`` are sums of completion-token log-probabilities (log-softmax in float32, targets shifted by
one). torch and transformers are imported inside the functions only.
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from typing import Any

#: The benchmark model, as ``transformers.LlamaConfig`` keyword arguments.
REFERENCE_LLAMA: dict[str, Any] = dict(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=8,
    num_key_value_heads=4,
    rope_theta=10000.0,
    rms_norm_eps=1e-5,
    tie_word_embeddings=False,
    max_position_embeddings=128,
    hidden_act="silu",
    attention_bias=False,
    mlp_bias=False,
    attention_dropout=0.0,
)

NUM_PAIRS = 8
PROMPT_LEN = 64
RESPONSE_LEN = 64
SEQ_LEN = PROMPT_LEN + RESPONSE_LEN
BETA = 0.1
LEARNING_RATE = 1e-5


def build_reference_model(seed: int = 0, attn_implementation: str | None = None):
    """A randomly initialised float32 ``LlamaForCausalLM`` with the :data:`REFERENCE_LLAMA` configuration.

    ``attn_implementation`` defaults to ``"sdpa"`` and falls back to ``"eager"`` if SDPA cannot be used; the choice
    actually made is ``model.config._attn_implementation``. Initialisation uses ``seed`` without touching torch's
    global RNG state.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    choices = [attn_implementation] if attn_implementation else ["sdpa", "eager"]
    last_error: Exception | None = None
    for impl in choices:
        try:
            config = LlamaConfig(**REFERENCE_LLAMA, attn_implementation=impl)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                model = LlamaForCausalLM(config)
            return model.to(torch.float32)
        except (ImportError, ValueError) as e:  # SDPA unavailable in this torch/transformers build
            last_error = e
    raise RuntimeError(f"could not build the reference Llama with attn_implementation in {choices}") from last_error


def make_preference_batch(seed: int = 0, num_pairs: int = NUM_PAIRS, prompt_len: int = PROMPT_LEN,
                          response_len: int = RESPONSE_LEN, vocab_size: int = REFERENCE_LLAMA["vocab_size"]):
    """Random token ids for ``num_pairs`` preference pairs, chosen rows first, then rejected rows.

    Each pair shares one random prompt; chosen and rejected responses are independent random tokens. Returns
    ``(tokens, completion_mask)``: ``tokens`` is int64 ``[2 * num_pairs, prompt_len + response_len]`` and
    ``completion_mask`` is bool of the same shape, ``False`` on the prompt and ``True`` on the response.
    """
    import torch

    g = torch.Generator().manual_seed(seed)
    prompts = torch.randint(0, vocab_size, (num_pairs, prompt_len), generator=g)
    chosen = torch.randint(0, vocab_size, (num_pairs, response_len), generator=g)
    rejected = torch.randint(0, vocab_size, (num_pairs, response_len), generator=g)
    tokens = torch.cat([torch.cat([prompts, chosen], dim=1), torch.cat([prompts, rejected], dim=1)], dim=0)
    completion_mask = torch.zeros_like(tokens, dtype=torch.bool)
    completion_mask[:, prompt_len:] = True
    return tokens, completion_mask


def sequence_logps(logits, tokens, completion_mask):
    """Sum over completion tokens of ``log p(token_t | tokens_<t)``; ``logits[:, t]`` predicts ``tokens[:, t + 1]``.

    The log-softmax is computed in float32. Returns a float32 tensor of shape ``[batch]``.
    """
    import torch

    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    targets = tokens[:, 1:]
    token_logp = torch.gather(logp, -1, targets.unsqueeze(-1)).squeeze(-1)
    mask = completion_mask[:, 1:].to(token_logp.dtype)
    return (token_logp * mask).sum(dim=-1)


def torch_dpo_loss_and_logps(model, ref_model, tokens, completion_mask, beta: float = BETA):
    """DPO loss of ``model`` against ``ref_model`` on a chosen-then-rejected batch.

    One forward pass of ``model`` over all rows (with autograd), one of ``ref_model`` under ``torch.no_grad()``.

    Returns:
      ``(loss, policy_logps, reference_logps)``: the scalar loss ``-logsigmoid(beta * h).mean()`` with
      ``h = (pi_c - ref_c) - (pi_r - ref_r)``, and the per-row completion log-prob sums ``[2 * num_pairs]`` of each
      model (chosen rows first).
    """
    import torch
    import torch.nn.functional as F

    n = tokens.shape[0]
    if n % 2:
        raise ValueError(f"batch must hold chosen rows then rejected rows; got an odd batch size {n}")
    policy_logps = sequence_logps(model(input_ids=tokens).logits, tokens, completion_mask)
    with torch.no_grad():
        reference_logps = sequence_logps(ref_model(input_ids=tokens).logits, tokens, completion_mask)
    half = n // 2
    h = (policy_logps[:half] - reference_logps[:half]) - (policy_logps[half:] - reference_logps[half:])
    loss = -F.logsigmoid(beta * h).mean()
    return loss, policy_logps, reference_logps


class TorchDPOStep:
    """One full DPO training step of the reference model (forward, backward, AdamW update) per call.

    ``num_threads``: torch intra-op threads while a step runs (default ``os.cpu_count()``); the caller's setting is
    restored after each call, so other code timed in between runs under its own.
    """

    def __init__(self, seed: int = 0, num_threads: int | None = None):
        import torch

        self.num_threads = int(num_threads or os.cpu_count() or 1)
        self.policy = build_reference_model(seed)
        self.policy.train()
        self.reference = copy.deepcopy(self.policy).eval().requires_grad_(False)
        self.tokens, self.completion_mask = make_preference_batch(seed)
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
        self.loss = float("nan")

    def __call__(self) -> float:
        import torch

        previous_threads = torch.get_num_threads()
        torch.set_num_threads(self.num_threads)
        try:
            self.optimizer.zero_grad(set_to_none=True)
            loss, _, _ = torch_dpo_loss_and_logps(self.policy, self.reference, self.tokens, self.completion_mask, BETA)
            loss.backward()
            self.optimizer.step()
            self.loss = float(loss.detach())  # float() synchronises; CPU torch is synchronous anyway
        finally:
            torch.set_num_threads(previous_threads)
        return self.loss

    def info(self) -> dict[str, Any]:
        import torch

        return {"tokens_per_step": int(self.tokens.numel()), "torch_version": torch.__version__,
                "num_threads": self.num_threads, "attn_implementation": self.policy.config._attn_implementation,
                "final_loss": self.loss}


def torch_dpo_step_seconds(steps: int = 10, warmup: int = 3, seed: int = 0,
                           num_threads: int | None = None) -> dict[str, Any]:
    """Wall-clock seconds of :class:`TorchDPOStep` alone: ``warmup`` untimed steps, then the median of ``steps``.

    Returns ``{"seconds_per_step", "all_step_seconds", "tokens_per_step", "torch_version", "num_threads",
    "attn_implementation", "final_loss"}`` (the loss for sanity only).
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    step = TorchDPOStep(seed, num_threads)
    for _ in range(warmup):
        step()
    times: list[float] = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return {"seconds_per_step": statistics.median(times), "all_step_seconds": times, **step.info()}
