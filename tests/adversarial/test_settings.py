"""AttackConfig: defaults and the validation of every setting."""

from __future__ import annotations

import math

import pytest

from llmkit.adversarial import AttackConfig, attack, check_objective, check_target, resolve_steps


@pytest.mark.parametrize(
    ("method", "steps", "norm", "step_size", "random"),
    [("fgm", 1, "l2", 0.4, False), ("fgsm", 1, "linf", 0.5, True), ("pgd", 4, "l2", 0.25, False),
     ("freelb", 2, "l2", 0.5, False)],
)
def test_defaults_of_each_method(method, steps, norm, step_size, random):
    config = AttackConfig(method, epsilon=0.4, steps=steps)
    assert (config.p, config.starts_random) == (norm, random)
    assert math.isclose(config.step_size, step_size)


def test_explicit_settings_win():
    config = AttackConfig("pgd", epsilon=0.4, alpha=0.1, steps=3, norm="linf", random_start=True)
    assert (config.p, config.step_size, config.starts_random) == ("linf", 0.1, True)
    assert (resolve_steps("fgsm", None, 7), resolve_steps("freelb", None, 7), resolve_steps("fgm", 1, 7)) == (1, 7, 1)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(epsilon=math.inf), r"`epsilon` must be a number > 0 and finite, got inf"),
        (dict(epsilon=math.nan), r"`epsilon` must be a number > 0 and finite, got nan"),
        (dict(epsilon=-math.inf), r"`epsilon` must be a number > 0 and finite, got -inf"),
        (dict(epsilon=True), r"`epsilon` must be a number > 0 and finite, got True"),
        (dict(epsilon="1"), r"`epsilon` must be a number > 0 and finite, got '1'"),
        (dict(alpha=math.inf), r"`alpha` must be > 0 and finite \(or None\), got inf"),
        (dict(alpha=math.nan), r"`alpha` must be > 0 and finite \(or None\), got nan"),
        (dict(alpha="0.1"), r"`alpha` must be > 0 and finite \(or None\), got '0.1'"),
        (dict(alpha=0.0), r"`alpha` must be > 0 and finite \(or None\), got 0.0"),
        (dict(steps=1.5), r"`steps` must be an integer >= 1, got 1.5"),
        (dict(method="fgsm", steps=2), r"'fgsm' takes one step; got steps=2"),
        (dict(method="freelbb"), r"unknown adversarial method 'freelbb'.*did you mean 'freelb'"),
        (dict(norm="l1"), r"unknown norm 'l1'; choose one of \('l2', 'linf'\)"),
    ],
)
def test_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AttackConfig(**kwargs)


def test_an_infinite_epsilon_is_refused_by_attack_before_any_pass():
    def loss_fn(model, batch):
        raise AssertionError("no pass may run")

    with pytest.raises(ValueError, match=r"`epsilon` must be a number > 0 and finite, got inf"):
        attack(None, None, epsilon=math.inf, loss_fn=loss_fn)  # type: ignore[arg-type]


def test_bad_target_objective_and_range():
    with pytest.raises(ValueError, match=r"unknown adversarial target 'weights'; choose one of"):
        check_target("weights")
    with pytest.raises(ValueError, match=r"`input_range` must be \(low, high\) with low < high, got \(0.0, 0.0\)"):
        check_target("inputs", (0.0, 0.0))
    with pytest.raises(ValueError, match=r"unknown attack objective 'acc'; choose one of \('loss', 'margin'\)"):
        check_objective("acc")
