"""Fuzzing the configuration surface: hypothesis-made TOML files and command lines give either
a finished run or a one-line error with exit code 2, never a traceback."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import os
import tempfile

from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from fedsynsam.cli import main
from fedsynsam.config import Config

FIELDS = [f.name for f in dataclasses.fields(Config)]
# settings whose size sets the work of a run: only small values, so that every example ends quickly
COSTLY = {
    "rounds", "local_steps", "batch_size", "syn_per_class", "syn_unroll", "syn_iters", "syn_refresh_iters",
    "sfc_samples", "sfc_iters",
    "fedsynth_batches", "fedsynth_batch_size", "fedsynth_iters",
}  # fmt: skip
CHOICES = ["fedavg", "fedsynsam", "dppf", "topk", "sign", "3sfc", "mnist", "cifar10", "cnn", "server", "shards", ""]

small_ints = st.integers(-2, 3)
any_ints = st.one_of(small_ints, st.sampled_from([0, 2**31, 2**63 - 1, -(2**63), 10**6]))
floats = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, -0.0, 0.01, 0.5, 1.0, 1.5, 1e-300]),
)
texts = st.one_of(st.sampled_from(CHOICES), st.text(max_size=8))


def _value(name: str):
    scalar = st.one_of(small_ints if name in COSTLY else any_ints, floats, texts, st.booleans())
    return st.one_of(scalar, st.lists(small_ints, max_size=3))


def _toml_value(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else ("inf" if v == math.inf else "-inf" if v == -math.inf else repr(v))
    if isinstance(v, str):
        return json.dumps(v)  # a TOML basic string (a lone surrogate makes invalid TOML: also a fine case)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    return str(v)


# a small valid run; each fuzzed file changes a few of its settings (so that checks past the first
# failing one are reached too), adds unknown keys, or is plain garbage
SMALL = dict(rounds=2, clients=4, per_round=2, local_steps=1, syn_min_models=2, syn_span=1, syn_window=3, syn_iters=1)


@st.composite
def toml_files(draw) -> str:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.text(max_size=40))
    values = dict(SMALL)
    for name in draw(st.lists(st.one_of(st.sampled_from(FIELDS), st.text(min_size=1, max_size=6)), max_size=3)):
        values[name] = draw(_value(name))
    lines = []
    for name, v in values.items():
        key = name.replace("_", "-") if draw(st.booleans()) else name
        lines.append(f"{json.dumps(key)} = {_toml_value(v)}")
    return "\n".join(lines) + "\n"


def _run_cli(argv: list[str]) -> tuple[int, str]:
    """``fedsynsam ARGV`` in a scratch folder; returns (exit code, stderr). Any exception escapes."""
    err = io.StringIO()
    cwd = os.getcwd()
    with tempfile.TemporaryDirectory() as tmp:
        os.chdir(tmp)
        try:
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
                try:
                    code = main(argv)
                except SystemExit as e:  # argparse: usage line + one error line, exit 2
                    code = e.code
        finally:
            os.chdir(cwd)
    return code, err.getvalue()


def _check(code, stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert code in (0, 2), (code, stderr)
    if code == 2:
        lines = [ln for ln in stderr.strip().splitlines() if ln.strip() and not ln.startswith("usage:")]
        errors = [ln for ln in lines if ": error:" in ln]
        assert len(errors) == 1, stderr


# a small run by default; the fuzzed settings come after and may override any of these
BASE = ["--quiet", "--rounds", "2", "--clients", "4", "--per-round", "2", "--local-steps", "1"]


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(toml=toml_files())
# what earlier rounds of this fuzzing found (each once gave a traceback)
@example(toml='dataset = "mnist"\ndata_dir = 5\n')
@example(toml="rounds = 1\nclients = 100\nper_round = 2\nalpha = 1e-300\n")
@example(toml="rounds = 1\nclients = 4\nper_round = 2\nlocal_steps = 1\nlr = 1e300\n")
@example(toml='rounds = 1\nclients = 4\nper_round = 2\ncompressor = "3sfc"\nsfc_lr = 1e300\n')
def test_fuzzed_toml_gives_a_run_or_a_one_line_error(toml):
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False, encoding="utf-8", errors="replace") as f:
        f.write(toml)
    try:
        code, stderr = _run_cli(["train", "--config", f.name, "--out", "run", "--quiet"])
    finally:
        os.unlink(f.name)
    _check(code, stderr)


def _flag_values(name: str):
    return st.one_of(
        st.sampled_from(["1", "2", "0", "-1", "0.5", "nan", "inf", "true", "false", "1e400", ""] + CHOICES),
        st.integers(-2, 3).map(str) if name in COSTLY else st.integers(-(2**64), 2**64).map(str),
        st.text(max_size=6),
    )


@st.composite
def command_lines(draw) -> list[str]:
    command = draw(st.sampled_from(["train", "compare", "sharpness", "nonsense"]))
    argv = [command]
    if command == "train":
        argv += ["--out", "run"] + BASE
    elif command == "compare":
        argv += ["--out", "grid", "--algorithms", "fedavg", "--compressors", "topk"] + BASE
    elif command == "sharpness":
        argv += draw(st.lists(st.sampled_from(["run", "missing", ""]), max_size=2))
    extra = ["config", "out", "resume", "seeds", "algorithms", "compressors", "samples", "max-iters", "tol"]
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.one_of(st.sampled_from(FIELDS), st.sampled_from(extra), st.text(min_size=1, max_size=5)))
        flag = "--" + name.replace("_", "-")
        argv.append(flag)
        if name != "resume":
            argv.append(draw(_flag_values(name)))
    return argv


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(argv=command_lines())
@example(argv=["compare", "--out", "grid", "--algorithms", "fedavg", *BASE, "--seeds", "0.5"])  # exited 1, no error:
def test_fuzzed_command_lines_give_a_run_or_a_one_line_error(argv):
    _check(*_run_cli(argv))
