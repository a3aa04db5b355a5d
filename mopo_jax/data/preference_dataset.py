"""Generic preference datasets: any table of (prompt, first response, second response, K labels) read by
configuration into the rows every downstream stage reads (:func:`mopo_jax.data.make_record`'s schema,
:data:`mopo_jax.data.COLUMNS`).

The motivating layout is PKU-SafeRLHF, where one pair carries two labels: ``better_response_id`` (helpfulness) and
``safer_response_id`` (harmlessness), each ``0`` when ``response_0`` is the better one and ``1`` when ``response_1``
is. :class:`PreferenceColumns` names the columns and how a label reads; :func:`load_preference_dataset` loads local
files or a ``datasets`` hub name and validates every row the way :func:`mopo_jax.data.load_hh_rlhf` does.

Rows (one per kept pair):

* ``chosen`` / ``rejected`` are the dataset's FIRST and SECOND response, in the dataset's order, whatever the labels
  say; ``preference_probs[k]`` is ``P(first beats second)`` under objective ``k`` (``1.0`` first better, ``0.0``
  second better, ``0.5`` a tie) and ``label_mask[k]`` says whether objective ``k`` labels the pair. Unlabelled
  entries hold ``0.0`` with ``label_mask`` False (as in the HH rows). So ``chosen`` is NOT "the preferred response"
  here: a pair can prefer the first response for one objective and the second for another. The losses read the
  probabilities (see the note below).
* ``turns``: the prompt as ``[{"role", "content"}]`` (roles ``system``/``user``/``assistant``; a ``system`` column
  comes first); ``prompt``: the non-system turns rendered in HH-RLHF's text form
  (``"\\n\\nHuman: ...\\n\\nAssistant:"``) so that the same question hashes alike in both loaders;
  ``prompt_hash``: :func:`mopo_jax.data.prompt_hash` of it.
* ``objective``: the LOWEST objective the pair is labelled for (PKU-SafeRLHF pairs labelled for both objectives all
  get 0). HH rows carry exactly one label, so there ``objective`` says everything; here it does not: code that
  selects or balances pairs per objective must read ``label_mask[:, k]``, not ``objective == k``.
* ``subset``: the name given (default: the dataset's name); ``source``: the file (or ``hf://...``) and ``line``: the
  1-based line of the row in a JSON-lines file, the line where the record starts in a CSV file (the header is line
  1), the line where the element starts in a JSON array, or the 1-based row number in a Parquet file or hub split.

Loss orientation: :func:`mopo_jax.dpo_loss` / :func:`mopo_jax.ipo_loss` take ``P`` as a soft label
(``-[P log sigmoid(z) + (1 - P) log sigmoid(-z)]``), so ``P = 0`` (second better) is the mirrored hard label and is
handled, and the MOPO pairwise target ``P - 1/2`` changes sign with it. The DPO-family objectives
(:class:`mopo_jax.policy_objectives.DPO`, ``IPO``, ``WeightedDPO``, ``MODPO``) always pass
``preference_probs[:, k]``; only a direct call of ``dpo_loss`` / ``ipo_loss`` WITHOUT ``preference_probs`` assumes
the first response is the chosen one.

Validation policy (that of :func:`mopo_jax.data.load_hh_rlhf`): a bad row is dropped, counted per reason in the
file's report with its line numbers, and warned about (:class:`PreferenceDataWarning`, naming the file and lines);
a file that yields no pair at all, a configured text column that a file lacks, or an unreadable file is an error
(:class:`PreferenceDataError`, naming the file). ``strict=True`` turns the malformed-value drops
(:data:`MALFORMED_REASONS`: bad JSON, bad UTF-8, a row that is not an object, a prompt / response / label of the
wrong type or out of its format) into an error naming file and line; rows that merely lack content (missing prompt
or response, identical responses, no label) are dropped in either mode.

Label formats (:data:`LABEL_FORMATS`); a missing key, ``None`` or NaN always means "not labelled for that objective":

* ``"index"``: ``0`` = first better, ``1`` = second better (PKU-SafeRLHF's ``*_response_id``) -> P = 1.0 / 0.0;
* ``"first_prob"``: the probability that the first response beats the second, in ``[0, 1]``;
* ``"sign"``: ``+1`` first better, ``-1`` second better, ``0`` a tie -> P = 1.0 / 0.0 / 0.5.

A label format the data do not follow cannot always be detected: index labels read as ``"first_prob"`` are valid
probabilities with the meaning reversed. Check :attr:`PreferenceLoadReport.labelled` and a few rows.

``datasets`` (rows to ``Dataset``, hub loading) and ``pyarrow`` (Parquet) are imported lazily.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import glob
import gzip
import io
import json
import math
import os
import re
import warnings
import zlib
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, NamedTuple, Sequence

from .hh_rlhf import (
    ASSISTANT,
    CORRUPT_FILE,
    HUMAN,
    IDENTICAL_RESPONSES,
    INVALID_UTF8,
    MALFORMED_JSON,
    NOT_AN_OBJECT,
    FileReport,
    LoadReport,
    is_gzip,
    json_lines,
    prompt_hash,
    records_to_dataset,
)

INDEX = "index"
FIRST_PROB = "first_prob"
SIGN = "sign"
LABEL_FORMATS = (INDEX, FIRST_PROB, SIGN)

# Reasons a row is dropped (besides the reader-level ones shared with the HH loader).
MISSING_PROMPT = "missing_prompt"
BAD_PROMPT = "bad_prompt"
MISSING_RESPONSE = "missing_response"
BAD_RESPONSE = "bad_response"
BAD_LABEL = "bad_label"
NO_LABEL = "no_label"
PREFERENCE_REASONS = (MISSING_PROMPT, BAD_PROMPT, MISSING_RESPONSE, BAD_RESPONSE, IDENTICAL_RESPONSES, BAD_LABEL,
                      NO_LABEL, INVALID_UTF8, MALFORMED_JSON, NOT_AN_OBJECT, CORRUPT_FILE)
# Drops that are malformed values (an error under strict=True), as opposed to rows that merely lack content.
MALFORMED_REASONS = frozenset({BAD_PROMPT, BAD_RESPONSE, BAD_LABEL, INVALID_UTF8, MALFORMED_JSON, NOT_AN_OBJECT,
                               CORRUPT_FILE})

ROLES = ("system", "user", "assistant")
FILE_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
_MAX_DETAILS = 5
_MAX_REPR = 60
_GLOB_CHARS = re.compile(r"[*?\[]")


class PreferenceDataWarning(UserWarning):
    """Dropped rows, or a label column that a file lacks, while loading a preference dataset."""


class PreferenceDataError(ValueError):
    """Nothing valid could be loaded, or the source / a file / a column is unusable (the message names it)."""


# ---------------------------------------------------------------------------------------------------------------
# Configuration.


def _as_tuple(value) -> tuple:
    if isinstance(value, str):
        return (value,)
    return tuple(value)


@dataclasses.dataclass(frozen=True)
class PreferenceColumns:
    """Which columns of a dataset hold a preference pair, and how its labels read.

    The defaults are PKU-SafeRLHF's layout (:data:`PKU_SAFERLHF_COLUMNS`).

    Attributes:
      prompt: the user prompt: a string, or a list of ``{"role", "content"}`` messages (roles ``system``, ``user``,
        ``assistant``; it must not end with a non-empty assistant message).
      first, second: the two responses: strings, or (TRL's conversational form) a list holding the one assistant
        message that answers the prompt. Rows keep them in this order as ``chosen`` / ``rejected``.
      labels: ``K >= 1`` label columns, one per objective, in objective order (objective 0 is the primary one); or
        ``()``: no label column, the FIRST response is the preferred one (a chosen/rejected layout such as TRL's,
        :data:`TRL_COLUMNS`): one objective, every pair labelled ``P = 1``.
      label_format: one of :data:`LABEL_FORMATS` for every label column, or a tuple of ``K`` of them.
      objective_names: ``K`` names, e.g. ``("helpfulness", "harmlessness")`` (one name with ``labels=()``).
      system: optional column with a per-row system message (prepended to the prompt's turns when not empty).
    """

    prompt: str = "prompt"
    first: str = "response_0"
    second: str = "response_1"
    labels: tuple[str, ...] = ("better_response_id", "safer_response_id")
    label_format: str | tuple[str, ...] = INDEX
    objective_names: tuple[str, ...] = ("helpfulness", "harmlessness")
    system: str | None = None

    def __post_init__(self):
        object.__setattr__(self, "labels", _as_tuple(self.labels))
        object.__setattr__(self, "objective_names", _as_tuple(self.objective_names))
        if not isinstance(self.label_format, str):
            object.__setattr__(self, "label_format", tuple(self.label_format))
        if self.system == "":
            object.__setattr__(self, "system", None)
        for field in ("prompt", "first", "second"):
            value = getattr(self, field)
            if not isinstance(value, str) or not value:
                raise ValueError(f"PreferenceColumns.{field} must be a non-empty column name, got {value!r}")
        if self.system is not None and not isinstance(self.system, str):
            raise ValueError(f"PreferenceColumns.system must be a column name or None, got {self.system!r}")
        K = self.num_objectives
        if not self.labels and len(self.objective_names) != 1:
            raise ValueError(f"PreferenceColumns: labels=() means one objective whose preferred response is the "
                             f"first; give one objective name, got {self.objective_names!r}")
        if not all(isinstance(c, str) and c for c in self.labels):
            raise ValueError(f"PreferenceColumns.labels must be non-empty column names, got {self.labels!r}")
        if len(self.objective_names) != K:
            raise ValueError(f"PreferenceColumns.objective_names has {len(self.objective_names)} names for {K} label "
                             f"columns {self.labels!r}; give one name per objective")
        if not all(isinstance(n, str) and n for n in self.objective_names) or \
                len(set(self.objective_names)) != K:
            raise ValueError(f"PreferenceColumns.objective_names must be {K} distinct non-empty names, got "
                             f"{self.objective_names!r}")
        formats = self.label_formats
        if self.labels and len(formats) != K:
            raise ValueError(f"PreferenceColumns.label_format has {len(formats)} formats for {K} label columns; give "
                             f"one format or {K}")
        bad = [f for f in formats if f not in LABEL_FORMATS]
        if bad:
            raise ValueError(f"PreferenceColumns.label_format: unknown format(s) {bad!r}; use one of {LABEL_FORMATS} "
                             "('index': 0 = first better, 1 = second better; 'first_prob': P(first beats second) in "
                             "[0, 1]; 'sign': +1 first, -1 second, 0 tie)")
        names = self.names()
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"PreferenceColumns: column(s) {duplicates} used for more than one role "
                             f"(prompt, first, second, system and each label need their own column)")

    @classmethod
    def from_preset(cls, name: str) -> "PreferenceColumns":
        """A named layout of :data:`COLUMN_PRESETS` (``"trl"``, ``"pku-saferlhf"``)."""
        return _columns(name)

    @property
    def num_objectives(self) -> int:
        """``K`` (1 for a chosen/rejected layout without label columns)."""
        return len(self.labels) or 1

    @property
    def label_formats(self) -> tuple[str, ...]:
        """The format of each label column (``K`` entries)."""
        if isinstance(self.label_format, str):
            return (self.label_format,) * len(self.labels)
        return tuple(self.label_format)

    def text_columns(self) -> tuple[str, ...]:
        """The prompt, response and (if set) system columns: every row needs these columns to exist in its file."""
        return (self.prompt, self.first, self.second) + ((self.system,) if self.system else ())

    def names(self) -> tuple[str, ...]:
        """Every column read: :meth:`text_columns` then :attr:`labels`."""
        return self.text_columns() + self.labels

    def to_dict(self) -> dict[str, Any]:
        return {f.name: (list(v) if isinstance(v := getattr(self, f.name), tuple) else v)
                for f in dataclasses.fields(self)}


#: TRL's preference layout (``prompt`` / ``chosen`` / ``rejected``, strings or conversational messages): one
#: objective, the first response (``chosen``) preferred in every pair.
TRL_COLUMNS = PreferenceColumns(prompt="prompt", first="chosen", second="rejected", labels=(),
                                objective_names=("preference",))

PKU_SAFERLHF_COLUMNS = PreferenceColumns(
    prompt="prompt", first="response_0", second="response_1",
    labels=("better_response_id", "safer_response_id"), label_format=INDEX,
    objective_names=("helpfulness", "harmlessness"),
)


#: Column layouts by name (``columns: trl`` in a config).
COLUMN_PRESETS = {"pku-saferlhf": PKU_SAFERLHF_COLUMNS, "trl": TRL_COLUMNS}


def _columns(columns: PreferenceColumns | Mapping[str, Any] | str) -> PreferenceColumns:
    if isinstance(columns, PreferenceColumns):
        return columns
    if isinstance(columns, str):
        if columns not in COLUMN_PRESETS:
            raise ValueError(f"columns: unknown preset {columns!r}; presets: {sorted(COLUMN_PRESETS)} (or give the "
                             "columns' fields)")
        return COLUMN_PRESETS[columns]
    if isinstance(columns, Mapping):
        return PreferenceColumns(**columns)
    raise TypeError(f"columns must be a PreferenceColumns (or a mapping of its fields, or a preset name), got "
                    f"{type(columns).__name__}")


@dataclasses.dataclass(frozen=True)
class PreferenceDataConfig:
    """Where a preference dataset comes from and how it reads (the arguments of :func:`load_preference_dataset`).

    The defaults load the PKU-SafeRLHF test split from the hub.

    Attributes:
      source: a local file (``.jsonl``, ``.jsonl.gz``, ``.json``, ``.parquet``, ``.csv``), a directory of them, a
        glob, a tuple of those, or a ``datasets`` hub name such as ``"PKU-Alignment/PKU-SafeRLHF"``.
      columns: the column layout (:class:`PreferenceColumns`).
      split: which split (a directory source keeps the files whose path names it; a hub source loads it).
      config_name: the hub dataset's configuration name (hub only).
      data_dir: a sub-directory of the hub dataset, or of a local directory source.
      subset: the rows' ``subset`` name (default: the dataset's name).
      strict: raise on the first malformed value instead of dropping the row.
    """

    source: str | tuple[str, ...] = "PKU-Alignment/PKU-SafeRLHF"
    columns: PreferenceColumns = PKU_SAFERLHF_COLUMNS
    split: str | None = "test"
    config_name: str | None = None
    data_dir: str | None = None
    subset: str | None = None
    strict: bool = False

    def __post_init__(self):
        if not isinstance(self.columns, PreferenceColumns):
            object.__setattr__(self, "columns", _columns(self.columns))
        if isinstance(self.source, list):
            object.__setattr__(self, "source", tuple(self.source))

    def load(self) -> "LoadedPreferences":
        """:func:`load_preference_dataset` with these settings."""
        return load_preference_dataset(self.source, self.columns, self.split, config_name=self.config_name,
                                       data_dir=self.data_dir, subset=self.subset, strict=self.strict)


# ---------------------------------------------------------------------------------------------------------------
# Reports.


@dataclasses.dataclass
class PreferenceFileReport(FileReport):
    """What one file (or hub split) gave: :class:`mopo_jax.data.FileReport` (``lines`` rows read, ``valid`` rows
    kept, ``skipped`` rows dropped per reason with ``first_lines``) plus:

    Attributes:
      labelled: per objective, how many kept rows carry its label.
      details: the first few malformed values, ``"line N: column = value: why"``.
      absent_labels: label columns that no row of the file has (their objectives are unlabelled in this file).
    """
    labelled: list[int] = dataclasses.field(default_factory=list)
    details: list[str] = dataclasses.field(default_factory=list)
    absent_labels: list[str] = dataclasses.field(default_factory=list)

    def detail(self, message: str) -> None:
        if len(self.details) < _MAX_DETAILS:
            self.details.append(message)


@dataclasses.dataclass
class PreferenceLoadReport(LoadReport):
    """Per-file outcome of :func:`load_preference_dataset` (``files`` are :class:`PreferenceFileReport`)."""
    objective_names: tuple[str, ...] = ()
    columns: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def rows(self) -> int:
        """Rows read (non-blank lines / records), over all files."""
        return sum(f.lines for f in self.files)

    @property
    def kept(self) -> int:
        """Rows kept, over all files."""
        return sum(f.valid for f in self.files)

    @property
    def dropped(self) -> collections.Counter:
        """Rows dropped per reason, over all files (the same as ``skipped``)."""
        return self.skipped

    @property
    def labelled(self) -> dict[str, int]:
        """Kept rows labelled for each objective (by name)."""
        totals = [0] * len(self.objective_names)
        for f in self.files:
            for k, n in enumerate(f.labelled):
                totals[k] += n
        return dict(zip(self.objective_names, totals))

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out.update(rows=self.rows, kept=self.kept, labelled=self.labelled, objective_names=list(self.objective_names),
                   columns=dict(self.columns))
        for entry, f in zip(out["files"], self.files):
            entry.update(labelled=list(f.labelled), details=list(f.details), absent_labels=list(f.absent_labels))
        return out

    def summary(self) -> str:
        labelled = ", ".join(f"{k} {v}" for k, v in self.labelled.items())
        lines = [f"preference data {self.source} [{self.split}]: kept {self.kept} of {self.rows} rows "
                 f"(labelled: {labelled})"]
        for f in self.files:
            lines.append(f"  {f.valid} kept of {f.lines} rows ({f.path})"
                         + (f"; dropped {f.describe()}" if f.skipped else "")
                         + (f"; e.g. {' | '.join(f.details)}" if f.details else "")
                         + (f"; no column {f.absent_labels}" if f.absent_labels else ""))
        return "\n".join(lines)


class LoadedPreferences(NamedTuple):
    """Result of :func:`load_preference_dataset`: ``subsets`` ``{subset name: datasets.Dataset}`` (one entry; the
    shape :func:`mopo_jax.data.split_by_prompt` takes, as from :func:`mopo_jax.data.load_hh_rlhf`) and the
    :class:`PreferenceLoadReport`."""
    subsets: dict
    report: PreferenceLoadReport

    @property
    def dataset(self):
        """The one ``datasets.Dataset``."""
        (dataset,) = self.subsets.values()
        return dataset

    @property
    def objective_names(self) -> tuple[str, ...]:
        return self.report.objective_names


# ---------------------------------------------------------------------------------------------------------------
# Row validation.


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= _MAX_REPR else text[:_MAX_REPR - 3] + "..."


def _scalar(value: Any) -> Any:
    """Plain Python value of a NumPy / pandas scalar."""
    if value is not None and not isinstance(value, (str, bytes, list, tuple, dict)) and hasattr(value, "item") \
            and getattr(value, "shape", None) == ():
        return value.item()
    return value


def _is_missing(value: Any) -> bool:
    value = _scalar(value)
    return value is None or (isinstance(value, float) and math.isnan(value)) or type(value).__name__ == "NAType"


class _Drop(Exception):
    def __init__(self, reason: str, detail: str | None = None):
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def label_probability(value: Any, label_format: str) -> float | None:
    """``P(first beats second)`` of one label value, ``None`` when it is missing (``None``, NaN).

    Raises:
      ValueError: the value is not a number of the format (the message says what the format takes).
    """
    if _is_missing(value):
        return None
    value = _scalar(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"not a number ({label_format!r} labels are numbers)")
    if label_format == INDEX:
        if value in (0, 1):
            return 1.0 - float(value)
        raise ValueError("'index' labels are 0 (first better) or 1 (second better)")
    if label_format == FIRST_PROB:
        if 0.0 <= value <= 1.0:
            return float(value)
        raise ValueError("'first_prob' labels are probabilities in [0, 1]")
    if label_format == SIGN:
        if value in (-1, 0, 1):
            return {1: 1.0, 0: 0.5, -1: 0.0}[int(value)]
        raise ValueError("'sign' labels are +1 (first better), -1 (second better) or 0 (tie)")
    raise ValueError(f"unknown label format {label_format!r} (use one of {LABEL_FORMATS})")


def _prompt_turns(row: Mapping[str, Any], columns: PreferenceColumns) -> list[tuple[str, str]]:
    column = columns.prompt
    value = _scalar(row.get(column))
    if _is_missing(value):
        raise _Drop(MISSING_PROMPT)
    if isinstance(value, str):
        turns = [("user", value.strip())] if value.strip() else []
    elif isinstance(value, (list, tuple)):
        turns = []
        for i, message in enumerate(value, start=1):
            if not isinstance(message, Mapping) or not isinstance(message.get("role"), str) \
                    or not isinstance(message.get("content"), str):
                raise _Drop(BAD_PROMPT, f"{column} message {i} = {_short(message)}: messages are "
                                        "{'role': str, 'content': str}")
            role = message["role"]
            if role not in ROLES:
                raise _Drop(BAD_PROMPT, f"{column} message {i} has role {role!r} (roles: {', '.join(ROLES)})")
            turns.append((role, message["content"].strip()))
        if turns and turns[-1][0] == "assistant":
            if turns[-1][1]:
                raise _Drop(BAD_PROMPT, f"{column} ends with an assistant message (a prompt ends with the user "
                                        "turn the responses answer)")
            turns.pop()  # an empty assistant slot for the response
    else:
        raise _Drop(BAD_PROMPT, f"{column} = {_short(value)}: not a string or a list of messages")
    if not any(role == "user" and text for role, text in turns):
        raise _Drop(MISSING_PROMPT)
    if columns.system:
        system = _scalar(row.get(columns.system))
        if not _is_missing(system):
            if not isinstance(system, str):
                raise _Drop(BAD_PROMPT, f"{columns.system} = {_short(system)}: not a string")
            if system.strip():
                turns.insert(0, ("system", system.strip()))
    return turns


def _response(row: Mapping[str, Any], column: str) -> str:
    value = _scalar(row.get(column))
    if _is_missing(value):
        raise _Drop(MISSING_RESPONSE)
    if isinstance(value, (list, tuple)):  # TRL's conversational form: [{"role": "assistant", "content": ...}]
        if len(value) != 1 or not isinstance(value[0], Mapping) or value[0].get("role") != "assistant" \
                or not isinstance(value[0].get("content"), str):
            raise _Drop(BAD_RESPONSE, f"{column} = {_short(value)}: a response given as messages is one "
                                      "{'role': 'assistant', 'content': str}")
        value = value[0]["content"]
    if not isinstance(value, str):
        raise _Drop(BAD_RESPONSE, f"{column} = {_short(value)}: not a string")
    if not value.strip():
        raise _Drop(MISSING_RESPONSE)
    return value.strip()


def prompt_text(turns: Iterable[tuple[str, str]]) -> str:
    """The HH-RLHF text form of prompt turns (system turns left out): ``"\\n\\nHuman: ...\\n\\nAssistant:"``."""
    parts = [f"{HUMAN if role == 'user' else ASSISTANT} {text}" for role, text in turns if role != "system"]
    return "".join(parts) + ASSISTANT


def row_record(row: Any, columns: PreferenceColumns, subset: str, *, source: str = "",
               line: int = 0) -> tuple[dict[str, Any] | None, str | None, str | None]:
    """``(record, None, None)`` for a usable row (columns :data:`mopo_jax.data.COLUMNS`), else
    ``(None, reason, detail)`` with a reason of :data:`PREFERENCE_REASONS` (``detail``, for malformed values, names
    the column and value)."""
    if not isinstance(row, Mapping):
        return None, NOT_AN_OBJECT, None
    try:
        turns = _prompt_turns(row, columns)
        first, second = _response(row, columns.first), _response(row, columns.second)
        probs, mask = ([], []) if columns.labels else ([1.0], [True])  # no label column: the first is preferred
        for column, label_format in zip(columns.labels, columns.label_formats):
            value = row.get(column)
            try:
                p = label_probability(value, label_format)
            except ValueError as e:
                raise _Drop(BAD_LABEL, f"{column} = {_short(_scalar(value))}: {e}") from None
            probs.append(0.0 if p is None else p)
            mask.append(p is not None)
        if first == second:
            raise _Drop(IDENTICAL_RESPONSES)
        if not any(mask):
            raise _Drop(NO_LABEL)
    except _Drop as drop:
        return None, drop.reason, drop.detail
    text = prompt_text(turns)
    return {
        "subset": subset,
        "objective": mask.index(True),
        "prompt": text,
        "turns": [{"role": r, "content": t} for r, t in turns],
        "chosen": first,
        "rejected": second,
        "preference_probs": probs,
        "label_mask": mask,
        "prompt_hash": prompt_hash(text),
        "source": source,
        "line": line,
    }, None, None


# ---------------------------------------------------------------------------------------------------------------
# Readers: each yields (line, row) and counts the rows it cannot parse in the report.


def _drop(report: PreferenceFileReport, reason: str, line: int, detail: str | None, strict: bool) -> None:
    if strict and reason in MALFORMED_REASONS:
        raise PreferenceDataError(f"preference data: {report.path}:{line}: {reason}" + (f": {detail}" if detail else "")
                                  + " (strict=True; with strict=False such rows are dropped and counted)")
    report.skip(reason, line)
    if detail:
        report.detail(f"line {line}: {detail}")


def _file_format(path: Path) -> str | None:
    name = path.name.lower()
    if name.endswith(".gz") and not name.endswith(".parquet.gz"):
        name = name[:-3]
    return next((fmt for ext, fmt in FILE_FORMATS.items() if name.endswith(ext)), None)


def _read_text(path: Path) -> str:
    """The whole file as text (gzip'd or not); bad gzip or UTF-8 is an error naming the file (and line)."""
    try:
        data = gzip.decompress(path.read_bytes()) if is_gzip(path) else path.read_bytes()
    except (EOFError, OSError, zlib.error) as e:
        raise PreferenceDataError(f"preference data: {path}: unreadable ({type(e).__name__}: {e})") from e
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise PreferenceDataError(f"preference data: {path}:{line}: invalid UTF-8 (byte {e.start}); a "
                                  f"{_file_format(path)} file is read whole, so this is an error") from e


def _jsonl_rows(path: Path, report: PreferenceFileReport, strict: bool) -> Iterator[tuple[int, Any]]:
    return json_lines(path, report, lambda reason, line, detail: _drop(report, reason, line, detail, strict))


_WS = re.compile(r"[ \t\n\r]*")


def _json_array_rows(path: Path, text: str) -> Iterator[tuple[int, Any]]:
    """Elements of a JSON array with the line each starts on; malformed JSON is an error naming file and line."""
    decoder = json.JSONDecoder()
    pos = _WS.match(text).end()
    line, counted = 1, 0

    def line_at(i: int) -> int:
        nonlocal line, counted
        line += text.count("\n", counted, i)
        counted = i
        return line

    def fail(i: int, what: str):
        raise PreferenceDataError(f"preference data: {path}:{line_at(i)}: malformed JSON array ({what})")

    pos += 1  # the "["
    pos = _WS.match(text, pos).end()
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            start = pos
            try:
                obj, pos = decoder.raw_decode(text, pos)
            except json.JSONDecodeError as e:
                fail(e.pos, e.msg)
            yield line_at(start), obj
            pos = _WS.match(text, pos).end()
            if text.startswith(",", pos):
                pos = _WS.match(text, pos + 1).end()
            elif text.startswith("]", pos):
                pos += 1
                break
            else:
                fail(pos, "expected ',' or ']'")
    if _WS.match(text, pos).end() != len(text):
        fail(_WS.match(text, pos).end(), "extra data after the array")


def _json_rows(path: Path, report: PreferenceFileReport, strict: bool) -> Iterator[tuple[int, Any]]:
    """A ``.json`` file: a JSON array of row objects, or JSON lines."""
    try:
        with (gzip.open if is_gzip(path) else open)(path, "rb") as fh:
            head = fh.read(4096)
    except (EOFError, OSError, zlib.error):
        head = b""  # the JSON-lines reader reports the damage
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"["):
        for line, obj in _json_array_rows(path, _read_text(path)):
            report.lines += 1
            yield line, obj
    else:
        yield from _jsonl_rows(path, report, strict)


def _csv_value(text: str | None, is_label: bool) -> Any:
    if text is None or text == "":
        return None
    if is_label:
        try:
            return float(text)
        except ValueError:
            return text  # reported as a bad label
    return text


def _csv_rows(path: Path, columns: PreferenceColumns, report: PreferenceFileReport) -> tuple[list[str], Iterator]:
    reader = csv.reader(io.StringIO(_read_text(path), newline="\n"))  # line numbers count "\n" only
    try:
        header = next(reader)
    except StopIteration:
        return [], iter(())
    except csv.Error as e:
        raise PreferenceDataError(f"preference data: {path}:1: bad CSV header ({e})") from e
    labels = set(columns.labels)

    def rows():
        end = reader.line_num
        while True:
            start = end + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise PreferenceDataError(f"preference data: {path}:{start}: bad CSV ({e})") from e
            end = reader.line_num
            if not values or all(not v.strip() for v in values):
                continue
            report.lines += 1
            yield start, {name: _csv_value(values[i] if i < len(values) else None, name in labels)
                          for i, name in enumerate(header)}

    return header, rows()


def _parquet_rows(path: Path, columns: PreferenceColumns, report: PreferenceFileReport) -> tuple[list[str], Iterator]:
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover
        raise PreferenceDataError(f"preference data: {path}: reading Parquet needs `pip install pyarrow`") from e
    try:
        parquet = pq.ParquetFile(path)
        names = list(parquet.schema_arrow.names)
    except Exception as e:  # ArrowInvalid and friends
        raise PreferenceDataError(f"preference data: {path}: not a readable Parquet file "
                                  f"({type(e).__name__}: {e})") from e
    wanted = [c for c in columns.names() if c in names]

    def rows():
        line = 0
        try:
            for batch in parquet.iter_batches(batch_size=4096, columns=wanted):
                for row in batch.to_pylist():
                    line += 1
                    report.lines += 1
                    yield line, row
        except OSError as e:  # pyarrow's errors derive from it (ArrowInvalid, ArrowIOError)
            raise PreferenceDataError(f"preference data: {path}: unreadable after row {line} "
                                      f"({type(e).__name__}: {e})") from e

    return names, rows()


def _check_text_columns(where: str, names: Iterable[str], columns: PreferenceColumns, rows: int | None = None):
    names = list(names)
    missing = [c for c in columns.text_columns() if c not in names]
    if missing:
        shown = ", ".join(map(repr, names[:30])) + (", ..." if len(names) > 30 else "")
        raise PreferenceDataError(
            f"preference data: {where}: no column {', '.join(map(repr, missing))}"
            + (f" in any of its {rows} rows" if rows is not None else "")
            + f" (columns: {shown or 'none'}); set PreferenceColumns to this dataset's column names")


def _convert(rows: Iterable[tuple[int, Any]], report: PreferenceFileReport, columns: PreferenceColumns, subset: str,
             strict: bool, names: Sequence[str] | None) -> list[dict[str, Any]]:
    """Records of ``(line, row)`` pairs; ``names`` the columns when the format has a schema (else collected)."""
    if names is not None:
        _check_text_columns(report.path, names, columns)
    seen: set[str] = set(names or ())
    records = []
    report.labelled = [0] * columns.num_objectives
    for line, row in rows:
        if names is None and isinstance(row, Mapping):
            seen.update(row.keys())
        record, reason, detail = row_record(row, columns, subset, source=report.path, line=line)
        if record is None:
            _drop(report, reason, line, detail, strict)
            continue
        report.valid += 1
        for k, labelled in enumerate(record["label_mask"]):
            report.labelled[k] += labelled
        records.append(record)
    if names is None and report.lines and seen:
        _check_text_columns(report.path, sorted(seen), columns, report.lines)
    report.absent_labels = [c for c in columns.labels if c not in seen] if (seen or names is not None) else []
    return records


def read_preference_file(path: str | os.PathLike, columns: PreferenceColumns | Mapping[str, Any], subset: str, *,
                         strict: bool = False) -> tuple[list[dict[str, Any]], PreferenceFileReport]:
    """Validated records of one local file (``.jsonl``, ``.json``, ``.parquet``, ``.csv``; JSON and CSV may be
    gzip'd) and its :class:`PreferenceFileReport`. No warnings and no "nothing kept" error here (see
    :func:`load_preference_dataset`).

    Raises:
      PreferenceDataError: the file is missing, of an unknown format, unreadable as a whole (a CSV / JSON array /
        Parquet file with bad bytes or syntax: the message gives the line), lacks a text column, or (``strict``) has
        a malformed value.
    """
    columns = _columns(columns)
    path = Path(path)
    if not path.is_file():
        raise PreferenceDataError(f"preference data: {path}: no such file")
    fmt = _file_format(path)
    if fmt is None:
        raise PreferenceDataError(f"preference data: {path}: unknown file type (use .jsonl, .jsonl.gz, .json, "
                                  f".parquet or .csv)")
    report = PreferenceFileReport(path=str(path), subset=subset)
    if fmt == "parquet":
        names, rows = _parquet_rows(path, columns, report)
    elif fmt == "csv":
        names, rows = _csv_rows(path, columns, report)
    elif fmt == "json":
        names, rows = None, _json_rows(path, report, strict)
    else:
        names, rows = None, _jsonl_rows(path, report, strict)
    return _convert(rows, report, columns, subset, strict, names), report


# ---------------------------------------------------------------------------------------------------------------
# Sources.


def _strip_format(name: str) -> str:
    lower = name.lower()
    if lower.endswith(".gz"):
        name, lower = name[:-3], lower[:-3]
    for ext in FILE_FORMATS:
        if lower.endswith(ext):
            return name[:-len(ext)]
    return name


def _names_split(relative: Path, split: str) -> bool:
    tokens = re.split(r"[-_./\\\s]+", _strip_format(relative.as_posix()).lower())
    return split.lower() in tokens


def split_files(directory: str | os.PathLike, split: str | None) -> list[Path]:
    """The data files under ``directory`` (recursively, hidden folders left out) whose path names ``split`` as a
    whole word (``test.jsonl``, ``data/test/part-0.parquet``, ``pairs-test.csv``, ``test-00000-of-00001.parquet``);
    every data file when ``split`` is None. Sorted by path."""
    directory = Path(directory)
    found = []
    for path in sorted(directory.rglob("*")):
        relative = path.relative_to(directory)
        if any(part.startswith(".") for part in relative.parts) or not path.is_file() or not _file_format(path):
            continue
        if split is None or _names_split(relative, split):
            found.append(path)
    return found


def _looks_local(source: str) -> bool:
    return (os.path.exists(source) or os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source
            or bool(_GLOB_CHARS.search(source)) or source.count("/") > 1
            or _file_format(Path(source)) is not None)


def _local_files(sources: Sequence[str], split: str | None, data_dir: str | None) -> list[Path]:
    files: list[Path] = []
    for source in sources:
        path = Path(source).expanduser()
        if _GLOB_CHARS.search(source):
            matches = sorted(Path(p) for p in glob.glob(os.path.expanduser(source), recursive=True))
            matches = [p for p in matches if p.is_file() and _file_format(p)]
            if not matches:
                raise PreferenceDataError(f"preference data: {source}: the pattern matches no .jsonl / .json / "
                                          ".parquet / .csv file")
            files += matches
        elif path.is_dir():
            root = path / data_dir if data_dir else path
            if not root.is_dir():
                raise PreferenceDataError(f"preference data: {root}: no such directory (data_dir={data_dir!r})")
            found = split_files(root, split)
            if not found:
                every = [str(p.relative_to(root)) for p in split_files(root, None)]
                raise PreferenceDataError(
                    f"preference data: {root}: no data file for split {split!r} (a file is used when its path names "
                    f"the split, e.g. {split}.jsonl); data files there: {every[:10] or 'none'}"
                    + ("; pass the file itself as source" if every else ""))
            files += found
        elif path.is_file():
            if data_dir:
                raise PreferenceDataError(f"preference data: {source}: data_dir={data_dir!r} applies to a directory "
                                          "or a hub name, not to a file")
            files.append(path)
        else:
            raise PreferenceDataError(
                f"preference data: {source}: no such file or directory (a local source is a .jsonl / .jsonl.gz / "
                f".json / .parquet / .csv file, a directory of them or a glob; a hub name looks like 'owner/name')")
    return files


def _default_subset(sources: Sequence[str], hub: bool) -> str:
    if hub:
        return sources[0].rstrip("/").split("/")[-1]
    if len(sources) == 1 and not _GLOB_CHARS.search(sources[0]):
        path = Path(sources[0]).expanduser()
        return path.resolve().name if path.is_dir() else _strip_format(path.name)
    return "preferences"


def _warn(report: PreferenceFileReport, columns: PreferenceColumns) -> None:
    if report.skipped:
        warnings.warn(f"preference data: {report.path}: dropped {sum(report.skipped.values())} of {report.lines} rows "
                      f"({report.describe()}); kept {report.valid}"
                      + (f"; e.g. {' | '.join(report.details)}" if report.details else "")
                      + (f"; reading stopped: {'; '.join(report.errors)}" if report.errors else ""),
                      PreferenceDataWarning, stacklevel=4)
    if report.absent_labels and report.valid:
        objectives = [n for n, c in zip(columns.objective_names, columns.labels) if c in report.absent_labels]
        warnings.warn(f"preference data: {report.path}: no row has label column(s) {report.absent_labels}: "
                      f"objective(s) {objectives} unlabelled in this file", PreferenceDataWarning, stacklevel=4)


def _finish(records: list, report: PreferenceFileReport, columns: PreferenceColumns) -> None:
    """Warn about drops; a file (or hub split) with no usable pair is an error naming it."""
    _warn(report, columns)
    if not records:
        absent = (f"; no row has label column(s) {report.absent_labels}" if report.absent_labels else "")
        raise PreferenceDataError(
            f"preference data: {report.path}: no usable preference pair in {report.lines} rows"
            + (f" ({report.describe()})" if report.skipped else " (empty file)")
            + (f"; e.g. {' | '.join(report.details)}" if report.details else "") + absent)


def load_preference_dataset(
    source: str | os.PathLike | Sequence[str | os.PathLike],
    columns: PreferenceColumns | Mapping[str, Any],
    split: str | None = "test",
    *,
    config_name: str | None = None,
    data_dir: str | None = None,
    subset: str | None = None,
    strict: bool = False,
) -> LoadedPreferences:
    """Load preference pairs of any column layout into the HH rows (:data:`mopo_jax.data.COLUMNS`), validated.

    Args:
      source: a local ``.jsonl`` / ``.jsonl.gz`` / ``.json`` (array or lines) / ``.parquet`` / ``.csv`` file, a
        directory (the files under it whose path names ``split``, see :func:`split_files`), a glob, a sequence of
        those; or a ``datasets`` hub name such as ``"PKU-Alignment/PKU-SafeRLHF"``, loaded with
        ``datasets.load_dataset(source, name=config_name, data_dir=data_dir, split=split)`` (needs network or the
        local cache).
      columns: the layout (:class:`PreferenceColumns`, or a mapping of its fields).
      split: the split; ignored for files named explicitly; None takes every file of a directory.
      config_name: the hub dataset's configuration (hub only).
      data_dir: a sub-directory of the hub dataset or of a local directory source.
      subset: the rows' ``subset`` (default: the hub name's last part, the directory's or the file's name).
      strict: raise :class:`PreferenceDataError` (file and line) at the first malformed value
        (:data:`MALFORMED_REASONS`) instead of dropping and counting the row.

    Returns:
      :class:`LoadedPreferences` ``(subsets={subset: Dataset}, report)``; rows as described in the module docstring
      (``objective`` = the lowest labelled objective; ``chosen``/``rejected`` = first/second response).

    Raises:
      PreferenceDataError: see :func:`read_preference_file`; also a file (or hub split) with no usable pair (naming
        it, with the drop counts), a missing source, and a hub dataset that cannot be loaded (offline: the message
        says to pass local files).
      ValueError: ``config_name`` with a local source.
    """
    columns = _columns(columns)
    if isinstance(source, (str, os.PathLike)):
        sources = [os.fspath(source)]
    else:
        sources = [os.fspath(s) for s in source]
    if not sources:
        raise PreferenceDataError("preference data: no source given")
    hub = len(sources) == 1 and not _looks_local(sources[0])
    subset = subset or _default_subset(sources, hub)
    shown = sources[0] if len(sources) == 1 else ", ".join(sources)
    report = PreferenceLoadReport(source=shown, split=str(split), objective_names=columns.objective_names,
                                  columns=columns.to_dict())
    if hub:
        records, file_report = _load_hub(sources[0], columns, split, config_name, data_dir, subset, strict)
        report.files.append(file_report)
        _finish(records, file_report, columns)
    else:
        if config_name is not None:
            raise ValueError(f"preference data: config_name={config_name!r} applies to hub datasets only, and "
                             f"{shown} is local")
        records = []
        for path in _local_files(sources, split, data_dir):
            file_records, file_report = read_preference_file(path, columns, subset, strict=strict)
            report.files.append(file_report)
            _finish(file_records, file_report, columns)
            records += file_records
    return LoadedPreferences({subset: records_to_dataset(records, columns.num_objectives)}, report)


def _load_hub(name: str, columns: PreferenceColumns, split: str | None, config_name: str | None,
              data_dir: str | None, subset: str, strict: bool):
    where = f"hf://{name}" + (f":{config_name}" if config_name else "") + (f"/{data_dir}" if data_dir else "") \
        + f"[{split}]"
    if split is None:
        raise PreferenceDataError(f"preference data: {where}: a hub dataset needs a split (e.g. 'train', 'test')")
    try:
        import datasets
    except ImportError as e:  # pragma: no cover
        raise PreferenceDataError(f"preference data: loading {where} from the hub needs `pip install datasets`") from e
    try:
        ds = datasets.load_dataset(name, name=config_name, data_dir=data_dir, split=split)
    except Exception as e:  # offline / unknown name / bad split come in many types
        message = str(e)
        message = message if len(message) <= 300 else message[:297] + "..."
        raise PreferenceDataError(
            f"preference data: could not load {where} from the Hugging Face hub ({type(e).__name__}: {message}). "
            f"A hub name needs network access (or the dataset in the local datasets cache); offline, pass local "
            f"files as source: a .jsonl / .jsonl.gz / .json / .parquet / .csv file, a glob, or a directory of them "
            f"(with {split}.jsonl, say)") from e
    names = list(ds.column_names or [])
    report = PreferenceFileReport(path=where, subset=subset)
    _check_text_columns(where, names, columns)
    ds = ds.select_columns([c for c in columns.names() if c in names])

    def rows():
        for i, row in enumerate(ds, start=1):
            report.lines += 1
            yield i, row

    return _convert(rows(), report, columns, subset, strict, names), report
