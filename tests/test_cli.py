"""The ``fxdit`` command line: parser, subcommand loading, ``fxdit dump`` end to end, errors."""

import argparse
import glob
import os
import subprocess
import sys
import textwrap

import pytest

from fxdit import cli
from fxdit.commands import dump as dump_cmd
from fxdit.errors import FxditError


def _subcommands(parser):
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return set(action.choices)
    return set()


def test_help_lists_every_registered_subcommand():
    parser = cli.build_parser()
    assert set(cli._COMMANDS) <= _subcommands(parser)
    assert "dump" in _subcommands(parser)


def test_help_and_version_exit_zero():
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0


def test_console_script_version():
    out = subprocess.run([sys.executable, "-m", "fxdit.cli", "--version"], capture_output=True, text=True)
    import fxdit

    assert out.returncode == 0 and out.stdout.split() == ["fxdit", fxdit.__version__]


def test_no_command_is_a_usage_error():
    assert cli.main([]) == 2


def test_broken_command_module_is_left_out(monkeypatch):
    monkeypatch.setattr(cli, "_COMMANDS", ("dump", "does-not-exist"))
    assert _subcommands(cli.build_parser()) == {"dump"}


@pytest.mark.parametrize("text, shape", [("32x32", (32, 32)), ("8x16x16", (8, 16, 16)), ("4,4", (4, 4))])
def test_parse_shape(text, shape):
    assert dump_cmd.parse_shape(text) == shape


@pytest.mark.parametrize("text", ["32", "0x4", "ax4", "1x2x3x4"])
def test_parse_shape_rejects(text):
    with pytest.raises(argparse.ArgumentTypeError):
        dump_cmd.parse_shape(text)


def test_merge_options_is_nested():
    base = {"dump_dir": "d", "on_pass_error": "raise", "attention": {"mode": "dense", "radius": 1}}
    got = dump_cmd.merge_options(base, {"attention": {"mode": "grat-b"}, "on_pass_error": "fallback"})
    assert got == {"dump_dir": "d", "on_pass_error": "fallback", "attention": {"mode": "grat-b", "radius": 1}}


def _args(*argv):
    parser = cli.build_parser()
    return parser.parse_args(["dump", *argv])


def test_unknown_model_names_the_available_ones(tmp_path):
    from fxdit.apps import models

    with pytest.raises(FxditError) as info:
        dump_cmd.run(_args("--model", "dit-tinny", "--out", str(tmp_path)))
    message = str(info.value)
    assert "did you mean 'dit-tiny'" in message
    for name in models.names():
        assert name in message
    assert cli.main(["dump", "--model", "no-such-model", "--out", str(tmp_path)]) == 2


def test_bad_options_json_is_a_usage_error(tmp_path):
    with pytest.raises(FxditError, match="--options: not valid JSON"):
        dump_cmd.run(_args("--model", "dit-tiny", "--out", str(tmp_path), "--options", "{bad"))
    with pytest.raises(FxditError, match="unknown option bogus"):
        dump_cmd.run(_args("--model", "dit-tiny", "--out", str(tmp_path), "--options", '{"bogus": 1}'))


def test_shape_rejected_for_factory_models(tmp_path):
    with pytest.raises(FxditError, match="--shape applies to shipped model names only"):
        dump_cmd.run(_args("--model", "os.path:join", "--shape", "8x8", "--out", str(tmp_path)))


def test_dump_module_factory(tmp_path, monkeypatch, no_inductor):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "tiny_factory_mod.py").write_text(textwrap.dedent("""
        import torch

        class M(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.qkv = torch.nn.Linear(16, 48)

            def forward(self, x):
                q, k, v = self.qkv(x).reshape(2, 10, 3, 2, 8).permute(2, 0, 3, 1, 4)
                return torch.nn.functional.scaled_dot_product_attention(q, k, v)

        def make():
            return M().eval(), (torch.randn(2, 10, 16),), {}
    """))
    monkeypatch.syspath_prepend(str(pkg))
    out = tmp_path / "dump"
    assert cli.main(["dump", "--model", "tiny_factory_mod:make", "--out", str(out)]) == 0
    dirs = glob.glob(str(out / "graph_*"))
    assert len(dirs) == 1
    with open(os.path.join(dirs[0], "report.md")) as f:
        report = f.read()
    assert "| find_attention |" in report and "## Cost" in report


def _check_dit_tiny_dump(out, batch, tokens):
    dirs = glob.glob(os.path.join(out, "graph_*"))
    assert len(dirs) == 1
    with open(os.path.join(dirs[0], "report.md")) as f:
        report = f.read()
    sites = [line for line in report.splitlines() if line.startswith("| ") and "sdpa" in line]
    assert len(sites) == 2  # dit-tiny: depth 2, one self-attention per block
    assert f"`B` = {batch}" in report and f"`N` = {tokens}" in report
    assert os.path.isfile(os.path.join(dirs[0], "00_input.py"))


def test_dump_dit_tiny_without_inductor(tmp_path, no_inductor):
    out = str(tmp_path / "d")
    assert cli.main(["dump", "--model", "dit-tiny", "--out", out, "--shape", "8x8", "--batch", "3"]) == 0
    _check_dit_tiny_dump(out, batch=3, tokens=16)  # 8x8 latent, patch 2 -> 4x4 grid


@pytest.mark.slow
def test_dump_dit_tiny_end_to_end(tmp_path):
    """The console command, inductor included, as a user runs it."""
    out = str(tmp_path / "d")
    proc = subprocess.run([sys.executable, "-m", "fxdit.cli", "dump", "--model", "dit-tiny", "--out", out],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-2000:]
    _check_dit_tiny_dump(out, batch=2, tokens=64)


@pytest.mark.parametrize("model, shape, grid", [
    ("dit-tiny", (8, 12), (1, 4, 6)),
    ("dit-video-tiny", (2, 8, 8), (2, 4, 4)),
    ("sd3", (16, 8), (1, 8, 4)),
])
def test_shape_sets_the_model_input_size(model, shape, grid):
    args = argparse.Namespace(model=model, shape=shape, batch=2, seed=0)
    spec = dump_cmd._model_spec(args)
    assert spec.expected.token_grid == grid
    assert spec.args[0].shape[0] == 2


def test_shape_a_model_cannot_take_is_a_usage_error():
    args = argparse.Namespace(model="dit-tiny", shape=(15, 16), batch=1, seed=0)
    with pytest.raises(FxditError, match="divisible by the patch"):
        dump_cmd._model_spec(args)


def test_options_from_a_json_file(tmp_path):
    path = tmp_path / "opts.json"
    path.write_text('{"attention": {"mode": "grat-b"}}')
    assert dump_cmd._user_options(str(path)) == {"attention": {"mode": "grat-b"}}
    path.write_text("[1, 2]")
    with pytest.raises(FxditError, match="expected a JSON object"):
        dump_cmd._user_options(str(path))
