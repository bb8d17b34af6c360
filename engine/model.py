"""The network: torchvision ResNet18 with a 1-channel first conv and a single NG logit; and the one way a saved
torch state becomes a network again (:func:`model_from_state`, :func:`load_state`), for either model kind.

torch is imported inside the functions so ``import engine.model`` works where torch is absent (the CPU
daemon); only training, export and the torch backend call these. Where torchvision is absent (a GPU station
whose Python has torch alone) the same ResNet18 is built from :func:`_resnet18_modules`: the same modules
under the same names, so a state dict fits either.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch


def build_model(weights: str | Path | None = None) -> torch.nn.Module:
    """ResNet18, 1 input channel, 1 output logit (NG).

    ``weights``: None/"none" (from scratch), "imagenet" (torchvision's IMAGENET1K_V1 through its cache —
    no download is attempted when the cache lacks it; the error says where to put the file), or a path to a
    state dict (loaded with ``weights_only=True``): either an ImageNet ResNet18 (3-channel conv1, 1000-way fc)
    or one of ours. The 3-channel conv1 kernels are summed into one channel, so a gray image x gives the same
    activation as the RGB image (x, x, x) did: the pretrained filters keep their meaning.
    """
    import torch

    model: torch.nn.Module = _resnet18()
    state: dict[str, Any] | None = None
    if weights is None or str(weights).lower() == "none":
        pass
    elif str(weights).lower() == "imagenet":
        state = _imagenet_state()
    else:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"--weights {path}: no such file")
        loaded = torch.load(path, map_location="cpu", weights_only=True)
        state = loaded.get("model", loaded) if isinstance(loaded, dict) else None
        if not isinstance(state, dict):
            raise ValueError(f"--weights {path}: not a state dict")

    if state is not None and state.get("conv1.weight") is not None and state["conv1.weight"].shape[1] == 3:
        model.load_state_dict(state)  # an ImageNet ResNet18: adapt after loading
        state = None
    _adapt(model)
    if state is not None:
        model.load_state_dict(state)  # already ours: 1-channel conv1, 1-logit fc
    return model


def _resnet18() -> torch.nn.Module:
    """torchvision's ``resnet18(weights=None)``, or the same modules made here where torchvision is absent."""
    try:
        from torchvision.models import resnet18
    except ImportError:
        return _resnet18_modules()
    model: torch.nn.Module = resnet18(weights=None)
    return model


def _resnet18_modules() -> torch.nn.Module:
    """ResNet18 (3-channel stem, 1000-way fc) with torchvision's module names and initialisation, so a state
    dict saved from one loads into the other (tests/unit/test_model_cli.py compares them)."""
    import torch
    from torch import nn

    class BasicBlock(nn.Module):
        def __init__(self, cin: int, cout: int, stride: int) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
            self.bn1 = nn.BatchNorm2d(cout)
            self.relu = nn.ReLU(inplace=True)
            self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
            self.bn2 = nn.BatchNorm2d(cout)
            self.downsample: nn.Module | None = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = self.relu(self.bn1(self.conv1(x)))
            out = self.bn2(self.conv2(out))
            identity = x if self.downsample is None else self.downsample(x)
            out_: torch.Tensor = self.relu(out + identity)
            return out_

    class ResNet18(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
            self.bn1 = nn.BatchNorm2d(64)
            self.relu = nn.ReLU(inplace=True)
            self.maxpool = nn.MaxPool2d(3, 2, 1)
            widths = (64, 128, 256, 512)
            for i, w in enumerate(widths):
                cin = widths[i - 1] if i else 64
                stride = 1 if i == 0 else 2
                setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(cin, w, stride), BasicBlock(w, w, 1)))
            self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
            self.fc = nn.Linear(512, 1000)
            for m in self.modules():
                if isinstance(m, nn.Conv2d):
                    nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                elif isinstance(m, nn.BatchNorm2d):
                    nn.init.constant_(m.weight, 1)
                    nn.init.constant_(m.bias, 0)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
            x = self.layer4(self.layer3(self.layer2(self.layer1(x))))  # type: ignore[operator]
            out: torch.Tensor = self.fc(torch.flatten(self.avgpool(x), 1))
            return out

    return ResNet18()


