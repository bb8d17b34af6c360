from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from inspectd.cli import COMMANDS, main

REPO = Path(__file__).resolve().parents[2]


def test_daemon_and_engine_import_without_torch() -> None:
    code = (
        "import sys; sys.modules['torch'] = None; sys.modules['tensorrt'] = None; "
        "import daemon, inspectd.cli, engine, engine.preprocess, engine.package, engine.backend, engine.model; "
        "assert 'training' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=REPO)


def test_cli_lists_commands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        assert name in out


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_command_has_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main([name, "--help"])
    assert exc.value.code == 0
    assert f"inspectd {name}" in capsys.readouterr().out


def test_model_is_one_channel_one_logit() -> None:
    torch = pytest.importorskip("torch")
    from engine.model import build_model

    model = build_model(None).eval()
    assert model.conv1.weight.shape == (64, 1, 7, 7)
    with torch.no_grad():
        assert model(torch.zeros(2, 1, 64, 64)).shape == (2, 1)


def test_imagenet_style_weights_are_summed_not_discarded(tmp_path: Path) -> None:
    torch = pytest.importorskip("torch")
    from torchvision.models import resnet18

    from engine.model import build_model

    rgb = resnet18(weights=None)
    path = tmp_path / "imagenet_like.pth"
    torch.save(rgb.state_dict(), path)
    gray = build_model(path)
    torch.testing.assert_close(gray.conv1.weight, rgb.conv1.weight.sum(dim=1, keepdim=True))
    torch.testing.assert_close(gray.layer1[0].conv1.weight, rgb.layer1[0].conv1.weight)
    # a gray image x through the adapted net = the RGB image (x, x, x) through the original, up to fc
    x = torch.rand(1, 1, 64, 64)
    with torch.no_grad():
        feat_gray = gray.layer1(gray.maxpool(gray.relu(gray.bn1(gray.conv1(x)))))
        feat_rgb = rgb.layer1(rgb.maxpool(rgb.relu(rgb.bn1(rgb.conv1(x.expand(1, 3, 64, 64))))))
    torch.testing.assert_close(feat_gray, feat_rgb, atol=1e-4, rtol=1e-4)
    # our own checkpoint loads back (1-channel conv1, 1-logit fc)
    torch.save(gray.state_dict(), tmp_path / "ours.pth")
    again = build_model(tmp_path / "ours.pth")
    torch.testing.assert_close(again.fc.weight, gray.fc.weight)


def test_imagenet_without_cache_says_where_to_put_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    torch = pytest.importorskip("torch")
    from engine.model import build_model

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FileNotFoundError, match="not in torchvision's cache"):
        build_model("imagenet")


def test_the_resnet18_made_without_torchvision_is_torchvisions() -> None:
    """A GPU station whose Python has torch alone builds the same network (names, shapes, numbers)."""
    torch = pytest.importorskip("torch")
    from torchvision.models import resnet18

    from engine.model import _resnet18_modules

    theirs, ours = resnet18(weights=None).eval(), _resnet18_modules().eval()
    assert {k: v.shape for k, v in theirs.state_dict().items()} == {
        k: v.shape for k, v in ours.state_dict().items()
    }
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(theirs(x), ours(x))
