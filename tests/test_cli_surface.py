"""The CLI's surface: --help with examples on every command, --version, -q and -v, and the
exit codes (0 ok, 2 user error, 1 internal error with a hint to report it, 130 interrupted)."""

from __future__ import annotations

import re

import pytest
import torch

import tcc
from conftest import run_cli
from tcc import cli
from tcc.cli import build_parser, main
from tcc.zoo import DigitsTransformer

COMMANDS = sorted(build_parser()._subparsers._group_actions[0].choices)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--help"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0
    assert re.search(r"^examples?:\n  tcc " + command, out, re.M), out
    assert "-q, --quiet" in out and "-v, --verbose" in out


def test_version_and_top_level_help(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"tcc {tcc.__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "Exit codes: 0 ok, 2 bad input" in capsys.readouterr().out


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "digits.pt2"
    torch.manual_seed(0)
    torch.export.save(torch.export.export(DigitsTransformer().eval(), (torch.rand(2, 8, 8),)), path)
    return path


def test_quiet_prints_the_result_alone_and_verbose_logs_each_pass_with_its_time(model_file, tmp_path, capsys):
    assert main(["compile", str(model_file), "-o", str(tmp_path / "q"), "--pipeline", "quantize", "-q"]) == 0
    quiet = capsys.readouterr()
    assert quiet.err == "" and quiet.out.count("\n") == 1 and quiet.out.startswith("compiled digits.pt2")
    assert main(["-v", "compile", str(model_file), "-o", str(tmp_path / "v"), "--pipeline", "quantize"]) == 0
    verbose = capsys.readouterr().err
    assert re.search(r"^tcc: pass quantize: changed; .* \(\d+\.\d\d s, \d+ ops\)$", verbose, re.M), verbose
    assert main(["-vv", "run", str(tmp_path / "v"), "-q"]) == 0  # -q wins
    assert capsys.readouterr().err == ""


def test_exit_codes(model_file, tmp_path, capsys, monkeypatch):
    assert main(["targets"]) == 0
    assert main(["compile", str(tmp_path / "missing.pt2"), "-o", str(tmp_path / "x")]) == 2
    assert capsys.readouterr().err.startswith("tcc: error: ")

    def broken(args):
        raise KeyError("tile")

    parser = build_parser
    monkeypatch.setattr(cli, "build_parser", lambda: _with(parser(), "targets", broken))
    assert main(["targets"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("tcc: internal error: KeyError: 'tile'") and "please report it" in err
    assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(SystemExit) as exit_:  # argparse's own usage errors are user errors too
        main(["compile"])
    assert exit_.value.code == 2


def _with(parser, command, func):
    parser._subparsers._group_actions[0].choices[command].set_defaults(func=func)
    return parser


def test_the_real_command_exits_2_on_bad_input(tmp_path):
    result = run_cli("compile", tmp_path / "none.pt2", "-o", tmp_path / "o")
    assert result.returncode == 2 and result.stderr.count("\n") == 1 and "Traceback" not in result.stderr
