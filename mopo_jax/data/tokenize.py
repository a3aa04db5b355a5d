"""Preference pairs -> fixed-shape numpy arrays in the train step's batch layout, and a resumable batch iterator.

Layout (``P = max_prompt_tokens``, ``R = max_response_tokens``, ``T = P + R``), for each pair ``b`` and response
``s`` (0 = chosen, 1 = rejected)::

    tokens[b, s] = [pad ... pad | prompt (right-aligned to P) | response + end-of-turn | pad ... pad]
                    <------------------ P ------------------>  <-------------- R -------------->

* the prompt is the chat-template rendering of the dialogue with the generation prompt
  (``apply_chat_template(messages, add_generation_prompt=True, tokenize=False)``), tokenized without extra special
  tokens, truncated from the LEFT (its most recent tokens are kept), and left-padded to ``P``: the prompt always ends
  at column ``P`` and ``tokens[:, 0, :P]`` is directly a left-padded generation prompt (also returned as
  ``prompt_tokens`` / ``prompt_mask``);
* the response is the text followed by the template's end-of-turn marker (e.g. ``<|im_end|>`` for ChatML, found by
  rendering a message with the template; the tokenizer's eos if the template has none), truncated from the RIGHT to
  ``R`` tokens (a truncated response loses its end marker) and right-padded;
* ``attention_mask`` is 1 on real tokens (the model derives positions from it, so left padding is handled);
  ``completion_mask`` is 1 on the response tokens that are scored: a response token needs a real token before it, so
  with an empty prompt the first response token is context, not scored.

A pair is dropped (and counted) when either response keeps no scored token, when the two responses are identical
after truncation (zero margin, zero gradient), or when its chat template fails to render.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

TRAIN_KEYS = ("tokens", "completion_mask", "attention_mask", "preference_probs", "label_mask")

NO_RESPONSE_TOKEN = "no_response_token"
IDENTICAL_AFTER_TRUNCATION = "identical_after_truncation"
TEMPLATE_ERROR = "template_error"
_MAX_EXAMPLES = 5
_SENTINEL = "MOPO_END_OF_TURN_SENTINEL_7f3a"


@dataclasses.dataclass
class TokenizeReport:
    """What :func:`format_and_tokenize` did.

    Attributes:
      rows_in / rows_out: pairs given / kept.
      dropped: count per reason (:data:`NO_RESPONSE_TOKEN`, :data:`IDENTICAL_AFTER_TRUNCATION`,
        :data:`TEMPLATE_ERROR`).
      dropped_rows: per reason, the first few input row indices.
      prompt_truncated / chosen_truncated / rejected_truncated: kept pairs whose prompt lost tokens on the left /
        whose response lost tokens on the right.
      end_of_turn: the end-of-turn text appended to responses; end_of_turn_ids: its token ids.
      prompt_lengths / chosen_lengths / rejected_lengths: untruncated token lengths of every input row (responses
        include the end-of-turn tokens; -1 for rows whose template failed).
      max_prompt_tokens / max_response_tokens: the limits used.
    """
    rows_in: int = 0
    rows_out: int = 0
    dropped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    dropped_rows: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    prompt_truncated: int = 0
    chosen_truncated: int = 0
    rejected_truncated: int = 0
    end_of_turn: str = ""
    end_of_turn_ids: list[int] = dataclasses.field(default_factory=list)
    prompt_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    chosen_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    rejected_lengths: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))
    max_prompt_tokens: int = 0
    max_response_tokens: int = 0

    def drop(self, reason: str, row: int) -> None:
        self.dropped[reason] += 1
        rows = self.dropped_rows.setdefault(reason, [])
        if len(rows) < _MAX_EXAMPLES:
            rows.append(row)

    def length_percentiles(self, q: Sequence[float] = (50, 90, 95, 99, 100)) -> dict[str, dict[float, float]]:
        """Percentiles of the untruncated prompt / chosen / rejected / prompt+longer-response lengths."""
        ok = self.prompt_lengths >= 0
        total = self.prompt_lengths + np.maximum(self.chosen_lengths, self.rejected_lengths)
        out = {}
        for name, lengths in (("prompt", self.prompt_lengths), ("chosen", self.chosen_lengths),
                              ("rejected", self.rejected_lengths), ("prompt+longer_response", total)):
            vals = lengths[ok]
            out[name] = {float(p): float(np.percentile(vals, p)) if vals.size else float("nan") for p in q}
        return out

    def fraction_fitting(self, total_tokens: int) -> float:
        """Fraction of rows whose prompt + longer response fits ``total_tokens`` untruncated."""
        ok = self.prompt_lengths >= 0
        total = (self.prompt_lengths + np.maximum(self.chosen_lengths, self.rejected_lengths))[ok]
        return float(np.mean(total <= total_tokens)) if total.size else float("nan")

    def summary(self) -> str:
        drops = ", ".join(f"{k}: {v} (rows {self.dropped_rows.get(k, [])})" for k, v in sorted(self.dropped.items()))
        return (f"tokenized {self.rows_out}/{self.rows_in} pairs (P={self.max_prompt_tokens}, "
                f"R={self.max_response_tokens}, end-of-turn {self.end_of_turn!r}); dropped {sum(self.dropped.values())}"
                f"{' (' + drops + ')' if drops else ''}; truncated prompts {self.prompt_truncated}, chosen "
                f"{self.chosen_truncated}, rejected {self.rejected_truncated}")


# ---------------------------------------------------------------------------------------------------------------
# Formatting.


def _template_dependency_error(exc: ImportError) -> ImportError:
    """A missing template dependency (jinja2) is an install problem, not a bad dialogue: say what to install."""
    return ImportError(f"chat templates need jinja2, which could not be imported ({exc}); install it with "
                       "pip install 'mopo-jax[lm]' (or pip install jinja2)")


def end_of_turn_text(tokenizer) -> str:
    """The text a chat template puts after an assistant message (stripped), e.g. ``"<|im_end|>"``.

    Found by rendering ``[user, assistant=<sentinel>]`` with the template; falls back to the eos token when the
    template adds nothing after the message (or cannot render).
    """
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": _SENTINEL}]
    try:
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    except ImportError as exc:
        raise _template_dependency_error(exc) from exc
    except Exception:
        text = ""
    marker = ""
    if isinstance(text, str) and _SENTINEL in text:
        marker = text[text.rindex(_SENTINEL) + len(_SENTINEL):].strip()
    if not marker:
        marker = getattr(tokenizer, "eos_token", None) or ""
    if not marker:
        raise ValueError("tokenizer has neither a chat-template end-of-turn marker nor an eos token; "
                         "pass end_of_turn= explicitly")
    return marker


def _field(row: Any, name: str):
    if isinstance(row, Mapping):
        if name in row:
            return row[name]
    elif hasattr(row, name):
        return getattr(row, name)
    raise KeyError(f"pair row has no {name!r} (rows need turns, chosen, rejected, preference_probs, label_mask; "
                   "see mopo_jax.data.make_record)")


def _turns(row: Any) -> list[tuple[str, str]]:
    turns = _field(row, "turns")
    out = []
    for t in turns:
        if isinstance(t, Mapping):
            out.append((t["role"], t["content"]))
        else:
            role, text = t
            out.append((role, text))
    return out


def prompt_messages(turns: Sequence[tuple[str, str]], *, merge_turns: bool = True,
                    system: str | None = None) -> list[dict[str, str]]:
    """Chat messages of prompt turns (consecutive same-role turns merged unless ``merge_turns=False``)."""
    from .hh_rlhf import merge_consecutive_turns

    turns = merge_consecutive_turns(turns) if merge_turns else tuple(turns)
    return ([{"role": "system", "content": system}] if system else []) + \
        [{"role": r, "content": t} for r, t in turns]


def _token_lists(tokenizer, texts: list[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]


def format_and_tokenize(
    pairs: Iterable[Any],
    tokenizer,
    max_prompt_tokens: int,
    max_response_tokens: int,
    pad_id: int | None = None,
    *,
    end_of_turn: str | None = None,
    merge_turns: bool = True,
    system: str | None = None,
    drop_identical: bool = True,
) -> tuple[dict[str, np.ndarray], TokenizeReport]:
    """Chat-format and tokenize preference pairs into the train step's batch layout (see the module docstring).

    Args:
      pairs: rows with ``turns`` (``[{"role", "content"}]`` or ``[(role, text)]``), ``chosen``, ``rejected``,
        ``preference_probs [K]`` and ``label_mask [K]`` -- a ``datasets.Dataset`` from :func:`load_hh_rlhf` /
        :func:`split_by_prompt`, or a list of dicts / objects (e.g. from :func:`make_record`).
      tokenizer: a Hugging Face tokenizer with a chat template.
      max_prompt_tokens: ``P``; longer prompts lose their oldest tokens.
      max_response_tokens: ``R``; longer responses (end marker included) lose their last tokens.
      pad_id: padding id (default: the tokenizer's pad, else eos, else 0); padding is masked out everywhere.
      end_of_turn: text appended to each response (default: :func:`end_of_turn_text`).
      merge_turns: merge consecutive same-role turns before templating.
      system: optional system message prepended to every prompt.
      drop_identical: drop pairs whose two responses are identical after truncation.

    Returns:
      ``(arrays, report)``: ``arrays`` holds ``tokens`` int32 ``[B, 2, T]``, ``completion_mask`` and
      ``attention_mask`` int32 ``[B, 2, T]``, ``preference_probs`` float32 ``[B, K]``, ``label_mask`` bool ``[B, K]``
      (the train step's keys, :data:`TRAIN_KEYS`), plus ``prompt_tokens`` int32 ``[B, P]`` / ``prompt_mask`` int32
      ``[B, P]`` (left-padded prompts for generation) and ``row_index`` int64 ``[B]`` (input row of each pair).

    Raises:
      ValueError: no pairs given, bad limits, or every pair was dropped (the message gives the reasons).
      ImportError: the chat template cannot render because jinja2 is not installed (``mopo-jax[lm]``).
    """
    if max_prompt_tokens < 0 or max_response_tokens < 1:
        raise ValueError(f"need max_prompt_tokens >= 0 and max_response_tokens >= 1, got "
                         f"{max_prompt_tokens}, {max_response_tokens}")
    P, R = int(max_prompt_tokens), int(max_response_tokens)
    T = P + R
    if pad_id is None:
        pad_id = next((i for i in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                       if i is not None), 0)
    marker = end_of_turn_text(tokenizer) if end_of_turn is None else end_of_turn
    end_ids = _token_lists(tokenizer, [marker])[0] if marker else []
    report = TokenizeReport(end_of_turn=marker, end_of_turn_ids=list(end_ids), max_prompt_tokens=P,
                            max_response_tokens=R)

    prompt_texts, chosen_texts, rejected_texts, probs, masks, ok_rows = [], [], [], [], [], []
    rows = list(pairs)
    report.rows_in = len(rows)
    if not rows:
        raise ValueError("format_and_tokenize: no pairs given")
    for i, row in enumerate(rows):
        try:
            text = tokenizer.apply_chat_template(prompt_messages(_turns(row), merge_turns=merge_turns, system=system),
                                                 add_generation_prompt=True, tokenize=False)
        except KeyError:
            raise
        except ImportError as exc:  # jinja2 missing: every row would fail, so stop instead of dropping them all
            raise _template_dependency_error(exc) from exc
        except Exception:  # a template that rejects this dialogue (e.g. role alternation)
            report.drop(TEMPLATE_ERROR, i)
            continue
        prompt_texts.append(text)
        chosen_texts.append(str(_field(row, "chosen")))
        rejected_texts.append(str(_field(row, "rejected")))
        probs.append(np.asarray(_field(row, "preference_probs"), np.float32))
        masks.append(np.asarray(_field(row, "label_mask"), bool))
        ok_rows.append(i)
    K = {p.shape for p in probs} | {m.shape for m in masks}
    if len(K) > 1:
        raise ValueError(f"preference_probs / label_mask shapes differ across rows: {sorted(K)}")

    prompt_ids = _token_lists(tokenizer, prompt_texts)
    chosen_ids = [ids + end_ids for ids in _token_lists(tokenizer, chosen_texts)]
    rejected_ids = [ids + end_ids for ids in _token_lists(tokenizer, rejected_texts)]

    full = np.full(len(rows), -1, np.int64)
    report.prompt_lengths, report.chosen_lengths, report.rejected_lengths = full.copy(), full.copy(), full.copy()
    for j, i in enumerate(ok_rows):
        report.prompt_lengths[i] = len(prompt_ids[j])
        report.chosen_lengths[i] = len(chosen_ids[j])
        report.rejected_lengths[i] = len(rejected_ids[j])

    kept: list[tuple[int, list[int], list[int], list[int]]] = []  # (j, prompt, chosen, rejected)
    for j, i in enumerate(ok_rows):
        p = prompt_ids[j][max(0, len(prompt_ids[j]) - P):] if P else []
        c, r = chosen_ids[j][:R], rejected_ids[j][:R]
        scored = lambda resp: len(resp) - (1 if resp and not p else 0)  # noqa: E731
        if scored(c) < 1 or scored(r) < 1:
            report.drop(NO_RESPONSE_TOKEN, i)
            continue
        if drop_identical and c == r:
            report.drop(IDENTICAL_AFTER_TRUNCATION, i)
            continue
        report.prompt_truncated += len(prompt_ids[j]) > P
        report.chosen_truncated += len(chosen_ids[j]) > R
        report.rejected_truncated += len(rejected_ids[j]) > R
        kept.append((j, p, c, r))
    report.rows_out = len(kept)
    if not kept:
        raise ValueError(f"format_and_tokenize: all {len(rows)} pairs dropped ({dict(report.dropped)}); "
                         f"max_prompt_tokens={P}, max_response_tokens={R}")

    B = len(kept)
    num_objectives = probs[0].shape[0]
    tokens = np.full((B, 2, T), pad_id, np.int32)
    attention = np.zeros((B, 2, T), np.int32)
    completion = np.zeros((B, 2, T), np.int32)
    pref = np.zeros((B, num_objectives), np.float32)
    labels = np.zeros((B, num_objectives), bool)
    row_index = np.zeros(B, np.int64)
    for b, (j, p, c, r) in enumerate(kept):
        for s, resp in enumerate((c, r)):
            if p:
                tokens[b, s, P - len(p):P] = p
                attention[b, s, P - len(p):P] = 1
            tokens[b, s, P:P + len(resp)] = resp
            attention[b, s, P:P + len(resp)] = 1
            completion[b, s, P:P + len(resp)] = 1
            if not p:
                completion[b, s, P] = 0  # nothing before it to predict it from
        pref[b], labels[b] = probs[j], masks[j]
        row_index[b] = ok_rows[j]
    arrays = {
        "tokens": tokens,
        "completion_mask": completion,
        "attention_mask": attention,
        "preference_probs": pref,
        "label_mask": labels,
        "prompt_tokens": tokens[:, 0, :P].copy(),
        "prompt_mask": attention[:, 0, :P].copy(),
        "row_index": row_index,
    }
    return arrays, report


def train_batch(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Only the train step's keys (:data:`TRAIN_KEYS`) of ``arrays``."""
    return {k: arrays[k] for k in TRAIN_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# Batching.

_MASK64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return z ^ (z >> np.uint64(31))


@functools.lru_cache(maxsize=8)
def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of ``epoch``: a permutation of ``range(n)`` that depends only on ``(seed, epoch, n)``.

    Built from a sha256 of ``(seed, epoch)`` and splitmix64, so it is the same on every platform and NumPy version.
    Memoised (read-only): :func:`batch_at` asks for the same epoch's order at every step.
    """
    order = _epoch_permutation(n, seed, epoch)
    order.flags.writeable = False
    return order


def _epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    base = int.from_bytes(hashlib.sha256(f"mopo-batches:{int(seed)}:{int(epoch)}".encode()).digest()[:8], "big")
    with np.errstate(over="ignore"):
        keys = _splitmix64(np.uint64(base) + np.arange(n, dtype=np.uint64) * np.uint64(0x9E3779B97F4A7C15))
    return np.argsort(keys, kind="stable")


def batch_at(arrays: Mapping[str, np.ndarray], batch_size: int, seed: int, position: Mapping[str, int] | None,
             *, keys: Sequence[str] | None = None, rows: slice = slice(None)):
    """The batch that starts at ``position`` of :func:`iterate_batches`' order, and the position after it: offline
    data as the training loop's ``next_batch`` (``lambda position, state: batch_at(arrays, B, seed, position)``).
    ``rows`` selects this process's rows of the global batch."""
    batch, next_position = next(iterate_batches(arrays, batch_size, seed, position, keys=keys))
    return {k: v[rows] for k, v in batch.items()}, next_position


def iterate_batches(
    arrays: Mapping[str, np.ndarray],
    batch_size: int,
    seed: int,
    position: Mapping[str, int] | None = None,
    *,
    drop_last: bool = True,
    keys: Sequence[str] | None = None,
    num_epochs: int | None = None,
) -> Iterator[tuple[dict[str, np.ndarray], dict[str, int]]]:
    """Shuffled batches, resumable: yields ``(batch, next_position)``.

    Epoch ``e`` visits the examples in :func:`epoch_permutation` ``(n, seed, e)`` order; ``position = {"epoch": e,
    "index": i}`` means "``i`` examples of epoch ``e``'s order are consumed". Saving the ``next_position`` yielded with
    a batch and passing it back later continues with exactly the batch that would have come next (for any batch
    size: the index counts examples, not batches).

    Args:
      arrays: equal-length arrays (leading axis = examples), e.g. from :func:`format_and_tokenize`.
      batch_size: examples per batch.
      seed: shuffling seed.
      position: where to start (default ``{"epoch": 0, "index": 0}``).
      drop_last: skip an epoch's last partial batch (fixed shapes for a jitted step); otherwise yield it.
      keys: which arrays to put in the batches (default all; :data:`TRAIN_KEYS` for the train step).
      num_epochs: stop before this epoch (default: iterate forever).
    """
    keys = tuple(arrays) if keys is None else tuple(keys)
    missing = [k for k in keys if k not in arrays]
    if missing:
        raise KeyError(f"iterate_batches: no arrays {missing} (have {sorted(arrays)})")
    sizes = {k: len(arrays[k]) for k in keys}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"iterate_batches: arrays differ in length: {sizes}")
    n = next(iter(sizes.values()))
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if n < (batch_size if drop_last else 1):
        raise ValueError(f"iterate_batches: {n} examples cannot fill one batch of {batch_size} (drop_last={drop_last})")
    position = dict(position or {})
    epoch, index = int(position.get("epoch", 0)), int(position.get("index", 0))
    if epoch < 0 or not 0 <= index <= n:
        raise ValueError(f"iterate_batches: bad position {position} for {n} examples")

    def has_next(i: int) -> bool:
        return i + batch_size <= n if drop_last else i < n

    while num_epochs is None or epoch < num_epochs:
        order = epoch_permutation(n, seed, epoch)
        while has_next(index):
            idx = order[index:index + batch_size]
            index += len(idx)
            next_position = {"epoch": epoch, "index": index} if has_next(index) else {"epoch": epoch + 1, "index": 0}
            yield {k: arrays[k][idx] for k in keys}, next_position
        epoch, index = epoch + 1, 0
