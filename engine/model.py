"""The network: torchvision ResNet18 with a 1-channel first conv and a single NG logit.

torch is imported inside the functions so ``import engine.model`` works where torch is absent (the CPU
daemon); only training, export and the torch backend call these.
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
    from torchvision.models import resnet18

    model: torch.nn.Module = resnet18(weights=None)
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
