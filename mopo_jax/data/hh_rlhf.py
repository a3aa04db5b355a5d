"""Anthropic HH-RLHF preference pairs: validated loading, parsing, objective labels and prompt-disjoint splits.

Data format (``Anthropic/hh-rlhf``): JSON lines ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected":
"..."}``; both strings carry the whole dialogue and differ only in the final assistant turn.

* :func:`load_hh_rlhf` reads a local directory of ``<subset>-<split>.jsonl.gz`` files (or the hub layout
  ``<subset>/<split>.jsonl.gz``; gzip'd or plain) with a validating line reader: a bad line (invalid UTF-8,
  malformed JSON, missing or non-string key, empty/identical responses, ...) is skipped, counted per reason and
  reported with its file and line number; a file that yields no valid pair is an error naming the file. A hub name
  (``"Anthropic/hh-rlhf"``) goes through ``datasets.load_dataset(name, data_dir=subset)`` (needs network) and the
  same per-record validation. Each subset comes back as a ``datasets.Dataset`` (columns: :data:`COLUMNS`).
* :func:`parse_pair` splits a (chosen, rejected) pair at the last common ``"\\n\\nAssistant:"``.
* Objectives: helpfulness (0) for ``helpful-*`` subsets, harmlessness (1) for ``harmless-base``; each pair is labelled
  for its own objective only (``preference_probs`` 1.0 and ``label_mask`` True there, 0/False elsewhere).
* :func:`split_by_prompt` assigns pairs to ``policy_train`` / ``labeler_train`` / ``judge_train`` / ``eval`` by a
  salted sha256 of the normalised prompt: deterministic, independent of input order, disjoint by prompt.

``datasets`` is imported lazily (only by the functions that build ``Dataset`` objects).
"""

from __future__ import annotations

import collections
import dataclasses
import gzip
import hashlib
import json
import os
import re
import unicodedata
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

HUMAN = "\n\nHuman:"
ASSISTANT = "\n\nAssistant:"
_TURN_RE = re.compile(r"\n\n(Human|Assistant):")
_ROLES = {"Human": "user", "Assistant": "assistant"}

DEFAULT_SUBSETS = ("helpful-base", "harmless-base", "helpful-rejection-sampled")
OBJECTIVE_NAMES = ("helpfulness", "harmlessness")
NUM_OBJECTIVES = len(OBJECTIVE_NAMES)
SUBSET_OBJECTIVES = {
    "helpful-base": 0,
    "helpful-rejection-sampled": 0,
    "helpful-online": 0,
    "harmless-base": 1,
}
SPLIT_NAMES = ("policy_train", "labeler_train", "judge_train", "eval")
DEFAULT_SPLIT_FRACTIONS = {"policy_train": 0.4, "labeler_train": 0.2, "judge_train": 0.2, "eval": 0.2}
DEFAULT_SPLIT_SALT = "mopo-hh-rlhf-v1"

# Reasons a record is skipped (parse reasons first, then reader-level ones).
NO_ASSISTANT_TURN = "no_assistant_turn"
IDENTICAL_RESPONSES = "identical_responses"
EMPTY_RESPONSE = "empty_response"
DIVERGES_BEFORE_FINAL_TURN = "diverges_before_final_turn"
INVALID_UTF8 = "invalid_utf8"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
MISSING_KEY = "missing_key"
NOT_A_STRING = "not_a_string"
INVALID_TEXT = "invalid_text"  # valid JSON whose strings hold lone surrogates (not encodable as UTF-8)
CORRUPT_FILE = "corrupt_file"
MISSING_FILE = "missing_file"
REASONS = (NO_ASSISTANT_TURN, IDENTICAL_RESPONSES, EMPTY_RESPONSE, DIVERGES_BEFORE_FINAL_TURN, INVALID_UTF8,
           MALFORMED_JSON, NOT_AN_OBJECT, MISSING_KEY, NOT_A_STRING, INVALID_TEXT, CORRUPT_FILE, MISSING_FILE)

COLUMNS = ("subset", "objective", "prompt", "turns", "chosen", "rejected", "preference_probs", "label_mask",
           "prompt_hash", "source", "line")
_MAX_EXAMPLE_LINES = 5


class HHRLHFWarning(UserWarning):
    """Skipped input (bad lines, missing files) while loading HH-RLHF."""


