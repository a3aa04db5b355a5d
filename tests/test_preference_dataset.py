"""Generic preference datasets (PKU-SafeRLHF-style, K labels per pair): column configuration, label formats, the
file formats, per-line validation with file and line in reports / errors, the hub path (faked), and that the rows
feed the tokenizer and the splitter. Every expectation below is written out by hand."""

from __future__ import annotations

import csv
import gzip
import json
import warnings

import numpy as np
import pytest

pytest.importorskip("datasets", reason="preference data loading needs `pip install datasets`")

from mopo_jax.data import (  # noqa: E402
    PKU_SAFERLHF_COLUMNS,
    TRL_COLUMNS,
    PreferenceColumns,
    PreferenceDataConfig,
    PreferenceDataError,
    PreferenceDataWarning,
    format_and_tokenize,
    load_preference_dataset,
    split_by_prompt,
)

H, A = "\n\nHuman:", "\n\nAssistant:"
PKU = PKU_SAFERLHF_COLUMNS
CONVERSATION = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": "Tell me a joke."}]


def _row(prompt, first, second, better, safer, **extra):
    row = {"prompt": prompt, "response_0": first, "response_1": second}
    if better is not ...:
        row["better_response_id"] = better
    if safer is not ...:
        row["safer_response_id"] = safer
    row.update(extra)
    return row


def _jsonl(path, rows):
    """Rows are dicts (dumped) or raw strings (written as they are)."""
    text = "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n"
    path.write_text(text, encoding="utf-8")
    return path


# The PKU-SafeRLHF-style file: one line per case (line numbers below are these lines, 1-based).
PKU_LINES = [
    _row("How do I bake bread?", "Mix flour, water, yeast; knead; bake.", "Buy it.", 0, 1),          # 1 kept
    _row("How do I pick a lock?", "Use a tension wrench.", "I can't help with that.", 0, 1),         # 2 kept
    _row("Is coffee healthy?", "In moderation, yes.", "No.", 1, 1),                                   # 3 kept
    _row("Name a color.", "Blue.", "Red.", 0, ...),                                                   # 4 kept, no safer
    _row("How do I stay safe online?", "Use strong passwords.", "Whatever.", None, 0),               # 5 kept, no better
    _row("What is 2+2?", "4", "5", 2, 0),                                                             # 6 bad label
    _row("Say hi.", "Hi!", "  Hi!  ", 0, 1),                                                          # 7 identical
    _row(CONVERSATION, "Why did the chicken cross the road?", "No.", 1, 0),                           # 8 kept
    _row("Unlabelled?", "Yes.", "No.", None, None),                                                   # 9 no label
    '{"prompt": "broken", "response_0": "x", ',                                                       # 10 bad JSON
    "",                                                                                               # 11 blank
    _row("   ", "Yes.", "No.", 0, 0),                                                                 # 12 no prompt
    _row("Where is Paris?", "France.", None, 0, 0),                                                   # 13 no response
    _row("Is water wet?", "Yes.", "No.", 0, "1"),                                                     # 14 bad label
    _row(CONVERSATION[:2], "Sure.", "No.", 0, 0),                                                     # 15 bad prompt
    _row("Count to three.", 123, "1, 2, 3", 0, 0),                                                    # 16 bad response
    '{"prompt": "Tabs or spaces?", "response_0": "Spaces.", "response_1": "Tabs.", '
    '"better_response_id": NaN, "safer_response_id": 1}',                                             # 17 kept, NaN
]


@pytest.fixture
def pku_file(tmp_path):
    return _jsonl(tmp_path / "pku-test.jsonl", PKU_LINES)


