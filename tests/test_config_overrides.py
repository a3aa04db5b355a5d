"""Config overrides and YAML config files are typed by the dataclass field's annotation (mopo_jax.configs)."""

from __future__ import annotations

import dataclasses
import glob
import math
import os
from typing import Optional

import pytest
import yaml

from mopo_jax.configs import apply_overrides, config_from_mapping, load_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Inner:
    rate: float = 0.5
    names: tuple[str, ...] = ("a",)


@dataclasses.dataclass(frozen=True)
class Small:
    name: str = "x"
    count: int = 1
    rate: float = 1.0
    flag: bool = False
    maybe_int: int | None = 3
    maybe_float: Optional[float] = 1.0
    maybe_str: str | None = "s"
    ints: tuple[int, ...] = ()
    floats: tuple[float, ...] = ()
    words: tuple[str, ...] = ()
    source: str | tuple[str, ...] = "hub/name"
    inner: Inner = Inner()


def small(*overrides):
    return apply_overrides(Small(), list(overrides))


@pytest.mark.parametrize("text, expected", [("1e-5", 1e-5), ("1.0e-4", 1e-4), (".5", 0.5), ("3", 3.0),
                                            ("-2.5E3", -2500.0)])
def test_float_literals_python_reads(text, expected):
    assert small(f"rate={text}").rate == expected


@pytest.mark.parametrize("text, sign", [("inf", 1), (".inf", 1), ("-inf", -1), ("-.inf", -1), ("Infinity", 1)])
def test_infinities_parse_as_floats(text, sign):
    assert small(f"rate={text}").rate == sign * math.inf


def test_nan_parses_as_float():
    assert math.isnan(small("rate=nan").rate) and math.isnan(small("rate=.nan").rate)


def test_library_learning_rate_1e_minus_5():
    from mopo_jax.experiment.config import ExperimentConfig

    assert apply_overrides(ExperimentConfig(), ["optimizer.learning_rate=1e-5"]).optimizer.learning_rate == 1e-5


@pytest.mark.parametrize("text", ["yes", "007", "a # b", "", "null", "1e-5", "*x", "[a, b]", " padded ", "on"])
def test_str_fields_keep_the_raw_text(text):
    assert small(f"name={text}").name == text


@pytest.mark.parametrize("text, expected", [("true", True), ("False", False), ("YES", True), ("no", False),
                                            ("1", True), ("0", False), ("On", True), ("off", False)])
def test_bool_forms(text, expected):
    assert small(f"flag={text}").flag is expected


@pytest.mark.parametrize("text", ["2", "maybe", "", "truee"])
def test_bad_bool_is_named(text):
    with pytest.raises(ValueError, match=r"flag=.*expected bool"):
        small(f"flag={text}")


@pytest.mark.parametrize("text", ["1.5", "1e3", "abc", ""])
def test_int_accepts_only_integer_literals(text):
    with pytest.raises(ValueError, match=r"count=.*expected int"):
        small(f"count={text}")
    assert small("count=007").count == 7 and small("count=-3").count == -3


@pytest.mark.parametrize("text", ["none", "None", "null", "NULL", "~", ""])
def test_optional_none_forms(text):
    config = small(f"maybe_int={text}", f"maybe_float={text}")
    assert config.maybe_int is None and config.maybe_float is None


@pytest.mark.parametrize("text", ["none", "Null", "~"])
def test_optional_str_none_words(text):
    assert small(f"maybe_str={text}").maybe_str is None


@pytest.mark.parametrize("text", ["", "yes", "007", "a # b"])
def test_optional_str_other_text_is_raw(text):
    assert small(f"maybe_str={text}").maybe_str == text


def test_optional_values_still_typed():
    config = small("maybe_int=5", "maybe_float=1e-5")
    assert config.maybe_int == 5 and config.maybe_float == 1e-5
    with pytest.raises(ValueError, match=r"maybe_int=.*expected int \| None"):
        small("maybe_int=1.5")


@pytest.mark.parametrize("text", ["[1, 2]", "1,2", "[1,2]", " 1 , 2 "])
def test_int_tuple_forms(text):
    assert small(f"ints={text}").ints == (1, 2)


def test_float_and_str_tuple_forms():
    assert small("floats=[1e-5, .5, inf]").floats == (1e-5, 0.5, math.inf)
    assert small("words=[yes, 007, 'a b']").words == ("yes", "007", "a b")
    assert small("words=yes, 007 ,\"c\"").words == ("yes", "007", "c")
    assert small("words=[]").words == () and small("words=").words == ()


def test_bad_tuple_item_is_named():
    with pytest.raises(ValueError, match=r"ints=.*expected tuple\[int, \.\.\.\]"):
        small("ints=[1, 1.5]")
    with pytest.raises(ValueError, match=r"ints=.*expected tuple\[int, \.\.\.\]"):
        small("ints=[1, [2]]")


def test_str_or_tuple_union():
    assert small("source=a/b.jsonl").source == "a/b.jsonl"
    assert small("source=a,b").source == "a,b"
    assert small("source=[a.jsonl, b.jsonl]").source == ("a.jsonl", "b.jsonl")


def test_nested_dotted_keys():
    config = small("inner.rate=1e-5", "inner.names=[x, y]")
    assert config.inner == Inner(rate=1e-5, names=("x", "y"))