class HHRLHFDataError(ValueError):
    """Nothing valid could be loaded (the message names the file / source)."""


# ---------------------------------------------------------------------------------------------------------------
# Parsing.


@dataclasses.dataclass(frozen=True)
class ParsedPair:
    """One preference pair split at its last common assistant turn.

    Attributes:
      prompt: the shared dialogue prefix, up to and including the last common ``"\\n\\nAssistant:"``.
      turns: the prompt's turns ``((role, text), ...)``, role ``"user"`` or ``"assistant"``, text stripped; the empty
        trailing assistant slot is not a turn.
      chosen: the chosen final assistant response (stripped).
      rejected: the rejected final assistant response (stripped).
    """
    prompt: str
    turns: tuple[tuple[str, str], ...]
    chosen: str
    rejected: str

    def messages(self) -> list[dict[str, str]]:
        """``[{"role", "content"}]`` of the prompt (for a chat template)."""
        return [{"role": r, "content": t} for r, t in self.turns]


def _common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo], a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def parse_turns(prompt: str) -> tuple[tuple[str, str], ...]:
    """``((role, text), ...)`` of an HH-RLHF dialogue (``"\\n\\nHuman: ...\\n\\nAssistant: ..."``).

    Text before the first marker (normally none) becomes a user turn; an empty trailing assistant turn (the slot the
    response fills) is dropped. Consecutive turns of one role are kept as they are (see
    :func:`merge_consecutive_turns`).
    """
    parts = _TURN_RE.split(prompt)
    turns: list[tuple[str, str]] = []
    if parts[0].strip():
        turns.append(("user", parts[0].strip()))
    for i in range(1, len(parts), 2):
        turns.append((_ROLES[parts[i]], parts[i + 1].strip()))
    if turns and turns[-1][0] == "assistant" and not turns[-1][1]:
        turns.pop()
    return tuple(turns)


def merge_consecutive_turns(turns: Sequence[tuple[str, str]]) -> tuple[tuple[str, str], ...]:
    """Join consecutive same-role turns with a blank line (chat templates that insist on alternation)."""
    out: list[tuple[str, str]] = []
    for role, text in turns:
        if out and out[-1][0] == role:
            prev = out[-1][1]
            out[-1] = (role, f"{prev}\n\n{text}" if prev and text else prev or text)
        else:
            out.append((role, text))
    return tuple(out)


def parse_pair_with_reason(chosen: str, rejected: str) -> tuple[ParsedPair | None, str | None]:
    """:func:`parse_pair` plus the reason a pair is rejected (``None`` when it parses).

    Reasons: :data:`NO_ASSISTANT_TURN` (no ``"\\n\\nAssistant:"`` common to both texts),
    :data:`IDENTICAL_RESPONSES`, :data:`EMPTY_RESPONSE` (a final response that is blank), and
    :data:`DIVERGES_BEFORE_FINAL_TURN` (the texts already differ before their final assistant turn, i.e. a "response"
    would hold further ``Human:``/``Assistant:`` turns).
    """
    n = _common_prefix_length(chosen, rejected)
    cut = chosen.rfind(ASSISTANT, 0, n)  # the last marker lying wholly inside the common prefix
    if cut < 0:
        return None, NO_ASSISTANT_TURN
    start = cut + len(ASSISTANT)
    chosen_response, rejected_response = chosen[start:].strip(), rejected[start:].strip()
    if chosen_response == rejected_response:
        return None, IDENTICAL_RESPONSES
    if not chosen_response or not rejected_response:
        return None, EMPTY_RESPONSE
    for response in (chosen[start:], rejected[start:]):
        if ASSISTANT in response or HUMAN in response:
            return None, DIVERGES_BEFORE_FINAL_TURN
    prompt = chosen[:start]
    return ParsedPair(prompt=prompt, turns=parse_turns(prompt), chosen=chosen_response,
                      rejected=rejected_response), None


def parse_pair(chosen: str, rejected: str) -> ParsedPair | None:
    """Split a pair at the last common ``"\\n\\nAssistant:"`` turn; ``None`` for an unusable pair.

    The prompt is the shared dialogue prefix up to and including the last ``"\\n\\nAssistant:"`` that lies before the
    two texts diverge; chosen/rejected are the remaining final assistant responses, stripped. Unusable pairs
    (identical responses, a blank response, no assistant turn, texts that diverge before their final turn) give
    ``None``; :func:`parse_pair_with_reason` says why.
    """
    return parse_pair_with_reason(chosen, rejected)[0]