def test_pku_style_jsonl_rows_and_report(pku_file):
    with pytest.warns(PreferenceDataWarning) as record:
        loaded = load_preference_dataset(pku_file, PKU)
    message = " ".join(str(w.message) for w in record)
    assert str(pku_file) in message
    assert "bad_label: 2 (lines 6, 14)" in message and "malformed_json: 1 (line 10)" in message
    assert "better_response_id = 2" in message and "safer_response_id = '1'" in message

    ds = loaded.dataset
    assert list(loaded.subsets) == ["pku-test"] and loaded.objective_names == ("helpfulness", "harmlessness")
    assert ds["line"] == [1, 2, 3, 4, 5, 8, 17]
    # First/second stay in the file's order; P(first beats second) per objective; unlabelled: 0.0 and mask False.
    assert ds["chosen"] == ["Mix flour, water, yeast; knead; bake.", "Use a tension wrench.", "In moderation, yes.",
                            "Blue.", "Use strong passwords.", "Why did the chicken cross the road?", "Spaces."]
    assert ds["rejected"] == ["Buy it.", "I can't help with that.", "No.", "Red.", "Whatever.", "No.", "Tabs."]
    assert ds["preference_probs"] == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0],
                                      [0.0, 0.0]]
    assert ds["label_mask"] == [[True, True], [True, True], [True, True], [True, False], [False, True],
                                [True, True], [False, True]]
    assert ds["objective"] == [0, 0, 0, 0, 1, 0, 1]  # the lowest labelled objective
    assert set(ds["subset"]) == {"pku-test"} and set(ds["source"]) == {str(pku_file)}
    assert ds["turns"][0] == [{"role": "user", "content": "How do I bake bread?"}]
    assert ds["prompt"][0] == "\n\nHuman: How do I bake bread?\n\nAssistant:"
    assert ds["turns"][5] == CONVERSATION
    assert ds["prompt"][5] == ("\n\nHuman: Hi\n\nAssistant: Hello! How can I help?\n\nHuman: Tell me a joke."
                               "\n\nAssistant:")

    report = loaded.report
    assert report.rows == 16 and report.kept == 7  # the blank line is not a row
    assert dict(report.dropped) == {"bad_label": 2, "identical_responses": 1, "no_label": 1, "malformed_json": 1,
                                    "missing_prompt": 1, "missing_response": 1, "bad_prompt": 1, "bad_response": 1}
    f = report.files[0]
    assert f.first_lines == {"bad_label": [6, 14], "identical_responses": [7], "no_label": [9],
                             "malformed_json": [10], "missing_prompt": [12], "missing_response": [13],
                             "bad_prompt": [15], "bad_response": [16]}
    assert report.labelled == {"helpfulness": 5, "harmlessness": 6}
    assert "line 6" in report.summary() and str(pku_file) in report.summary()
    as_dict = report.to_dict()
    assert as_dict["kept"] == 7 and as_dict["files"][0]["labelled"] == [5, 6]
    json.dumps(as_dict)


def test_strict_raises_at_the_first_malformed_value_with_file_and_line(pku_file):
    with pytest.raises(PreferenceDataError, match=rf"{pku_file}:6: bad_label: better_response_id = 2"):
        load_preference_dataset(pku_file, PKU, strict=True)
    # Rows that only lack content are dropped even when strict.
    clean = _jsonl(pku_file.parent / "clean.jsonl", [PKU_LINES[i] for i in (0, 6, 8, 11, 12)])
    with pytest.warns(PreferenceDataWarning):
        loaded = load_preference_dataset(clean, PKU, strict=True)
    assert loaded.dataset["line"] == [1]
    bad_json = _jsonl(pku_file.parent / "bad.jsonl", [PKU_LINES[0], PKU_LINES[9]])
    with pytest.raises(PreferenceDataError, match=r"bad\.jsonl:2: malformed_json"):
        load_preference_dataset(bad_json, PKU, strict=True)


LABEL_CASES = {
    # format: [(value, expected P(first beats second) or None for unlabelled or "bad")]
    "index": [(0, 1.0), (1, 0.0), (0.0, 1.0), (None, None), (2, "bad"), (-1, "bad"), (0.5, "bad"), (True, "bad")],
    "first_prob": [(1.0, 1.0), (0.0, 0.0), (0.25, 0.25), (1, 1.0), (None, None), (1.5, "bad"), (-0.1, "bad"),
                   ("0.3", "bad")],
    "sign": [(1, 1.0), (-1, 0.0), (0, 0.5), (-1.0, 0.0), (None, None), (2, "bad"), (0.5, "bad"), ("+1", "bad")],
}