def test_library_nested_keys():
    from mopo_jax.experiment.config import ExperimentConfig

    config = apply_overrides(ExperimentConfig(), ["mopo.tau=0.1", "data.pairs.columns.labels=[a,b]"])
    assert config.mopo.tau == 0.1 and tuple(config.data.pairs.columns.labels) == ("a", "b")


@pytest.mark.parametrize("key", ["rate", "count", "ints", "flag", "maybe_int", "inner.rate"])
def test_yaml_alias_text_is_a_named_value_error(key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        small(f"{key}=*x")


def test_unknown_key_is_named():
    with pytest.raises(ValueError, match=r"unknown config key 'inner\.nope'"):
        small("inner.nope=1")
    with pytest.raises(ValueError, match=r"unknown config key 'nope'"):
        small("nope=1")


def write(tmp_path, text):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    return str(path)


def test_duplicate_yaml_key_names_key_line_and_file(tmp_path):
    path = write(tmp_path, "count: 1\ninner:\n  rate: 0.1\n  rate: 0.2\n")
    with pytest.raises(ValueError, match=r"config\.yaml.*duplicate key 'rate'.*line 4") as info:
        load_config(Small, path)
    assert path in str(info.value)


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = write(tmp_path, "count: 1\nrate: [1, 2\n")
    with pytest.raises(ValueError, match=r"config\.yaml is not valid YAML at line \d"):
        load_config(Small, path)


def test_non_mapping_file(tmp_path):
    with pytest.raises(ValueError, match=r"config\.yaml must hold a mapping"):
        load_config(Small, write(tmp_path, "- a\n- b\n"))


def test_file_values_read_like_override_text(tmp_path):
    path = write(tmp_path, "name: 007\nrate: 1e-5\nflag: yes\nmaybe_str: null\nmaybe_int:\nwords: [yes, no]\n"
                           "inner:\n  rate: .inf\n")
    config = load_config(Small, path, ["count=4"])
    assert config == Small(name="007", count=4, rate=1e-5, flag=True, maybe_str=None, maybe_int=None,
                           words=("yes", "no"), inner=Inner(rate=math.inf))


def test_file_errors_name_file_and_key(tmp_path):
    with pytest.raises(ValueError, match=r"config\.yaml.*inner\.rate=.*expected float"):
        load_config(Small, write(tmp_path, "inner:\n  rate: fast\n"))


def test_typed_mapping_values_are_checked():
    config = config_from_mapping(Small, {"count": 2, "rate": 1, "flag": True, "ints": [1, 2], "maybe_int": None,
                                         "inner": {"names": ["p"]}})
    assert config == Small(count=2, rate=1.0, flag=True, ints=(1, 2), maybe_int=None, inner=Inner(names=("p",)))
    with pytest.raises(ValueError, match=r"count=.*expected int"):
        config_from_mapping(Small, {"count": 1.5})
    with pytest.raises(ValueError, match=r"name=.*expected str"):
        config_from_mapping(Small, {"name": True})


HH_CONFIGS = sorted(glob.glob(os.path.join(ROOT, "experiments", "configs", "hh_*.yaml")))


def test_there_are_hh_configs():
    assert len(HH_CONFIGS) >= 5


def _get(config, dotted):
    for part in dotted.split("."):
        config = getattr(config, part)
    return config


def _leaves(mapping, prefix=""):
    for key, value in mapping.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def _expected(field_value, written):
    if isinstance(written, list):
        return tuple(written)
    if isinstance(field_value, float) and isinstance(written, (int, float)):
        return float(written)
    return written


@pytest.mark.parametrize("path", HH_CONFIGS, ids=os.path.basename)
def test_existing_hh_configs_load_unchanged(path):
    from mopo_jax.experiment.config import ExperimentConfig

    config = load_config(ExperimentConfig, path)
    with open(path) as handle:
        written = yaml.safe_load(handle)
    for key, value in _leaves(written):
        assert _get(config, key) == _expected(_get(config, key), value), key
    # a stored run config (read with yaml.safe_load, already typed) gives the same config
    assert config_from_mapping(ExperimentConfig, written, path) == config


def test_hh_tiny_fields():
    from mopo_jax.experiment.config import ExperimentConfig

    config = load_config(ExperimentConfig, os.path.join(ROOT, "experiments", "configs", "hh_tiny.yaml"))
    assert config.profile == "tiny" and config.data.source == "../shared/data/hh-rlhf"
    assert config.data.policy_pairs == 40 and config.model.trainable_top_layers == 1
    assert config.mesh.data == 1 and config.eval.max_new_tokens == 8


SYNTHETIC = os.path.join(ROOT, "experiments", "synthetic.yaml")


def test_synthetic_yaml_loads_as_written():
    """The spelled-out defaults are the embedded defaults (the file once set a top-level multiplier_lr that
    SyntheticConfig no longer has: it lives under mopo)."""
    from mopo_jax.synthetic.benchmark import SyntheticConfig

    config = load_config(SyntheticConfig, SYNTHETIC)
    written = yaml.safe_load(open(SYNTHETIC))
    assert written["steps"] == 6000 and written["ablation"] is True and written["mopo"]["multiplier_lr"] == 0.5
    assert config == SyntheticConfig()