def normalize_prompt(text: str) -> str:
    """Normalised text for prompt hashing: NFKC, case-folded, whitespace runs collapsed, stripped."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def prompt_hash(prompt: str) -> str:
    """Hex sha256 of :func:`normalize_prompt` ``(prompt)``."""
    return hashlib.sha256(normalize_prompt(prompt).encode("utf-8")).hexdigest()


def objective_labels(objective: int, num_objectives: int = NUM_OBJECTIVES) -> tuple[list[float], list[bool]]:
    """``(preference_probs [K], label_mask [K])`` of a human "chosen" label for one objective."""
    if not 0 <= objective < num_objectives:
        raise ValueError(f"objective {objective} out of range for {num_objectives} objectives")
    probs = [0.0] * num_objectives
    mask = [False] * num_objectives
    probs[objective], mask[objective] = 1.0, True
    return probs, mask


def make_record(pair: ParsedPair, subset: str, objective: int, *, source: str = "", line: int = 0,
                num_objectives: int = NUM_OBJECTIVES) -> dict[str, Any]:
    """The dataset row of a parsed pair (columns :data:`COLUMNS`)."""
    probs, mask = objective_labels(objective, num_objectives)
    return {
        "subset": subset,
        "objective": objective,
        "prompt": pair.prompt,
        "turns": [{"role": r, "content": t} for r, t in pair.turns],
        "chosen": pair.chosen,
        "rejected": pair.rejected,
        "preference_probs": probs,
        "label_mask": mask,
        "prompt_hash": prompt_hash(pair.prompt),
        "source": source,
        "line": line,
    }


def features(num_objectives: int = NUM_OBJECTIVES):
    """``datasets.Features`` of the rows (:data:`COLUMNS`)."""
    from datasets import Features, List, Value

    return Features({
        "subset": Value("string"),
        "objective": Value("int32"),
        "prompt": Value("string"),
        "turns": List({"role": Value("string"), "content": Value("string")}),
        "chosen": Value("string"),
        "rejected": Value("string"),
        "preference_probs": List(Value("float32"), length=num_objectives),
        "label_mask": List(Value("bool"), length=num_objectives),
        "prompt_hash": Value("string"),
        "source": Value("string"),
        "line": Value("int64"),
    })


def records_to_dataset(records: Sequence[Mapping[str, Any]], num_objectives: int = NUM_OBJECTIVES):
    """``datasets.Dataset`` of rows (possibly none) with :func:`features`."""
    from datasets import Dataset

    feats = features(num_objectives)
    return Dataset.from_dict({k: [r[k] for r in records] for k in feats}, features=feats)


# ---------------------------------------------------------------------------------------------------------------
# Reports.


@dataclasses.dataclass
class FileReport:
    """What one file (or hub subset) gave.

    Attributes:
      path: file path (or ``hf://<name>/<subset>[<split>]``).
      subset: subset name.
      exists: False when the file was not found.
      lines: non-blank lines read.
      valid: pairs kept.
      skipped: count per reason.
      first_lines: per reason, the first few offending (1-based) line numbers.
      errors: messages of errors that stopped reading (corrupt gzip stream).
    """
    path: str
    subset: str
    exists: bool = True
    lines: int = 0
    valid: int = 0
    skipped: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    first_lines: dict[str, list[int]] = dataclasses.field(default_factory=dict)
    errors: list[str] = dataclasses.field(default_factory=list)

    def skip(self, reason: str, line: int) -> None:
        self.skipped[reason] += 1
        examples = self.first_lines.setdefault(reason, [])
        if len(examples) < _MAX_EXAMPLE_LINES:
            examples.append(line)

    def describe(self) -> str:
        parts = []
        for reason, count in sorted(self.skipped.items()):
            lines = ", ".join(map(str, self.first_lines.get(reason, [])))
            more = ", ..." if count > _MAX_EXAMPLE_LINES else ""
            parts.append(f"{reason}: {count} (line{'s' if count > 1 else ''} {lines}{more})")
        return "; ".join(parts)


@dataclasses.dataclass
class LoadReport:
    """Per-file outcome of :func:`load_hh_rlhf`."""
    source: str
    split: str
    files: list[FileReport] = dataclasses.field(default_factory=list)

    @property
    def skipped(self) -> collections.Counter:
        """Skipped records per reason, over all files."""
        total: collections.Counter = collections.Counter()
        for f in self.files:
            total.update(f.skipped)
        return total

    @property
    def valid(self) -> dict[str, int]:
        """Valid pairs per subset."""
        out: dict[str, int] = {}
        for f in self.files:
            out[f.subset] = out.get(f.subset, 0) + f.valid
        return out

    @property
    def missing_files(self) -> list[str]:
        return [f.path for f in self.files if not f.exists]

    def file(self, subset: str) -> FileReport:
        for f in self.files:
            if f.subset == subset:
                return f
        raise KeyError(subset)

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "split": self.split,
            "valid": self.valid,
            "skipped": dict(self.skipped),
            "files": [{"path": f.path, "subset": f.subset, "exists": f.exists, "lines": f.lines, "valid": f.valid,
                       "skipped": dict(f.skipped), "first_lines": dict(f.first_lines), "errors": list(f.errors)}
                      for f in self.files],
        }

    def summary(self) -> str:
        lines = [f"HH-RLHF {self.source} [{self.split}]"]
        for f in self.files:
            if not f.exists:
                lines.append(f"  {f.subset}: MISSING {f.path}")
                continue
            lines.append(f"  {f.subset}: {f.valid} valid of {f.lines} lines ({f.path})"
                         + (f"; skipped {f.describe()}" if f.skipped else ""))
        return "\n".join(lines)


class LoadedHH(NamedTuple):
    """Result of :func:`load_hh_rlhf`: a ``datasets.Dataset`` per subset and the :class:`LoadReport`."""
    subsets: dict
    report: LoadReport


# ---------------------------------------------------------------------------------------------------------------
# Validated reading.


def _validate(obj: Any, report: FileReport, line: int, subset: str, objective: int, num_objectives: int):
    if not isinstance(obj, dict):
        report.skip(NOT_AN_OBJECT, line)
        return None
    if "chosen" not in obj or "rejected" not in obj:
        report.skip(MISSING_KEY, line)
        return None
    chosen, rejected = obj["chosen"], obj["rejected"]
    if not isinstance(chosen, str) or not isinstance(rejected, str):
        report.skip(NOT_A_STRING, line)
        return None
    try:  # a JSON escape such as "\ud800" decodes to a lone surrogate, which no UTF-8 consumer accepts
        chosen.encode("utf-8")
        rejected.encode("utf-8")
    except UnicodeEncodeError:
        report.skip(INVALID_TEXT, line)
        return None
    pair, reason = parse_pair_with_reason(chosen, rejected)
    if pair is None:
        report.skip(reason, line)
        return None
    report.valid += 1
    return make_record(pair, subset, objective, source=report.path, line=line, num_objectives=num_objectives)


def is_gzip(path: str | os.PathLike) -> bool:
    """Whether a file is gzip'd (its magic bytes, whatever its name)."""
    with open(path, "rb") as raw:
        return raw.read(2) == b"\x1f\x8b"


def json_lines(path: str | os.PathLike, report, drop) -> Iterator[tuple[int, Any]]:
    """``(line number, parsed JSON value)`` of each non-blank line of a (gzip'd or plain) JSON-lines file, read line
    by line as bytes: the one reader of both data loaders.

    Every line is decoded as strict UTF-8 (a BOM allowed on the first) and parsed on its own; a bad line is passed
    to ``drop(reason, line, detail)`` (:data:`INVALID_UTF8`, :data:`MALFORMED_JSON`) and skipped. A truncated or
    corrupt gzip stream keeps the lines read before the damage, drops :data:`CORRUPT_FILE` at the line where reading
    stopped and appends the error to ``report.errors``. ``report.lines`` counts the non-blank lines.
    """
    line_no = 0
    try:
        with (gzip.open if is_gzip(path) else open)(path, "rb") as handle:
            for line_no, raw in enumerate(handle, start=1):
                if not raw.strip():
                    continue
                report.lines += 1
                try:
                    text = raw.decode("utf-8-sig" if line_no == 1 else "utf-8")
                except UnicodeDecodeError:
                    drop(INVALID_UTF8, line_no, None)
                    continue
                try:
                    value = json.loads(text)
                except (json.JSONDecodeError, RecursionError) as e:
                    drop(MALFORMED_JSON, line_no, getattr(e, "msg", type(e).__name__))
                    continue
                yield line_no, value
    except (EOFError, OSError, zlib.error) as e:  # truncated / corrupt gzip (gzip.BadGzipFile is an OSError)
        drop(CORRUPT_FILE, line_no + 1, None)
        report.errors.append(f"line {line_no + 1}: {type(e).__name__}: {e}")


def read_jsonl_pairs(path: str | os.PathLike, subset: str, objective: int,
                     num_objectives: int = NUM_OBJECTIVES) -> tuple[list[dict[str, Any]], FileReport]:
    """Validated records of one (gzip'd or plain) JSON-lines file, read line by line as bytes.

    Every line is decoded as strict UTF-8 and parsed on its own; a bad line is skipped and counted in the returned
    :class:`FileReport` (with its 1-based line number). A truncated / corrupt gzip stream keeps the lines read before
    the damage and counts :data:`CORRUPT_FILE` at the line where reading stopped. A missing file gives no records and
    a report with ``exists=False``. No warnings here (see :func:`load_hh_rlhf`).
    """
    path = Path(path)
    report = FileReport(path=str(path), subset=subset)
    records: list[dict[str, Any]] = []
    if not path.is_file():
        report.exists = False
        report.skip(MISSING_FILE, 0)
        return records, report
    for line_no, obj in json_lines(path, report, lambda reason, line, detail: report.skip(reason, line)):
        record = _validate(obj, report, line_no, subset, objective, num_objectives)
        if record is not None:
            records.append(record)
    return records, report


def _resolve_file(directory: Path, subset: str, split: str) -> Path:
    candidates = [directory / f"{subset}-{split}.jsonl.gz", directory / f"{subset}-{split}.jsonl",
                  directory / subset / f"{split}.jsonl.gz", directory / subset / f"{split}.jsonl"]
    for c in candidates:
        if c.is_file():
            return c
    return candidates[0]


def _looks_local(source: str) -> bool:
    return (os.path.isabs(source) or source.startswith((".", "~")) or os.path.exists(source)
            or source.count("/") > 1 or "\\" in source)


def _warn_file(report: FileReport) -> None:
    if not report.exists:
        warnings.warn(f"hh-rlhf: {report.path}: file not found; subset {report.subset!r} skipped",
                      HHRLHFWarning, stacklevel=3)
    elif report.skipped:
        warnings.warn(f"hh-rlhf: {report.path}: skipped {sum(report.skipped.values())} of {report.lines} lines "
                      f"({report.describe()}); kept {report.valid}"
                      + (f"; reading stopped: {'; '.join(report.errors)}" if report.errors else ""),
                      HHRLHFWarning, stacklevel=3)


def _objective_of(subset: str, objectives: Mapping[str, int]) -> int:
    if subset not in objectives:
        raise ValueError(f"hh-rlhf: unknown subset {subset!r}: no objective for it (known: {sorted(objectives)}); "
                         "pass objectives={subset: k}")
    return objectives[subset]


def load_hh_rlhf(source: str | os.PathLike, subsets: Sequence[str] = DEFAULT_SUBSETS, split: str = "test", *,
                 objectives: Mapping[str, int] = SUBSET_OBJECTIVES,
                 num_objectives: int = NUM_OBJECTIVES, allow_missing: bool = False) -> LoadedHH:
    """Load HH-RLHF preference pairs, one ``datasets.Dataset`` per subset, plus a :class:`LoadReport`.

    Args:
      source: a local directory holding ``<subset>-<split>.jsonl.gz`` (or ``.jsonl``, or the hub layout
        ``<subset>/<split>.jsonl.gz``), or a Hugging Face hub name such as ``"Anthropic/hh-rlhf"`` (loaded with
        ``datasets.load_dataset(source, data_dir=subset, split=split)``; needs network).
      subsets: subset names; each must have an objective in ``objectives``.
      split: ``"test"`` or ``"train"``.
      objectives: subset -> objective index (default: helpful-* -> 0, harmless-base -> 1).
      num_objectives: ``K``, the length of ``preference_probs`` / ``label_mask``.
      allow_missing: when True, a missing subset file only warns (:class:`HHRLHFWarning`) and gives an empty
        dataset for that subset; by default it is an error (training on fewer objectives than asked for silently
        is worse than stopping).

    Returns:
      :class:`LoadedHH` ``(subsets, report)``; ``subsets[name]`` has columns :data:`COLUMNS` (provenance in
      ``source`` / ``line``). A missing file raises, or with ``allow_missing`` warns and gives an empty dataset.

    Raises:
      HHRLHFDataError: a subset file is missing (unless ``allow_missing``), a file exists but holds no valid pair (the message names it and the skip counts), nothing at
        all was loaded, a local path is not a directory, or the hub could not be reached.
    """
    subsets = tuple(subsets)
    if not subsets:
        raise ValueError("hh-rlhf: no subsets requested")
    objective_of = {s: _objective_of(s, objectives) for s in subsets}
    src = os.fspath(source)
    local = Path(src).expanduser()
    report = LoadReport(source=src, split=split)
    out: dict[str, Any] = {}
    if local.is_dir():
        for subset in subsets:
            path = _resolve_file(local, subset, split)
            records, file_report = read_jsonl_pairs(path, subset, objective_of[subset], num_objectives)
            report.files.append(file_report)
            if not file_report.exists and not allow_missing:
                raise HHRLHFDataError(f"hh-rlhf: {path}: file not found (subset {subset!r}, split {split!r}; also "
                                      f"looked for .jsonl and {subset}/{split}.jsonl[.gz] under {local})")
            _warn_file(file_report)
            if file_report.exists and not records:
                raise HHRLHFDataError(f"hh-rlhf: {path}: no valid preference pair in {file_report.lines} lines"
                                      + (f" ({file_report.describe()})" if file_report.skipped else " (empty file)"))
            out[subset] = records_to_dataset(records, num_objectives)
    elif _looks_local(src):
        raise HHRLHFDataError(f"hh-rlhf: {src}: not a directory (expected a directory of "
                              f"<subset>-{split}.jsonl.gz files, or a hub name such as 'Anthropic/hh-rlhf')")
    else:
        for subset in subsets:
            records, file_report = _load_hub_subset(src, subset, split, objective_of[subset], num_objectives)
            report.files.append(file_report)
            _warn_file(file_report)
            if not records:
                raise HHRLHFDataError(f"hh-rlhf: {file_report.path}: no valid preference pair"
                                      + (f" ({file_report.describe()})" if file_report.skipped else ""))
            out[subset] = records_to_dataset(records, num_objectives)
    if not any(len(d) for d in out.values()):
        raise HHRLHFDataError(f"hh-rlhf: nothing loaded from {src}: missing files {report.missing_files}")
    return LoadedHH(out, report)


def _load_hub_subset(name: str, subset: str, split: str, objective: int, num_objectives: int):
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise HHRLHFDataError("hh-rlhf: loading from the hub needs `pip install datasets`") from e
    where = f"hf://{name}/{subset}[{split}]"
    try:
        ds = datasets.load_dataset(name, data_dir=subset, split=split)
    except Exception as e:  # network errors come in many types (ConnectionError, HfHubHTTPError, ...)
        raise HHRLHFDataError(
            f"hh-rlhf: could not load {where} from the Hugging Face hub ({type(e).__name__}: {e}). Loading a hub "
            f"name needs network access; offline, pass a local directory holding {subset}-{split}.jsonl.gz") from e
    report = FileReport(path=where, subset=subset)
    records = []
    for i, row in enumerate(ds, start=1):
        report.lines += 1
        record = _validate(row, report, i, subset, objective, num_objectives)
        if record is not None:
            records.append(record)
    return records, report


# ---------------------------------------------------------------------------------------------------------------
# Prompt-disjoint splits.


def _check_fractions(fractions: Mapping[str, float]) -> list[tuple[str, float]]:
    items = [(str(k), float(v)) for k, v in fractions.items()]
    if not items or any(v < 0 for _, v in items):
        raise ValueError(f"split fractions must be non-negative and non-empty, got {dict(fractions)}")
    total = sum(v for _, v in items)
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"split fractions must sum to 1, got {total} ({dict(fractions)})")
    return items


