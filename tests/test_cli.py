from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch
from PIL import Image

from dynviz import settings, workspace, zoo
from dynviz.cli import build_parser, main
from tests.helpers import INSTALL_HINT, run_outside, workspace_toml, write_random_checkpoints


COMMANDS = ("init", "data", "native", "train", "bench", "cache", "policies", "ship", "evaluate",
            "predict")


def test_help_lists_subcommands():
    out = subprocess.run([sys.executable, "-m", "dynviz", "--help"], capture_output=True,
                         text=True, cwd=settings.PROJECT_ROOT, check=True).stdout
    listed = [line.split()[0] for line in out.split("COMMAND\n", 1)[1].splitlines()
              if line.startswith("    ") and line[4] != " "]      # not a wrapped help line
    assert tuple(listed) == COMMANDS


@pytest.mark.parametrize("args", [["--help"], ["train", "no_such_recipe"]])
def test_the_dynviz_command_is_python_m_dynviz(args, tmp_path):
    """The installed console script prints and exits as ``python -m dynviz`` does (``train``
    with an unknown recipe: main's return value 2 becomes the exit status)."""
    script = Path(sysconfig.get_path("scripts")) / "dynviz"     # the venv's bin/
    assert script.exists(), INSTALL_HINT
    command = run_outside([str(script), *args], tmp_path)
    module = subprocess.run([sys.executable, "-m", "dynviz", *args], capture_output=True,
                            text=True, cwd=settings.PROJECT_ROOT)
    assert (command.returncode, command.stdout, command.stderr) == \
        (module.returncode, module.stdout, module.stderr)
    assert module.returncode == (0 if args == ["--help"] else 2)


def test_version_is_the_installed_distributions(capsys):
    from importlib.metadata import version

    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"dynviz {version('dynviz')}"


@pytest.mark.parametrize("command", [[c] for c in COMMANDS] + [
    ["bench", b] for b in ("gated", "policy", "stages", "staged")])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*command, "--help"])
    assert exit_.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: python -m dynviz {' '.join(command)}")


