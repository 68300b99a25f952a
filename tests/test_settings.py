import pytest
import torch

from dynviz import settings


def test_device_defaults_to_cuda_when_available(monkeypatch):
    monkeypatch.delenv("DYNVIZ_DEVICE", raising=False)
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    assert settings.device().type == expected


def test_device_override(monkeypatch):
    monkeypatch.setenv("DYNVIZ_DEVICE", "cpu")
    assert settings.device() == torch.device("cpu")
    if not torch.cuda.is_available():
        monkeypatch.setenv("DYNVIZ_DEVICE", "cuda")
        with pytest.raises(settings.SettingError, match="CUDA is not available here; set it"):
            settings.device()


def test_a_device_that_is_not_one_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    """A typo in DYNVIZ_DEVICE (torch raises a RuntimeError) is the CLI's one error line."""
    from PIL import Image

    from dynviz.cli import main

    monkeypatch.setenv("DYNVIZ_DEVICE", "gpu")
    with pytest.raises(RuntimeError):
        torch.device("gpu")
    Image.new("RGB", (32, 32), (200, 30, 30)).save(tmp_path / "red.png")
    assert main(["predict", "resnet8", str(tmp_path / "red.png")]) == 1
    assert capsys.readouterr().err == ("error: DYNVIZ_DEVICE=gpu is not a device; set it to "
                                       "cpu, cuda or cuda:N, or unset it\n")


def test_paths_follow_the_environment(monkeypatch, tmp_path):
    from dynviz import workspace

    monkeypatch.setenv("DYNVIZ_CACHE", str(tmp_path / "c"))
    monkeypatch.setenv("DYNVIZ_CHECKPOINTS", str(tmp_path / "k"))
    monkeypatch.setenv("DYNVIZ_DATA", str(tmp_path / "d"))
    monkeypatch.setenv("DYNVIZ_ASSETS", str(tmp_path / "a"))
    assert settings.cache_dir() == tmp_path / "c"
    ws = workspace.builtin()
    assert (ws.cache, ws.checkpoints, ws.results) == (tmp_path / "c", tmp_path / "k",
                                                      tmp_path / "a")
    assert ws.data.roots == (tmp_path / "d",)
    monkeypatch.delenv("DYNVIZ_CACHE")
    assert settings.cache_dir() == settings.PROJECT_ROOT / ".cache"


def test_the_native_runner_builds_apart_from_the_data_caches(monkeypatch, tmp_path):
    monkeypatch.setenv("DYNVIZ_CACHE", str(tmp_path / "c"))
    monkeypatch.delenv("DYNVIZ_NATIVE_DIR", raising=False)
    assert settings.native_dir() == settings.PROJECT_ROOT / ".cache" / "native"
    monkeypatch.setenv("DYNVIZ_NATIVE_DIR", str(tmp_path / "n"))
    assert settings.native_dir() == tmp_path / "n"
    for off in ("0", "false", "off"):
        monkeypatch.setenv("DYNVIZ_NATIVE", off)
        assert not settings.native_enabled()
    monkeypatch.setenv("DYNVIZ_NATIVE", "1")
    assert settings.native_enabled()