def split_unit_interval(key: str, salt: str = DEFAULT_SPLIT_SALT) -> float:
    """A deterministic number in [0, 1) from ``sha256(salt | key)``."""
    digest = hashlib.sha256(f"{salt}\x00{key}".encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0 ** 64


def assign_split(key: str, fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS,
                 salt: str = DEFAULT_SPLIT_SALT) -> str:
    """The split of a prompt key (e.g. :func:`prompt_hash`): cumulative ``fractions`` over a salted hash."""
    u = split_unit_interval(key, salt)
    items = _check_fractions(fractions)
    edge = 0.0
    for name, frac in items:
        edge += frac
        if u < edge:
            return name
    return next(name for name, frac in reversed(items) if frac > 0)


def _split_key(row: Mapping[str, Any], key: str) -> str:
    if key == "prompt":
        return row["prompt_hash"] or prompt_hash(row["prompt"])
    if key == "first_user_turn":
        first = next((t["content"] for t in row["turns"] if t["role"] == "user"), row["prompt"])
        return prompt_hash(first)
    raise ValueError(f"split key must be 'prompt' or 'first_user_turn', got {key!r}")


def _row_order_key(row: Mapping[str, Any]) -> tuple:
    content = hashlib.sha256(f"{row['chosen']}\x00{row['rejected']}".encode("utf-8")).hexdigest()
    return (row["prompt_hash"], content, row["subset"], row["source"], row["line"])


def split_by_prompt(data, fractions: Mapping[str, float] = DEFAULT_SPLIT_FRACTIONS, *,
                    salt: str = DEFAULT_SPLIT_SALT, key: str = "first_user_turn") -> dict:
    """Disjoint-by-prompt splits of HH-RLHF rows.

    Each row goes to ``assign_split(group key, fractions, salt)``, the key a sha256 of normalised text
    (:func:`normalize_prompt`):

    * ``key="first_user_turn"`` (default): the conversation's first user turn. HH-RLHF holds the same conversation
      cut at different depths (in the test files, 401 first-turn groups hold a prompt that is a prefix of another),
      so a longer prompt can contain a shorter prompt's dialogue -- even one of its responses. Grouping by the first
      user turn keeps a whole conversation in one split; it is a coarsening of ``"prompt"``, so identical prompts
      still always share a split.
    * ``key="prompt"``: the whole prompt (dialogue prefix).

    The assignment of a row depends only on its own text, so it is the same whatever else is in the data. Rows inside
    a split are sorted by content (prompt hash, then a hash of the responses, then provenance), so the output does not
    depend on the input order.

    Args:
      data: a ``datasets.Dataset``, a dict of them (e.g. ``load_hh_rlhf(...).subsets``; concatenated), or a list of
        row dicts (:data:`COLUMNS`).
      fractions: split name -> fraction (sum 1); default 0.4/0.2/0.2/0.2 for :data:`SPLIT_NAMES`.
      salt: hash salt (change it for a different random partition).
      key: ``"first_user_turn"`` or ``"prompt"``.

    Returns:
      ``{split name: datasets.Dataset}`` in the order of ``fractions`` (empty datasets included).
    """
    import datasets

    items = _check_fractions(fractions)
    if isinstance(data, Mapping):
        parts = [data[k] for k in sorted(data)]
        ds = datasets.concatenate_datasets(parts) if parts else records_to_dataset([])
    elif isinstance(data, datasets.Dataset):
        ds = data
    else:
        rows = list(data)
        num_objectives = len(rows[0]["label_mask"]) if rows else NUM_OBJECTIVES
        ds = records_to_dataset(rows, num_objectives)
    columns = ds.select_columns(["prompt", "turns", "prompt_hash", "chosen", "rejected", "subset", "source", "line"])
    buckets: dict[str, list[tuple[tuple, int]]] = {name: [] for name, _ in items}
    for i, row in enumerate(columns):
        name = assign_split(_split_key(row, key), fractions, salt)
        buckets[name].append((_row_order_key(row), i))
    return {name: ds.select([i for _, i in sorted(rows)]) for name, rows in buckets.items()}


def iter_parsed(rows: Iterable[Mapping[str, Any]]) -> Iterator[ParsedPair]:
    """:class:`ParsedPair` views of dataset rows."""
    for row in rows:
        yield ParsedPair(prompt=row["prompt"], turns=tuple((t["role"], t["content"]) for t in row["turns"]),
                         chosen=row["chosen"], rejected=row["rejected"])
