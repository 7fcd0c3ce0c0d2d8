"""``python -m treadfx inspect MODULE:FACTORY``: every bad factory or input is one line naming the fix, exit 2."""

from __future__ import annotations

import itertools
import subprocess
import sys
import textwrap

import pytest

from treadfx.__main__ import main

FACTORIES = textwrap.dedent("""
    import torch
    from treadfx.models.dit import DiT

    def make():
        return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=6, num_heads=2, num_classes=10)

    def make_with_size(size):
        return make()

    def make_string():
        return "not a model"

    def make_broken():
        raise RuntimeError("weights file missing\\nsecond line")

    def make_long_tuple():
        return make(), (), {}, 1

    NOT_CALLABLE = 3
""")
_count = itertools.count()


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """A fresh module name per test (no stale sys.modules entry), importable from the working directory."""
    name = f"cli_factories_{next(_count)}"
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name


@pytest.mark.parametrize("target_attr, extra, needles", [
    ("make", [], ["no example inputs", "--input SHAPE[:DTYPE]"]),
    ("make", ["--input", "2,4,8,8", "--input", "2"], ["DiT.forward(x, t, y)", "missing a required argument: 'y'",
                                                       "one --input SHAPE[:DTYPE] per positional argument"]),
    ("make", ["--input", "2,4,8,8", "--input", "2", "--input", "2:long", "--input", "2"],
     ["too many positional arguments", "--input"]),
    ("make", ["--input", "2,4,8,8", "--input", "2", "--input", "2:long", "--kwarg", "z=2"],
     ["unexpected keyword argument 'z'", "--kwarg NAME=SHAPE"]),
    ("make", ["--input", "2,4,8,8", "--input", "2", "--input", "2:long", "--kwarg", "y"], ["NAME=SHAPE[:DTYPE]"]),
    ("make", ["--input", "2,x,8"], ["cannot read tensor shape '2,x,8'", "2,4,32,32"]),
    ("make", ["--input", "2:complex"], ["unknown dtype 'complex'", "use one of"]),
    ("make_with_size", ["--input", "2"], ["calling", "make_with_size() failed with TypeError",
                                          "must take no arguments"]),
    ("make_string", ["--input", "2"], ["returned a str, not a torch.nn.Module"]),
    ("make_broken", ["--input", "2"], ["failed with RuntimeError: weights file missing;"]),
    ("make_long_tuple", ["--input", "2"], ["tuple of 4", "(model, args, kwargs)"]),
    ("NOT_CALLABLE", [], ["is a int, not a function"]),
    ("nothing_here", [], ["has no attribute 'nothing_here'"]),
])
def test_bad_factory_or_inputs_is_one_line_with_the_fix_and_exit_2(factories, capsys, target_attr, extra, needles):
    code = main(["inspect", f"{factories}:{target_attr}", *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith("treadfx inspect: error: ") and err.count("\n") == 1, err
    for needle in needles:
        assert needle in err, (needle, err)


@pytest.mark.parametrize("target, needle", [
    ("no_such_module_xyz:make", "cannot import 'no_such_module_xyz'"),
    ("just_a_module", "is not MODULE:FACTORY"),
])
def test_bad_target_is_one_line_with_exit_2(target, needle, capsys):
    assert main(["inspect", target]) == 2
    err = capsys.readouterr().err
    assert needle in err and err.count("\n") == 1


def test_missing_input_from_a_subprocess_prints_no_traceback(factories):
    proc = subprocess.run([sys.executable, "-m", "treadfx", "inspect", f"{factories}:make", "--input", "2,4,8,8"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and proc.stderr.count("\n") == 1
    assert "missing a required argument: 't'" in proc.stderr
