from __future__ import annotations

import subprocess
import sys

from dynviz.__main__ import build_parser, main
from dynviz import settings


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "dynviz", "--help"], capture_output=True,
                         text=True, cwd=settings.PROJECT_ROOT, check=True).stdout
    for command in ("data", "train"):
        assert command in out


def test_data_command_reports_the_splits(small_cifar, cache_env, capsys):
    assert main(["data", "--root", str(small_cifar)]) == 0
    out = capsys.readouterr().out
    assert "5100 images" in out
    for line in ("train     100", "val      5000", "fit      2500", "check    2500"):
        assert line in out


def test_data_command_fails_clearly_without_data(tmp_path, capsys):
    assert main(["data", "--root", str(tmp_path)]) == 1
    assert "DYNVIZ_DATA" in capsys.readouterr().err


def test_unknown_recipe_is_refused(capsys):
    assert main(["train", "no_such_recipe"]) == 2
    assert "choose from" in capsys.readouterr().err


def test_parser_requires_a_command():
    import pytest
    with pytest.raises(SystemExit):
        build_parser().parse_args([])
