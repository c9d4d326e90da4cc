"""The ``fastpeft`` command line: help a user can read, and commands that import bitsandbytes without its note
about an optional Hub kernel."""

import argparse
import logging
import subprocess
import sys

import pytest

import fastpeft
from fastpeft import cli


def _subparsers(parser: argparse.ArgumentParser) -> dict:
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_bare_command_prints_help_and_exits_0(capsys):
    assert cli.main([]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastpeft")
    for command in ("info", "bench", "check-kernels", "tune"):
        assert f"\n    {command}" in out


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"fastpeft {fastpeft.__version__}"


@pytest.mark.parametrize("command", ["", "info", "bench", "check-kernels", "tune"])
def test_help_is_plain_text(command):
    parser = cli.build_parser()
    text = (_subparsers(parser)[command] if command else parser).format_help()
    for markup in ("``", ":mod:", ":func:", "python -m fastpeft", "issue"):
        assert markup not in text, (command, markup)
    assert "\n\n" in text and "options:" in text


@pytest.mark.parametrize("command", ["bench", "check-kernels", "tune"])
def test_every_option_has_help_naming_its_default(command):
    parser = _subparsers(cli.build_parser())[command]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if not action.option_strings or isinstance(action, argparse._HelpAction):
            continue
        text = formatter._expand_help(action) if action.help else ""
        assert text, f"{command} {action.option_strings[0]} has no help"
        if action.nargs != 0:  # not a flag: the value it takes when not given is said
            assert "default" in text, f"{command} {action.option_strings[0]}: {text!r}"


def test_bench_help_defaults_are_the_suites():
    from fastpeft.bench.__main__ import SUITES

    text = " ".join(_subparsers(cli.build_parser())["bench"].format_help().split())
    assert f"cpu {','.join(map(str, SUITES['cpu']['micro_m']))};" in text
    assert "b mod adapters" in text


def test_bitsandbytes_hub_kernel_warning_is_dropped_and_nothing_else(monkeypatch, caplog):
    """The filter drops bitsandbytes' record about the Hub kernel during the import, lets its other records
    through, and is gone afterwards."""
    from fastpeft import _bitsandbytes

    logger = logging.getLogger(_bitsandbytes._LOGGER)

    def fake_import(name):
        assert name == "bitsandbytes"
        logger.warning(_bitsandbytes._MESSAGE + ": %s. Please make sure ...", "no network")
        logger.warning("another bitsandbytes warning")
        return "the module"

    monkeypatch.delitem(sys.modules, "bitsandbytes", raising=False)
    monkeypatch.setattr(_bitsandbytes.importlib, "import_module", fake_import)
    with caplog.at_level(logging.WARNING, logger=_bitsandbytes._LOGGER):
        assert _bitsandbytes.import_bitsandbytes() == "the module"
    assert [r.getMessage() for r in caplog.records] == ["another bitsandbytes warning"]
    assert not logger.filters
    with caplog.at_level(logging.WARNING, logger=_bitsandbytes._LOGGER):
        logger.warning(_bitsandbytes._MESSAGE + ": later")
    assert caplog.records[-1].getMessage().endswith("later")


def test_info_in_a_fresh_process_prints_no_hub_kernel_warning():
    pytest.importorskip("bitsandbytes")
    done = subprocess.run([sys.executable, "-m", "fastpeft", "info"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "bitsandbytes " in done.stdout
    assert "kernels-community" not in done.stdout + done.stderr
