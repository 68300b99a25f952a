from __future__ import annotations

import json
import subprocess
import sys

import pytest
from PIL import Image

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


def test_predict_names_a_bad_file_before_any_model_loads(tmp_path, monkeypatch, capsys):
    from dynviz import live

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded for files that cannot all be read")

    monkeypatch.setattr(live, "build", no_model)
    good = tmp_path / "good.png"
    Image.new("RGB", (40, 30), (10, 200, 30)).save(good)
    text = tmp_path / "notes.jpg"
    text.write_text("not an image")
    for bad, says in ((text, "not an image format"), (tmp_path / "gone.png", "No such file")):
        assert main(["predict", "resnet8", str(good), str(bad)]) == 1
        err = capsys.readouterr().err
        assert err.startswith(f"error: {bad}: ") and says in err


def test_predict_prints_what_inspect_computes_for_each_image(app_env, tmp_path, capsys):
    from dynviz import data, live
    paths = []
    for i, colour in enumerate([(200, 30, 30), (20, 40, 220)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48, 40), colour).save(paths[-1])
    assert main(["predict", "lcnet_resnet20", *map(str, paths)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    runner = live.build("lcnet_resnet20")
    assert [line["image"] for line in lines] == list(map(str, paths))
    wanted = [live.inspect_image(runner, data.preprocess_upload(p.read_bytes())).summary()
              for p in paths]
    assert wanted[0]["top5"] != wanted[1]["top5"]      # so that a mix-up of files shows
    for line, want in zip(lines, wanted):
        for key in ("prediction", "macs", "macs_dense", "blocks_executed"):  # not timings
            assert line[key] == want[key], key
        assert [c for c, _ in line["top5"]] == [c for c, _ in want["top5"]]
        assert [p for _, p in line["top5"]] == pytest.approx([p for _, p in want["top5"]],
                                                             abs=1e-4)
