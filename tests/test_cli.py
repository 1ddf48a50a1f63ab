"""The `fastattn` console command: env report and subcommand registry."""
from __future__ import annotations

import json

import pytest

from fastattn.cli import COMMANDS, build_parser, main


def test_env_reports_every_backend_as_json(capsys):
    assert main(["env", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert {"torch", "cpu", "triton", "cuda"} <= set(info["backends"])
    assert info["backends"]["torch"]["available"] is True
    assert info["cuda_available"] in (True, False)


def test_env_table_names_the_reason_of_missing_backends(capsys):
    assert main(["env"]) == 0
    out = capsys.readouterr().out
    assert "backend   available" in out and "extension fastattn._C:" in out


def test_every_registered_command_parses_help():
    parser = build_parser()
    for name in COMMANDS:
        with pytest.raises(SystemExit) as exc:
            parser.parse_args([name, "--help"])
        assert exc.value.code == 0


def test_unknown_command_is_an_error():
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args(["nope"])
    assert exc.value.code == 2