def test_ship_caches_then_ships_policies_then_writes_results(small_cifar, tmp_path,
                                                              monkeypatch, capsys):
    """``ship`` runs the three steps with its own arguments: policies of the kind asked for,
    the results table of the check half into assets/results.json."""
    from dynviz import cache, zoo
    from dynviz.cli import ship

    monkeypatch.setenv("DYNVIZ_DATA", str(small_cifar))
    monkeypatch.setenv("DYNVIZ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("DYNVIZ_ASSETS", str(tmp_path / "assets"))
    calls = []
    monkeypatch.setattr(zoo, "available", lambda ws: ["resnet8"])
    monkeypatch.setattr(zoo, "load_system", lambda ws, name: f"model {name}")
    monkeypatch.setattr(zoo, "checkpoint_sha", lambda ws, name: "0" * 64)
    monkeypatch.setattr(cache, "ensure", lambda ws, name, model, split, sha, root: calls.append(
        ("cache", name, model(), split.name, root)) or cache.CachedOutputs(root / name, {}, {}))
    monkeypatch.setattr(ship, "report_policies",
                        lambda ws, family, feature: calls.append(("policies", family, feature)))
    monkeypatch.setattr(ship, "write_results", lambda ws, split, out, *, time_it, repeats:
                        calls.append(("results", split.name, out, time_it, repeats)))
    assert main(["ship", "--family", "linear", "--feature", "margin", "--no-timing",
                 "--repeats", "3"]) == 0
    assets = tmp_path / "assets"
    assert calls == [("cache", "resnet8", "model resnet8", "val", assets / "outputs"),
                     ("policies", "linear", "margin"),
                     ("results", "check", assets / "results.json", False, 3)]


def test_ship_without_timing_writes_results_with_null_speedups(app_env, tmp_path,
                                                                monkeypatch, capsys):
    """``ship --no-timing`` into a results directory of its own: the cached outputs copied
    there, the policies, and a results table whose speedups are null (not measured)."""
    from dynviz import evaluate, operating_points, workspace, zoo

    monkeypatch.setenv("DYNVIZ_ASSETS", str(tmp_path / "results"))
    assert main(["ship", "--no-timing"]) == 0
    ws = workspace.builtin()
    assert ws.results == tmp_path / "results"
    available = zoo.available(ws)
    shipped = {p.name.split("-val-")[0] for p in (ws.results / "outputs").iterdir()}
    assert shipped == set(available)
    for name in zoo.staged(ws, available):
        for loss in operating_points.LOSSES:
            assert operating_points.load_policy(ws, name, loss) is not None
    rows = json.loads((ws.results / "results.json").read_text())
    assert [list(r) for r in rows] == [list(evaluate.Row.__dataclass_fields__)] * len(rows)
    assert {r["system"] for r in rows} >= set(available)
    assert all(r["speedup_b1"] is None and r["speedup_b256"] is None for r in rows)
    assert "| — | — |" in capsys.readouterr().out


OWN_WORKSPACE = workspace_toml(
    ("ant", "bee", "cow"), 16,
    {"small": {"kind": "static", "model": "resnet8", "checkpoint": "small"},
     "big": {"kind": "static", "model": "resnet20", "checkpoint": "big"},
     "exits": {"kind": "exits", "model": "exits_resnet20", "checkpoint": "exits"}},
    reference="big")


def test_ship_and_predict_work_in_a_workspace_of_ones_own(tmp_path, capsys):
    """Another dataset (3 classes, 16-pixel images), its own systems and reference: ``ship``
    writes beside its dynviz.toml, ``predict`` answers with its class names."""
    from dynviz import operating_points, workspace, zoo
    from tests.helpers import make_imagefolder, randomize

    (tmp_path / "dynviz.toml").write_text(OWN_WORKSPACE)
    ws = workspace.load(tmp_path)
    make_imagefolder(tmp_path / "images", per_class=40, size=20, classes=ws.data.classes)
    ws.checkpoints.mkdir(parents=True)
    for i, spec in enumerate(ws.systems.values()):
        torch.save(randomize(zoo.create_model(ws, spec).eval(), seed=i).state_dict(),
                   zoo.checkpoint_path(ws, spec.checkpoints[0]))
    assert main(["--workspace", str(tmp_path), "ship", "--no-timing"]) == 0
    rows = json.loads((tmp_path / "results" / "results.json").read_text())
    assert {r["system"] for r in rows} == {"small", "big", "exits", "exits oracle"}
    assert [r["macs_reduction"] for r in rows if r["system"] == "big"] == [1.0]
    assert {p.name.split("-val-")[0] for p in (tmp_path / "results" / "outputs").iterdir()} \
        == {"small", "big", "exits"}
    assert operating_points.load_policy(ws, "exits", operating_points.LOSSES[0]) is not None
    image = tmp_path / "image.png"
    Image.new("RGB", (40, 30), (200, 30, 30)).save(image)
    capsys.readouterr()
    assert main(["--workspace", str(tmp_path), "predict", "exits", str(image)]) == 0
    (line,) = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert line["prediction"] in ws.data.classes
    assert sorted(c for c, _ in line["top5"]) == sorted(ws.data.classes)


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
    from dynviz import live, uploads, workspace

    paths = []
    for i, colour in enumerate([(200, 30, 30), (20, 40, 220)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48, 40), colour).save(paths[-1])
    assert main(["predict", "lcnet_resnet20", *map(str, paths)]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    ws = workspace.builtin()
    live_system = live.build(ws, "lcnet_resnet20")
    assert [line["image"] for line in lines] == list(map(str, paths))
    wanted = [live.inspect_image(live_system, uploads.preprocess_upload(
        p.read_bytes(), ws.data.image_size)).summary() for p in paths]
    assert wanted[0]["top5"] != wanted[1]["top5"]      # so that a mix-up of files shows
    for line, want in zip(lines, wanted):
        for key in ("prediction", "macs", "macs_dense", "blocks_executed"):  # not timings
            assert line[key] == want[key], key
        assert [c for c, _ in line["top5"]] == [c for c, _ in want["top5"]]
        assert [p for _, p in line["top5"]] == pytest.approx([p for _, p in want["top5"]],
                                                             abs=1e-4)


def test_policies_writes_the_operating_points_and_prints_the_comparison(app_env, tmp_path,
                                                                        monkeypatch, capsys):
    from dynviz import operating_points, policy_report, workspace, zoo

    monkeypatch.setenv("DYNVIZ_ASSETS", str(tmp_path))
    assert main(["policies", "--family", "threshold", "--feature", "margin"]) == 0
    out = capsys.readouterr().out
    ws = workspace.builtin()
    staged = zoo.staged(ws, zoo.available(ws))
    for name in staged:
        for loss in operating_points.LOSSES:
            path = operating_points.policy_path(ws, name, loss)
            assert f"wrote {path}\n" in out and path.parent == tmp_path / "policies"
            policy = operating_points.load_policy(ws, name, loss)
            assert (policy.family, policy.feature) == ("threshold", "margin")
    table = policy_report.markdown([policy_report.report(ws, name, app_env, "threshold",
                                                         "margin") for name in staged])
    assert out.endswith(table + "\n")


@pytest.mark.parametrize("command", [["predict", "resnet8", "IMAGE"],
                                     ["cache", "--model", "resnet8", "--split", "fit"]])
def test_a_truncated_checkpoint_says_in_one_line_how_to_restore_it(command, small_cifar,
                                                                   tmp_path):
    checkpoints = tmp_path / "ckpt"
    write_random_checkpoints(checkpoints, {"resnet8": "resnet8"})
    path = checkpoints / "resnet8.pt"
    path.write_bytes(path.read_bytes()[:4096])            # a copy cut short
    image = tmp_path / "image.png"
    Image.new("RGB", (32, 32), (200, 30, 30)).save(image)
    env = dict(os.environ, DYNVIZ_DATA=str(small_cifar), DYNVIZ_CHECKPOINTS=str(checkpoints),
               DYNVIZ_CACHE=str(tmp_path / "cache"), DYNVIZ_ASSETS=str(tmp_path / "assets"),
               DYNVIZ_DEVICE="cpu", DYNVIZ_NATIVE="0")
    run = subprocess.run([sys.executable, "-m", "dynviz",
                          *[str(image) if a == "IMAGE" else a for a in command]],
                         env=env, cwd=settings.PROJECT_ROOT, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 1 and "Traceback" not in run.stderr
    (line,) = run.stderr.splitlines()
    assert line.startswith(f"error: cannot read {path}: truncated or corrupt (")
    assert line.endswith(f"; restore it with `python -m dynviz train resnet8 --out-dir "
                         f"{checkpoints} --replace`")


def test_a_shipped_checkpoint_that_cannot_be_read_is_restored_from_git(monkeypatch):
    shipped = settings.PROJECT_ROOT / "models" / "checkpoints" / "resnet8.pt"
    if not shipped.exists():
        pytest.skip("no shipped checkpoints")
    monkeypatch.delenv("DYNVIZ_CHECKPOINTS", raising=False)

    def truncated(*args, **kwargs):           # what torch says of a file cut short
        raise RuntimeError("PytorchStreamReader failed reading zip archive: failed finding "
                           "central directory")

    monkeypatch.setattr(torch, "load", truncated)
    with pytest.raises(ValueError) as err:      # the CLI's main reports it in one line
        zoo.load_system(workspace.builtin(), "resnet8")
    assert isinstance(err.value, zoo.CheckpointError) and str(err.value) == (
        f"cannot read {shipped}: truncated or corrupt (PytorchStreamReader failed reading zip "
        "archive: failed finding central directory); restore it with "
        "`git checkout -- models/checkpoints/resnet8.pt`")


def test_an_error_is_one_line_and_its_traceback_with_verbose(tmp_path, capsys):
    (tmp_path / "dynviz.toml").write_text("reference = [")
    assert main(["--workspace", str(tmp_path), "data"]) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {tmp_path / 'dynviz.toml'}")
    from dynviz.workspace import WorkspaceError
    with pytest.raises(WorkspaceError):
        main(["-v", "--workspace", str(tmp_path), "data"])


def test_a_command_line_names_the_workspace_it_runs_in(tmp_path):
    """The built-in workspace needs no --workspace; one of one's own is named by its whole
    path, quoted for the shell."""
    (tmp_path / "dynviz.toml").write_text(OWN_WORKSPACE)
    assert workspace.builtin().command("ship") == "python -m dynviz ship"
    assert workspace.load(tmp_path).command("policies") == \
        f"python -m dynviz --workspace {tmp_path.resolve()} policies"
    spaced = tmp_path / "my ws"
    assert settings.command("ship", spaced) == f"python -m dynviz --workspace '{spaced}' ship"


@pytest.mark.parametrize("argv, says", [
    (["train", "resnet8", "--epochs", "0"], "argument --epochs: '0' is not a whole number ≥ 1"),
    (["bench", "staged", "--images", "-3"], "argument --images: '-3' is not a whole number ≥ 1"),
    (["bench", "gated", "--repeats", "x"], "argument --repeats: 'x' is not a whole number ≥ 1"),
    (["bench", "gated", "--blocks-off", "1.5"],
     "argument --blocks-off: '1.5' is not a number from 0 to 1"),
])
def test_a_bad_number_is_refused_while_parsing(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2 and capsys.readouterr().err.splitlines()[-1].endswith(says)


def test_evaluate_refuses_an_output_it_could_not_write_before_any_work(tmp_path, capsys):
    (tmp_path / "taken").mkdir()
    for out, says in ((tmp_path / "taken", f"{tmp_path / 'taken'} is a directory; name a "
                                           f"file in it"),
                      (tmp_path / "no" / "r.json", f"{tmp_path / 'no'} does not exist; create "
                                                   f"it first")):
        with pytest.raises(SystemExit):
            main(["evaluate", "--out", str(out)])
        assert capsys.readouterr().err.splitlines()[-1].endswith(f"argument --out: {says}")


@pytest.mark.parametrize("argv, says", [
    (["bench", "gated", "--model", "resnet56"], "bench gated times a gated model, not "
                                                "'resnet56': choose from lcnet_resnet110, "),
    (["bench", "stages", "--model", "lcnet_resnet56"], "bench stages times a plain ResNet, "
                                                       "not 'lcnet_resnet56': choose from "),
])
def test_a_bench_of_the_wrong_kind_of_model_says_which_models_it_takes(argv, says, capsys):
    assert main(argv) == 1
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"error: {says}")


def test_workspace_goes_before_or_after_the_command(tmp_path, capsys):
    (tmp_path / "dynviz.toml").write_text(OWN_WORKSPACE.replace("[data]", "[dta]"))
    assert main(["--workspace", str(tmp_path), "data"]) == 1
    before = capsys.readouterr().err
    assert main(["data", "--workspace", str(tmp_path)]) == 1
    assert capsys.readouterr().err == before and str(tmp_path / "dynviz.toml") in before
    assert main(["bench", "staged", "--workspace", str(tmp_path)]) == 1
    assert capsys.readouterr().err == before
    with pytest.raises(SystemExit):                # init makes a workspace: not one to name
        main(["init", "x", "--data", "y", "--workspace", str(tmp_path)])


def test_a_command_that_needs_no_workspace_runs_beside_a_broken_one(tmp_path, monkeypatch):
    monkeypatch.setenv("DYNVIZ_WORKSPACE", str(tmp_path / "missing"))
    assert main(["data"]) == 1                                    # it is broken
    assert main(["bench", "policy", "--n", "40", "--stages", "2", "--repeats", "1"]) == 0
