"""Every benchmark's numeric options reject out-of-range values with argparse's one-line error."""

from __future__ import annotations

import argparse

import pytest

from picochat.cli import build_parser


def _bench_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    top = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    bench = top.choices["bench"]
    sub = next(a for a in bench._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _ranged(parser: argparse.ArgumentParser):
    """(flag, a value below the option's range) for the options typed with options.int_at_least/float_in."""
    for action in parser._actions:
        kind = getattr(action.type, "__name__", "")
        if kind.startswith("integer >= "):
            yield action.option_strings[0], str(int(kind.split()[-1]) - 1)
        elif kind == "number":
            yield action.option_strings[0], "-1"


CASES = [(name, flag, bad) for name, p in _bench_parsers().items() for flag, bad in _ranged(p)]


def test_every_bench_has_ranged_options():
    names = {name for name, _, _ in CASES}
    assert {"eval", "decode", "rl", "serve", "sft", "muon"} <= names
    assert len(CASES) >= 50


@pytest.mark.parametrize(("bench", "flag", "bad"), CASES, ids=[f"{b}{f}" for b, f, _ in CASES])
def test_out_of_range_is_a_one_line_error(bench, flag, bad, capsys):
    with pytest.raises(SystemExit) as stop:
        build_parser().parse_args(["bench", bench, flag, bad])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and flag in err and ("must be" in err), err


def test_a_word_where_a_number_goes_is_named():
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench", "eval", "--max-per-task", "many"])


def test_in_range_values_parse():
    args = build_parser().parse_args(["bench", "eval", "--max-per-task", "7", "--standin", "0"])
    assert (args.max_per_task, args.standin) == (7, 0)


def test_bench_train_inductor_settings_are_applied_and_checked():
    import torch._inductor.config as inductor_config

    from picochat.bench.train import apply_inductor_settings

    before = (inductor_config.coordinate_descent_tuning, inductor_config.triton.unique_kernel_names)
    try:
        got = apply_inductor_settings("coordinate_descent_tuning=True, triton.unique_kernel_names=False")
        assert got == {"coordinate_descent_tuning": True, "triton.unique_kernel_names": False}
        assert inductor_config.coordinate_descent_tuning is True
        assert inductor_config.triton.unique_kernel_names is False
    finally:
        inductor_config.coordinate_descent_tuning, inductor_config.triton.unique_kernel_names = before
    assert apply_inductor_settings("") == {}
    with pytest.raises(ValueError, match="no setting 'no_such_knob'"):
        apply_inductor_settings("no_such_knob=1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        apply_inductor_settings("coordinate_descent_tuning")
