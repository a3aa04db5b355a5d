"""The HH-RLHF method registry: entries, their validation, the help text, and the docs' one-entry example."""

import pytest

from mopo_jax.configs import apply_overrides
from mopo_jax.experiment import methods
from mopo_jax.experiment.config import ExperimentConfig


def test_every_built_in_method_is_one_entry_with_a_consistent_shape():
    registered = methods.registered_methods()
    assert set(registered) >= {"reference", "dpo_helpful", "dpo_harmless", "dpo_pooled", "weighted_dpo", "modpo",
                               "rewarded_soups", "mopo_pairwise", "mopo_onpolicy"}
    for name, method in registered.items():
        assert method.trains == (method.policy is None)
    assert registered["mopo_pairwise"].knob == registered["mopo_onpolicy"].knob == "threshold"
    assert registered["modpo"].needs_labelers and registered["mopo_onpolicy"].needs_labelers


def test_the_docs_example_adds_a_method_with_one_registration():
    from mopo_jax.experiment.hh_rlhf import train_config_for
    from mopo_jax.policy_objectives import IPO

    methods.register_method(methods.Method(
        name="ipo_helpful", summary="IPO on the helpfulness pairs",
        objective=lambda config: IPO(tau=0.1, label=0),
        data=methods.offline_pairs(methods.only_objective(0)),
    ))
    config = apply_overrides(ExperimentConfig(), ["method.name=ipo_helpful"])
    assert train_config_for(config).objective == IPO(tau=0.1, label=0)
    assert "ipo_helpful" in methods.describe_methods()


@pytest.mark.parametrize(
    "overrides, fragment",
    [
        (["method.name=dpo_helpfull"], "unknown method 'dpo_helpfull'.*registered"),
        (["method.name=weighted_dpo", "method.weights=[0.5, 0.6]"], "method.weights"),
        (["method.name=modpo", "method.weights=[0.0, 1.0]"], "positive helpfulness weight"),
        (["method.name=rewarded_soups"], "soups_from"),
        (["mopo.beta=0.1"], "unknown config key 'mopo.beta'"),
        (["mopo.tau=abc"], "mopo.tau"),
        (["plugins=[no_such_module_xyz]"], "cannot import 'no_such_module_xyz'"),
    ],
)
def test_bad_method_settings_are_named(overrides, fragment):
    with pytest.raises(ValueError, match=fragment):
        apply_overrides(ExperimentConfig(), overrides)


def test_train_help_lists_methods_and_knobs(capsys):
    from mopo_jax import cli

    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "mopo_pairwise" in out and "knob: method.threshold" in out and "knob: method.weights" in out


def test_every_command_and_argument_is_described_with_its_default(capsys):
    """`--help` of every subcommand: a description or help for each subcommand, a help text for each argument, and
    each non-empty default printed (argparse's own `-h` aside)."""
    import argparse

    from mopo_jax import cli

    parser = cli.build_parser()

    def subparsers(p):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, sub in action.choices.items():
                    helps = {a.dest: a.help for a in action._choices_actions}
                    assert helps.get(name), f"mopo ... {name}: no help line"
                    yield name, sub
                    yield from subparsers(sub)

    for name, sub in subparsers(parser):
        for action in sub._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            assert action.help, f"mopo {name} {action.option_strings or action.dest}: no help"
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: smollm2-135m)" in out and "(default: 64)" in out
    with pytest.raises(SystemExit):
        cli.main(["bench", "step", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert "(default: mopo_pairwise)" in out and "(default: 10)" in out and "(default: None)" not in out