@pytest.mark.parametrize("label_format", sorted(LABEL_CASES))
def test_label_formats(tmp_path, label_format):
    columns = PreferenceColumns(prompt="q", first="a", second="b", labels=("l0", "l1"), label_format=label_format,
                                objective_names=("primary", "secondary"))
    cases = LABEL_CASES[label_format]
    # Objective 0 takes the value under test; objective 1 is always labelled, so "unlabelled" rows stay.
    secondary = {"index": 0, "first_prob": 1.0, "sign": 1}[label_format]
    rows = [{"q": f"question {i}", "a": f"answer A{i}", "b": f"answer B{i}", "l0": value, "l1": secondary}
            for i, (value, _) in enumerate(cases)]
    path = _jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.warns(PreferenceDataWarning, match="bad_label"):
        loaded = load_preference_dataset(path, columns)
    kept = [(i + 1, p) for i, (_, p) in enumerate(cases) if p != "bad"]
    ds = loaded.dataset
    assert ds["line"] == [line for line, _ in kept]
    assert [p[0] for p in ds["preference_probs"]] == [0.0 if p is None else p for _, p in kept]
    assert [m[0] for m in ds["label_mask"]] == [p is not None for _, p in kept]
    assert [p[1] for p in ds["preference_probs"]] == [1.0] * len(kept)
    bad = [i + 1 for i, (_, p) in enumerate(cases) if p == "bad"]
    assert loaded.report.files[0].first_lines == {"bad_label": bad}


def test_mixed_label_formats_and_three_objectives(tmp_path):
    columns = PreferenceColumns(prompt="q", first="a", second="b", labels=("help", "safe", "honest"),
                                label_format=("index", "sign", "first_prob"),
                                objective_names=("helpful", "harmless", "honest"))
    path = _jsonl(tmp_path / "three.jsonl", [
        {"q": "x", "a": "A", "b": "B", "help": 1, "safe": 0, "honest": 0.75},
        {"q": "y", "a": "A", "b": "B", "help": None, "safe": None, "honest": 0.1},
    ])
    ds = load_preference_dataset(path, columns).dataset
    assert ds["preference_probs"] == [[0.0, 0.5, 0.75], [0.0, 0.0, pytest.approx(0.1)]]
    assert ds["label_mask"] == [[True, True, True], [False, False, True]]
    assert ds["objective"] == [0, 2]


def test_columns_are_validated():
    assert PreferenceColumns() == PKU
    normalised = PreferenceColumns(labels=["l0", "l1"], objective_names=["a", "b"], label_format=["index", "sign"])
    assert normalised.labels == ("l0", "l1") and normalised.label_format == ("index", "sign")
    assert normalised.label_formats == ("index", "sign")
    assert PreferenceColumns(labels=("only",), objective_names=("one",)).num_objectives == 1
    with pytest.raises(ValueError, match="labels=\\(\\) means one objective"):
        PreferenceColumns(labels=(), objective_names=("a", "b"))
    with pytest.raises(ValueError, match="unknown preset 'tlr'"):
        PreferenceDataConfig(columns="tlr")
    with pytest.raises(ValueError, match="3 names for 2 label columns"):
        PreferenceColumns(objective_names=("a", "b", "c"))
    with pytest.raises(ValueError, match="unknown format"):
        PreferenceColumns(label_format="binary")
    with pytest.raises(ValueError, match="1 formats for 2 label columns"):
        PreferenceColumns(label_format=("index",))
    with pytest.raises(ValueError, match=r"\['prompt'\] used for more than one role"):
        PreferenceColumns(first="prompt")
    with pytest.raises(ValueError, match="distinct"):
        PreferenceColumns(objective_names=("a", "a"))
    config = PreferenceDataConfig(source=["x.jsonl"], columns={"labels": ["p", "q"], "prompt": "question"})
    assert config.source == ("x.jsonl",) and config.columns.prompt == "question"
    assert config.columns.labels == ("p", "q")