def _adapt(model: Any) -> None:
    import torch

    old = model.conv1
    conv = torch.nn.Conv2d(1, 64, kernel_size=7, stride=2, padding=3, bias=False)
    with torch.no_grad():
        conv.weight.copy_(old.weight.sum(dim=1, keepdim=True))
    model.conv1 = conv
    model.fc = torch.nn.Linear(model.fc.in_features, 1)


def _imagenet_state() -> dict[str, Any]:
    import torch
    from torchvision.models import ResNet18_Weights

    url = ResNet18_Weights.IMAGENET1K_V1.url
    cache = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
    if not cache.is_file():
        raise FileNotFoundError(
            f"ImageNet weights are not in torchvision's cache ({cache}); this machine cannot download them. "
            f"Copy {Path(url).name} there, or pass --weights PATH to a ResNet18 state dict."
        )
    state: dict[str, Any] = torch.load(cache, map_location="cpu", weights_only=True)
    return state


def model_from_state(state: dict[str, Any]) -> torch.nn.Module:
    """The network a saved state dict belongs to: the patch memory (engine.patch_model, its settings travel in
    the state) or the ResNet18 of :func:`build_model`."""
    if isinstance(state, dict) and "bank" in state and "kernel" in state:
        from engine.patch_model import PatchMemory

        return PatchMemory.from_state(state).eval()
    if isinstance(state, dict) and any(k.startswith("members.") and k.endswith(".bank") for k in state):
        from engine.patch_model import PatchEnsemble

        return PatchEnsemble.from_state(state).eval()
    model = build_model(None)
    model.load_state_dict(state)
    return model


def is_engine_model(model: torch.nn.Module) -> bool:
    """True for a network :func:`model_from_state` rebuilds from its state dict: a patch memory (single or
    ensemble) or the ResNet18 of :func:`build_model`."""
    from engine.patch_model import PatchEnsemble, PatchMemory

    if isinstance(model, PatchMemory | PatchEnsemble):
        return True
    ours = build_model(None).state_dict()
    theirs = model.state_dict()
    return set(ours) == set(theirs) and all(ours[k].shape == theirs[k].shape for k in ours)


def load_state(data: bytes, *, source: str = "the torch state") -> torch.nn.Module:
    """The network saved in ``data`` (a state dict written by ``torch.save``, loaded with ``weights_only=True``: tensors
    and plain values only, never code), rebuilt by :func:`model_from_state`, in eval mode without gradients.
    A training checkpoint (``{"model": state, …}``) and a state saved from the logit-only export wrapper
    (``net.`` keys) are accepted too. ValueError naming ``source`` when it is not one of our networks."""
    import io

    import torch

    try:
        state = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling errors come in many types
        raise ValueError(f"cannot load {source} as a weights-only state dict: {exc}") from None
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if not isinstance(state, dict) or not state:
        raise ValueError(f"{source} does not hold a state dict")
    if all(str(k).startswith("net.") for k in state):
        state = {k[4:]: v for k, v in state.items()}
    try:
        model = model_from_state(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{source} does not fit engine.model's network: {exc}") from None
    model.eval().requires_grad_(False)
    return model


class CamHead:
    """Builds the export graph: logits plus a class-activation map from the last conv features and the fc
    weights (no gradients), so the daemon and replay can show where the model looked."""

    @staticmethod
    def wrap(model: torch.nn.Module) -> torch.nn.Module:
        import torch

        if hasattr(model, "with_heatmap"):  # the patch memory: its z-map is the map

            class _OwnMap(torch.nn.Module):
                def __init__(self, net: torch.nn.Module) -> None:
                    super().__init__()
                    self.net = net

                def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                    net: Any = self.net
                    out: tuple[torch.Tensor, torch.Tensor] = net.with_heatmap(x)
                    return out

            return _OwnMap(model)

        class _WithCam(torch.nn.Module):
            def __init__(self, net: torch.nn.Module) -> None:
                super().__init__()
                self.net = net

            def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
                n: Any = self.net
                f = n.layer4(n.layer3(n.layer2(n.layer1(n.maxpool(n.relu(n.bn1(n.conv1(x))))))))
                logit = n.fc(torch.flatten(n.avgpool(f), 1))[:, 0]
                cam = torch.einsum("nchw,c->nhw", f, n.fc.weight[0])
                return logit, cam

        return _WithCam(model)
