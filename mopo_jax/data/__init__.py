"""Real preference data: Anthropic HH-RLHF loading (validated), parsing, objective labels, prompt-disjoint splits,
chat-template tokenization into the train step's batch layout, and a resumable batch iterator; any other pairwise
preference dataset with K labels per pair (e.g. PKU-SafeRLHF) through the generic adapter
(:func:`load_preference_dataset`, configured by :class:`PreferenceColumns`) into the same rows.

Importing this package imports neither ``datasets`` nor a tokenizer library; those are imported lazily.
"""

from .hh_rlhf import (
    COLUMNS,
    DEFAULT_SPLIT_FRACTIONS,
    DEFAULT_SPLIT_SALT,
    DEFAULT_SUBSETS,
    NUM_OBJECTIVES,
    OBJECTIVE_NAMES,
    REASONS,
    SPLIT_NAMES,
    SUBSET_OBJECTIVES,
    FileReport,
    HHRLHFDataError,
    HHRLHFWarning,
    LoadedHH,
    LoadReport,
    ParsedPair,
    assign_split,
    iter_parsed,
    load_hh_rlhf,
    make_record,
    merge_consecutive_turns,
    normalize_prompt,
    objective_labels,
    parse_pair,
    parse_pair_with_reason,
    parse_turns,
    prompt_hash,
    read_jsonl_pairs,
    records_to_dataset,
    split_by_prompt,
)
from .preference_dataset import (
    LABEL_FORMATS,
    PKU_SAFERLHF_COLUMNS,
    TRL_COLUMNS,
    PREFERENCE_REASONS,
    LoadedPreferences,
    PreferenceColumns,
    PreferenceDataConfig,
    PreferenceDataError,
    PreferenceDataWarning,
    PreferenceFileReport,
    PreferenceLoadReport,
    label_probability,
    load_preference_dataset,
    read_preference_file,
)
from .tokenize import (
    TRAIN_KEYS,
    TokenizeReport,
    end_of_turn_text,
    epoch_permutation,
    format_and_tokenize,
    batch_at,
    iterate_batches,
    prompt_messages,
    train_batch,
)

__all__ = [
    "COLUMNS", "DEFAULT_SPLIT_FRACTIONS", "DEFAULT_SPLIT_SALT", "DEFAULT_SUBSETS", "NUM_OBJECTIVES",
    "OBJECTIVE_NAMES", "REASONS", "SPLIT_NAMES", "SUBSET_OBJECTIVES",
    "FileReport", "HHRLHFDataError", "HHRLHFWarning", "LoadedHH", "LoadReport", "ParsedPair",
    "assign_split", "iter_parsed", "load_hh_rlhf", "make_record", "merge_consecutive_turns", "normalize_prompt",
    "objective_labels", "parse_pair", "parse_pair_with_reason", "parse_turns", "prompt_hash", "read_jsonl_pairs",
    "records_to_dataset", "split_by_prompt",
    "LABEL_FORMATS", "PKU_SAFERLHF_COLUMNS", "TRL_COLUMNS", "PREFERENCE_REASONS", "LoadedPreferences", "PreferenceColumns",
    "PreferenceDataConfig", "PreferenceDataError", "PreferenceDataWarning", "PreferenceFileReport",
    "PreferenceLoadReport", "label_probability", "load_preference_dataset", "read_preference_file",
    "TRAIN_KEYS", "TokenizeReport", "end_of_turn_text", "epoch_permutation", "format_and_tokenize",
    "batch_at", "iterate_batches", "prompt_messages", "train_batch",
]