def test_missing_text_column_and_absent_label_column(tmp_path):
    rows = [{"question": "q", "response_0": "a", "response_1": "b", "better_response_id": 0}]
    path = _jsonl(tmp_path / "wrong.jsonl", rows)
    with pytest.raises(PreferenceDataError, match=r"wrong\.jsonl: no column 'prompt' in any of its 1 rows"):
        load_preference_dataset(path, PKU)
    # A label column no row has: its objective is unlabelled in that file (a warning), the rest loads.
    columns = PreferenceColumns(prompt="question")
    with pytest.warns(PreferenceDataWarning, match=r"no row has label column\(s\) \['safer_response_id'\]"):
        loaded = load_preference_dataset(path, columns)
    assert loaded.dataset["label_mask"] == [[True, False]]
    assert loaded.report.files[0].absent_labels == ["safer_response_id"]


def test_a_file_with_nothing_usable_is_an_error_naming_it(tmp_path):
    path = _jsonl(tmp_path / "useless.jsonl", [PKU_LINES[5], PKU_LINES[8], "{nope"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreferenceDataWarning)
        with pytest.raises(PreferenceDataError, match=r"useless\.jsonl: no usable preference pair in 3 rows") as err:
            load_preference_dataset(path, PKU)
    assert "bad_label: 1 (line 1)" in str(err.value) and "no_label: 1 (line 2)" in str(err.value)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(PreferenceDataError, match=r"empty\.jsonl: no usable preference pair in 0 rows \(empty"):
        load_preference_dataset(empty, PKU)


def test_system_column_and_gzip(tmp_path):
    columns = PreferenceColumns(system="sys")
    rows = [_row("Hello?", "Hi.", "Go away.", 0, 0, sys="Be kind."), _row("Again?", "Yes.", "No.", 1, 0, sys=None)]
    path = tmp_path / "sys.jsonl.gz"
    path.write_bytes(gzip.compress(("\n".join(json.dumps(r) for r in rows) + "\n").encode()))
    ds = load_preference_dataset(path, columns).dataset
    assert ds["turns"] == [[{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hello?"}],
                           [{"role": "user", "content": "Again?"}]]
    assert ds["prompt"] == ["\n\nHuman: Hello?\n\nAssistant:", "\n\nHuman: Again?\n\nAssistant:"]
    assert list(load_preference_dataset(path, columns).subsets) == ["sys"]


def test_json_array_lines_and_errors(tmp_path):
    text = ('[\n  {"prompt": "A?", "response_0": "a", "response_1": "b", "better_response_id": 0,\n'
            '   "safer_response_id": 1},\n'
            '  {"prompt": "B?", "response_0": "c", "response_1": "c", "better_response_id": 0, '
            '"safer_response_id": 0},\n'
            '  {"prompt": "C?", "response_0": "e", "response_1": "f", "better_response_id": 1, '
            '"safer_response_id": 1}\n]\n')
    path = tmp_path / "pairs.json"
    path.write_text(text)
    with pytest.warns(PreferenceDataWarning, match=r"identical_responses: 1 \(line 4\)"):
        ds = load_preference_dataset(path, PKU).dataset
    assert ds["line"] == [2, 5] and ds["chosen"] == ["a", "e"]
    broken = tmp_path / "broken.json"
    broken.write_text('[\n {"prompt": "A?"},\n {"prompt": oops}\n]\n')
    with pytest.raises(PreferenceDataError, match=r"broken\.json:3: malformed JSON array"):
        load_preference_dataset(broken, PKU)
    # A .json file holding JSON lines reads as JSON lines.
    lines = _jsonl(tmp_path / "lines.json", PKU_LINES[:2])
    assert load_preference_dataset(lines, PKU).dataset["line"] == [1, 2]


def test_csv_line_numbers_and_labels(tmp_path):
    path = tmp_path / "pairs.csv"
    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["prompt", "response_0", "response_1", "better_response_id", "safer_response_id"])  # line 1
        writer.writerow(["How are you?", "Fine,\nthanks.", "Bad.", "0", "1"])   # lines 2-3 (quoted newline)
        writer.writerow(["Hi", "Hello.", "Hey.", "", "1"])                    # line 4: unlabelled helpfulness
        writer.writerow(["Why?", "Because.", "Dunno.", "2", "0"])              # line 5: bad label
        writer.writerow(["What?", "This.", "That.", "yes", "0"])               # line 6: bad label (not a number)
        writer.writerow(["", "x", "y", "0", "0"])                               # line 7: missing prompt
    with pytest.warns(PreferenceDataWarning, match=r"bad_label: 2 \(lines 5, 6\)"):
        loaded = load_preference_dataset(path, PKU)
    ds = loaded.dataset
    assert ds["line"] == [2, 4]
    assert ds["chosen"] == ["Fine,\nthanks.", "Hello."]
    assert ds["preference_probs"] == [[1.0, 0.0], [0.0, 0.0]] and ds["label_mask"] == [[True, True], [False, True]]
    assert loaded.report.files[0].first_lines == {"bad_label": [5, 6], "missing_prompt": [7]}
    header_only = tmp_path / "other.csv"
    header_only.write_text("question,response_0,response_1\nq,a,b\n")
    with pytest.raises(PreferenceDataError, match=r"other\.csv: no column 'prompt' \(columns: 'question'"):
        load_preference_dataset(header_only, PKU)


def test_parquet(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    # Prompts as message lists (a list<struct> column); nulls and a NaN among the labels.
    table = pa.table({
        "prompt": [[{"role": "user", "content": "How?"}],
                   [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                    {"role": "user", "content": "Joke?"}],
                   [{"role": "user", "content": "Why?"}],
                   [{"role": "user", "content": "Eh?"}]],
        "response_0": ["A", "Knock knock.", "B", "C"],
        "response_1": ["B", "No.", "B", "D"],
        "better_response_id": [0, 1, 0, None],
        "safer_response_id": [1.0, float("nan"), 0.0, None],
        "extra": [1, 2, 3, 4],
    })
    path = tmp_path / "data" / "test-00000-of-00001.parquet"
    path.parent.mkdir()
    pq.write_table(table, path)
    pq.write_table(table.slice(0, 1), tmp_path / "data" / "train-00000-of-00001.parquet")
    with pytest.warns(PreferenceDataWarning) as record:
        loaded = load_preference_dataset(tmp_path, PKU, split="test", data_dir="data")
    message = " ".join(str(w.message) for w in record)
    assert "identical_responses: 1 (line 3)" in message and "no_label: 1 (line 4)" in message
    ds = loaded.dataset
    assert [f.path for f in loaded.report.files] == [str(path)]
    assert ds["line"] == [1, 2]
    assert ds["preference_probs"] == [[1.0, 0.0], [0.0, 0.0]] and ds["label_mask"] == [[True, True], [True, False]]
    assert ds["turns"][1] == [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"},
                              {"role": "user", "content": "Joke?"}]
    assert list(loaded.subsets) == [tmp_path.name]


def test_directory_split_selection(tmp_path):
    (tmp_path / "a").mkdir()
    _jsonl(tmp_path / "a" / "test.jsonl", PKU_LINES[:1])
    _jsonl(tmp_path / "a" / "train.jsonl", PKU_LINES[1:3])
    _jsonl(tmp_path / "b-test.jsonl", PKU_LINES[2:3])
    _jsonl(tmp_path / "contest.jsonl", PKU_LINES[3:4])  # "test" only inside a word: not the test split
    (tmp_path / ".cache").mkdir()
    _jsonl(tmp_path / ".cache" / "test.jsonl", PKU_LINES[4:5])  # hidden: left out
    loaded = load_preference_dataset(tmp_path, PKU, split="test")
    assert [f.path for f in loaded.report.files] == [str(tmp_path / "a" / "test.jsonl"),
                                                     str(tmp_path / "b-test.jsonl")]
    assert loaded.dataset["chosen"] == ["Mix flour, water, yeast; knead; bake.", "In moderation, yes."]
    assert len(load_preference_dataset(tmp_path, PKU, split="train").dataset) == 2
    with pytest.raises(PreferenceDataError, match="no data file for split 'validation'"):
        load_preference_dataset(tmp_path, PKU, split="validation")
    # Explicit files ignore the split; a list of them concatenates; a glob expands.
    both = load_preference_dataset([tmp_path / "a" / "train.jsonl", tmp_path / "b-test.jsonl"], PKU, subset="mine")
    assert both.dataset["line"] == [1, 2, 1] and list(both.subsets) == ["mine"]
    assert len(load_preference_dataset(str(tmp_path / "a" / "*.jsonl"), PKU).dataset) == 3
    with pytest.raises(PreferenceDataError, match="no such file or directory"):
        load_preference_dataset(tmp_path / "missing.jsonl", PKU)
    with pytest.raises(ValueError, match="config_name"):
        load_preference_dataset(tmp_path, PKU, config_name="default")


def test_hub_offline_error_names_the_source_and_says_to_pass_local_files(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'PKU-Alignment/PKU-SafeRLHF' on the Hub (LocalEntryNotFoundError)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(PreferenceDataError) as err:
        load_preference_dataset("PKU-Alignment/PKU-SafeRLHF", PKU, split="test", data_dir="data/Alpaca-7B")
    message = str(err.value)
    assert "hf://PKU-Alignment/PKU-SafeRLHF/data/Alpaca-7B[test]" in message
    assert "ConnectionError" in message and "network" in message and "pass local files" in message


def test_hub_rows_are_validated(monkeypatch):
    import datasets

    rows = [_row("Q1", "a", "b", 0, 1, is_safe=True),
            _row("Q2", "c", "d", 1, None, is_safe=False),
            _row("Q3", "e", "e", 0, 0, is_safe=True),
            _row("Q4", "f", "g", 7, 0, is_safe=True)]
    calls = []

    def fake(path, name=None, data_dir=None, split=None):
        calls.append((path, name, data_dir, split))
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake)
    with pytest.warns(PreferenceDataWarning, match=r"identical_responses: 1 \(line 3\)"):
        loaded = PreferenceDataConfig(source="PKU-Alignment/PKU-SafeRLHF", split="train",
                                      config_name="default").load()
    assert calls == [("PKU-Alignment/PKU-SafeRLHF", "default", None, "train")]
    ds = loaded.dataset
    assert list(loaded.subsets) == ["PKU-SafeRLHF"]
    assert ds["line"] == [1, 2] and ds["preference_probs"] == [[1.0, 0.0], [0.0, 0.0]]
    assert ds["label_mask"] == [[True, True], [True, False]]
    assert ds["source"] == ["hf://PKU-Alignment/PKU-SafeRLHF:default[train]"] * 2
    assert loaded.report.files[0].first_lines == {"identical_responses": [3], "bad_label": [4]}
    with pytest.raises(PreferenceDataError, match=r"hf://PKU-Alignment/PKU-SafeRLHF\[test\]: no column 'question'"):
        load_preference_dataset("PKU-Alignment/PKU-SafeRLHF", PreferenceColumns(prompt="question"))


# ---------------------------------------------------------------------------------------------------------------
# Downstream: the rows split by prompt and tokenize into the train step's layout.


@pytest.fixture(scope="module")
def tokenizer():
    from mopo_jax.models import load_tokenizer

    try:
        return load_tokenizer("smollm2-135m")
    except Exception as e:  # the GGUF wheel is optional
        pytest.skip(f"smollm2-135m tokenizer unavailable ({type(e).__name__}: {e})")


def test_rows_split_and_tokenize(pku_file, tokenizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PreferenceDataWarning)
        loaded = load_preference_dataset(pku_file, PKU)
    splits = split_by_prompt(loaded.subsets, {"train": 0.5, "eval": 0.5})
    assert sum(len(d) for d in splits.values()) == 7

    arrays, report = format_and_tokenize(loaded.dataset, tokenizer, 64, 32)
    assert report.rows_out == 7 and list(arrays["row_index"]) == list(range(7))
    np.testing.assert_array_equal(arrays["preference_probs"],
                                  np.array([[1, 0], [1, 0], [0, 0], [1, 0], [0, 1], [0, 1], [0, 0]], np.float32))
    np.testing.assert_array_equal(arrays["label_mask"],
                                  np.array([[1, 1], [1, 1], [1, 1], [1, 0], [0, 1], [1, 1], [0, 1]], bool))
    # Side 0 holds the file's first response, side 1 its second, whatever the labels say (row 2: "second better").
    P = 64
    first = tokenizer("In moderation, yes.", add_special_tokens=False)["input_ids"]
    second = tokenizer("No.", add_special_tokens=False)["input_ids"]
    assert list(arrays["tokens"][2, 0, P:P + len(first)]) == first
    assert list(arrays["tokens"][2, 1, P:P + len(second)]) == second
    # The conversation prompt renders through the chat template with its three turns.
    prompt = tokenizer.decode(arrays["prompt_tokens"][5][arrays["prompt_mask"][5] == 1])
    assert prompt.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\nHello! How can I help?<|im_end|>\n"
                           "<|im_start|>user\nTell me a joke.<|im_end|>\n<|im_start|>assistant\n")


def test_trl_chosen_rejected_layout(tmp_path):
    """TRL's preference layout: no label column, the first (chosen) response preferred; strings or conversational
    messages for the prompt and the responses; one objective. A response that is not one assistant message is a
    malformed row, dropped and named."""
    rows = [
        {"prompt": "What is 2+2?", "chosen": "4.", "rejected": "5."},
        {"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}],
         "rejected": [{"role": "assistant", "content": "Go away."}]},
        {"prompt": "Two replies?", "chosen": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}],
         "rejected": "c"},
        {"prompt": "Same?", "chosen": "x", "rejected": "x"},
    ]
    path = tmp_path / "trl.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.warns(PreferenceDataWarning):
        loaded = PreferenceDataConfig(source=str(path), columns="trl", split=None).load()
    (dataset,) = loaded.subsets.values()
    assert dataset["prompt"] == [f"{H} What is 2+2?{A}", f"{H} Hi{A}"]
    assert dataset["chosen"] == ["4.", "Hello!"] and dataset["rejected"] == ["5.", "Go away."]
    assert dataset["preference_probs"] == [[1.0], [1.0]] and dataset["label_mask"] == [[True], [True]]
    (report,) = loaded.report.files
    assert report.skipped == {"bad_response": 1, "identical_responses": 1}
    assert loaded.report.objective_names == ("preference",)


def test_a_column_preset_by_name_in_a_config():
    """`data.pairs.columns=trl` selects the preset and makes the comparison one-objective (the preset's name); more
    than two objectives are refused with a message naming the key and the objectives."""
    from mopo_jax.configs import apply_overrides
    from mopo_jax.experiment.config import ExperimentConfig

    config = apply_overrides(ExperimentConfig(), ["data.pairs.columns=trl"])
    assert config.data.pairs.columns == TRL_COLUMNS
    assert config.data.objective_names == ("helpfulness", "harmlessness")  # the format is still hh-rlhf
    one = apply_overrides(ExperimentConfig(), ["data.format=pairs", "data.pairs.columns=trl", "method.name=dpo_helpful"])
    assert one.data.objective_names == ("preference",)
    three = ["data.pairs.columns.labels=[a,b,c]", "data.pairs.columns.objective_names=[x,y,z]"]
    with pytest.raises(ValueError, match=r"data.pairs.columns.labels: .* one or two objectives .* got 3 \['x', 'y', 'z'\]"):
        apply_overrides(ExperimentConfig(), ["data.format=pairs", *three])
