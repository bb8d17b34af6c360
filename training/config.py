"""Training configuration: one frozen dataclass, named presets, a JSON/TOML file, then command-line flags.

Precedence: preset (``--preset``, default ``default``) < ``--config FILE`` < individual flags. Unknown keys are
errors that name the key, so a typo never silently trains with a default.
"""

from __future__ import annotations

import json
import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from engine.preprocess import PreprocessParams
from training.augment import AugmentConfig

ARCHS = ("patch_memory", "resnet18")


@dataclass(frozen=True, slots=True)
class TrainConfig:
    # The model: "patch_memory" (engine.patch_model: nearest good patch, fitted on the OK images; the default)
    # or "resnet18" (engine.model: the assignment's classifier, trained by gradient descent).
    arch: str = "patch_memory"
    # What the network sees (becomes model.json's preprocess section).
    input_size: tuple[int, int] = (160, 500)  # (height, width): the 320×1000 pose crop at half resolution
    pose: bool = True  # pose-normalised crop (engine.pose) before CLAHE; False = the whole frame
    pose_params: dict[str, Any] = field(default_factory=dict)  # overrides of engine.pose.PoseParams
    clahe_clip_limit: float = 2.0
    clahe_tile_grid: tuple[int, int] = (8, 8)
    interpolation: str = "area"
    # Optimisation.
    epochs: int = 40
    batch_size: int = 16
    lr: float = 1e-3  # from scratch; the recipe's 1e-5 is a fine-tuning rate for pretrained weights
    weight_decay: float = 1e-4
    weights: str = "none"  # none | imagenet | PATH
    balance: str = "sampler"  # sampler (class-balanced draws with replacement) | pos_weight
    select: str = "auroc"  # checkpoint/early-stopping metric on val: auroc | balanced_loss
    patience: int = 12  # early stopping: epochs without a better selection metric
    lr_patience: int = 4  # ReduceLROnPlateau on the selection metric
    lr_factor: float = 0.3
    min_lr: float = 1e-6
    max_minutes: float = 28.0  # wall-clock budget; training stops (keeping the best checkpoint) when spent
    threads: int = 0  # torch intra-op threads; 0 = all cores (per process under torchrun)
    seed: int = 0
    # Split (made once, saved as split.json in the run directory).
    split: tuple[float, float, float] = (0.8, 0.1, 0.1)
    folds: int = 0  # ≥ 2: k-fold, the test part is fold ``fold``
    fold: int = 0
    # Calibration (training.calibrate) on the validation split, plus the patch memory's unseen training images.
    target_recall: float = 1.0  # NG recall kept by model and gauges together
    # Re-inspection budget: grey zone up to T2, the lowest threshold that scraps at most this share of the
    # calibration OK parts automatically (the gauges' rejects counted first); None = no grey zone.
    grey_zone_frr: float | None = None
    # False-reject budget: when the recall target's threshold rejects fewer calibration OK parts than this share,
    # lower it to the budget (a safety margin below the weakest calibration NG); None = the recall threshold.
    frr_budget: float | None = None
    # Gauges (training.gauge_fit): tolerance bands on the pose measurements, learnt from the training split's OK
    # parts, calibrated as one decision with the model's threshold and packaged with it by export. Only with the
    # pose crop (the measurements come from the pose it estimates): ``pose=False`` learns none.
    gauges: bool = True
    # The gauges' margins in the score (engine.gauges.Margins): each band's measurement adds ``weight`` logit per
    # robust s.d. beyond ``k`` of the training OK parts' median, before the threshold is calibrated; {} = the
    # defaults (k 4, weight 0.25), None = the model's logit alone. Only with gauges.
    gauge_margins: dict[str, float] | None = None
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    # Patch memory only (training/patch_memory.py): patch side and stride (input pixels), principal
    # components kept, neighbour search window ± (rows, columns) of grid cells, scored cells.
    patch_size: int = 16
    patch_stride: int = 8
    patch_dims: int = 32
    patch_window: tuple[int, int] = (1, 2)
    patch_mask_share: float = 0.6  # score only cells covered by more than this share of the good parts
    patch_top_k: int = 4  # score = mean of this many largest cell z-scores
    patch_axial_phases: int = 2  # memory copies moved along the axis by 1/phases of a stride (thread phase)
    patch_spread_quantile: float = 0.0  # > 0: each cell's good spread from this upper quantile, not the sd
    patch_sd_pool: int = 1  # a cell's good spread is at least its neighbours' within this odd window
    patch_residual: bool = False  # add each patch's norm outside the kept components as a feature
    # Several memories fused into one (engine.patch_model.PatchEnsemble), each on its own region of the input:
    # "region" [top, bottom, left, right] as fractions of the input (default the whole), "pool" its block
    # averaging (2 = half resolution), and any training.patch_memory.PatchSettings name (patch, stride, dims,
    # residual, …) overriding the settings above for that member. () = one memory with the settings above.
    patch_members: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        checks = {
            "arch": self.arch in ARCHS,
            "patch_size": self.patch_size >= 2,
            "patch_stride": 1 <= self.patch_stride <= self.patch_size,
            "patch_dims": 1 <= self.patch_dims <= self.patch_size**2,
            "patch_window": min(self.patch_window) >= 0,
            "patch_mask_share": 0.0 <= self.patch_mask_share < 1.0,
            "patch_top_k": self.patch_top_k >= 1,
            "patch_axial_phases": 1 <= self.patch_axial_phases <= self.patch_stride,
            "epochs": self.epochs >= 1,
            "batch_size": self.batch_size >= 2,  # BatchNorm needs ≥ 2 samples per batch in training
            "lr": self.lr > 0,
            "weight_decay": self.weight_decay >= 0,
            "balance": self.balance in ("sampler", "pos_weight"),
            "select": self.select in ("auroc", "balanced_loss"),
            "patience": self.patience >= 1,
            "max_minutes": self.max_minutes > 0,
            "target_recall": 0 < self.target_recall <= 1,
            "grey_zone_frr": self.grey_zone_frr is None or 0 <= self.grey_zone_frr < 1,
            "frr_budget": self.frr_budget is None or 0 <= self.frr_budget < 1,
            "gauges": isinstance(self.gauges, bool),
            "gauge_margins": self.gauge_margins is None or _margins_fit(self.gauge_margins),
            "folds": self.folds == 0 or (self.folds >= 2 and 0 <= self.fold < self.folds),
            "patch_members": all(_member_fits(m) for m in self.patch_members),
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"invalid training option(s) {bad}: {[getattr(self, k) for k in bad]}")
        self.preprocess()  # validates input_size, CLAHE, interpolation and pose parameters

    @property
    def gauged(self) -> bool:
        """Whether a run learns gauge bands: asked for, and measured by the pose crop."""
        return self.gauges and self.pose

    def preprocess(self) -> PreprocessParams:
        pose = None
        if self.pose:
            from engine.pose import PoseParams

            pose = PoseParams.from_dict(dict(self.pose_params)).to_dict()
        return PreprocessParams(
            input_size=self.input_size,
            clahe_clip_limit=self.clahe_clip_limit,
            clahe_tile_grid=self.clahe_tile_grid,
            interpolation=self.interpolation,
            pose=pose,
        )

    def patch_members_settings(self) -> list[Any]:
        """One training.patch_memory.PatchSettings per member (``patch_members``; one when it is empty)."""
        from training.patch_memory import PatchSettings

        base = self.patch_settings()
        known = ({f.name for f in fields(PatchSettings)} - {"view"}) | {"region", "pool"}
        h, w = self.input_size
        out = []
        for i, member in enumerate(self.patch_members or ({},)):
            unknown = sorted(set(member) - known)
            if unknown:
                raise ValueError(f"patch_members[{i}]: unknown setting(s) {unknown}; known: {sorted(known)}")
            kw = {
                k: tuple(tuple(e) if isinstance(e, list) else e for e in v) if isinstance(v, list) else v
                for k, v in member.items()
                if k not in REGION and k != "align"
            }
            view = None
            t, b, left, r = member.get("region", (0.0, 1.0, 0.0, 1.0))
            pool = int(member.get("pool", 1))
            if any(k in member for k in REGION):
                view = (round(t * h), round(b * h), round(left * w), round(r * w), pool)
            if member.get("align") is not None:
                # (first, last, max_shift) as fractions of the member's view width → view pixels
                a = member["align"]
                if not isinstance(a, (list, tuple)) or len(a) != 3:
                    raise ValueError(f"patch_members[{i}].align must be [first, last, max_shift] (fractions)")
                vw = (round(r * w) - round(left * w)) // pool
                kw["align"] = tuple(max(1, round(float(f) * vw)) for f in a)
            out.append(replace(base, view=view, **kw))
        return out

    def patch_settings(self) -> Any:
        """training.patch_memory.PatchSettings from the ``patch_*`` options."""
        from training.patch_memory import PatchSettings

        return PatchSettings(
            patch=self.patch_size,
            stride=self.patch_stride,
            dims=self.patch_dims,
            window=self.patch_window,
            mask_share=self.patch_mask_share,
            top_k=self.patch_top_k,
            axial_phases=self.patch_axial_phases,
            residual=self.patch_residual,
            sd_pool=self.patch_sd_pool,
            spread_quantile=self.patch_spread_quantile,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["augment"] = self.augment.to_dict()
        for k in ("input_size", "clahe_tile_grid", "split", "patch_window"):
            d[k] = list(d[k])
        return d

    @classmethod
    def from_saved(cls, d: dict[str, Any]) -> TrainConfig:
        """A run's own saved config (config.json, run.json). Runs saved before ``arch`` existed were all
        ResNet18, and runs saved before ``gauges`` existed learnt none, so a missing key means that, not today's
        default."""
        return cls.from_dict({"arch": "resnet18", "gauges": False, **d})

    @classmethod
    def from_dict(cls, d: dict[str, Any], base: TrainConfig | None = None) -> TrainConfig:
        """``base`` updated by ``d``; nested ``augment`` keys update the base's augmentation."""
        base = base or cls()
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown training option(s) {unknown}; known: {sorted(known)}")
        kw: dict[str, Any] = {}
        for k, v in d.items():
            if k == "augment":
                kw[k] = AugmentConfig.from_dict({**base.augment.to_dict(), **v})
            elif k in ("input_size", "clahe_tile_grid", "patch_window"):
                kw[k] = (int(v[0]), int(v[1])) if isinstance(v, list | tuple) else (int(v), int(v))
            elif k == "split":
                kw[k] = (float(v[0]), float(v[1]), float(v[2]))
            elif k == "patch_members":
                kw[k] = tuple(dict(m) for m in v)
            else:
                kw[k] = v
        return replace(base, **kw)


def _margins_fit(m: Any) -> bool:
    """``gauge_margins``: a dict of at most ``k`` (≥ 0) and ``weight`` (> 0), numbers."""
    if not isinstance(m, dict) or not set(m) <= {"k", "weight"}:
        return False
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in m.values()):
        return False
    return float(m.get("k", 0.0)) >= 0 and float(m.get("weight", 1.0)) > 0


REGION = ("region", "pool")  # a member's region of the input (fractions) and its block averaging


def _member_fits(member: Any) -> bool:
    """A ``patch_members`` entry: a dict whose region (if any) is 0 ≤ top < bottom ≤ 1, 0 ≤ left < right ≤ 1,
    whose pool is an integer ≥ 1 and whose contrast (if any) is 0 or an odd number of cells (the other keys
    are checked against PatchSettings when fitting)."""
    if not isinstance(member, dict):
        return False
    contrast = member.get("contrast", 0)
    if not isinstance(contrast, int) or contrast < 0 or (contrast > 0 and contrast % 2 == 0):
        return False
    region = member.get("region", (0.0, 1.0, 0.0, 1.0))
    pool = member.get("pool", 1)
    if not isinstance(region, list | tuple) or len(region) != 4:
        return False
    t, b, left, r = (float(v) for v in region)
    return 0.0 <= t < b <= 1.0 and 0.0 <= left < r <= 1.0 and isinstance(pool, int) and pool >= 1


# The assignment's recipe as written (trained from scratch): whole frame, 256², ±10° rotation, flips.
RECIPE = TrainConfig(
    arch="resnet18",
    input_size=(256, 256),
    pose=False,
    augment=AugmentConfig(hflip=0.5, vflip=0.5, rotate_deg=10.0),
)
# Pose-normalised crop: the screw's axis horizontal, head left. Only mirrors across the axis, a little
# rotation and perpendicular shift; no shift along the axis (it would hide a shortened tip), mild brightness.
# The background options (background, background_swap) stay off: measured on 3-fold splits of screws-300 they
# removed the models' use of the background but lowered AUROC even with the background neutralised
# (docs/training.md, "Measured on screws-300").
CNN = TrainConfig(
    arch="resnet18",
    input_size=(144, 448),
    pose=True,
    augment=AugmentConfig(hflip=0.0, vflip=0.5, rotate_deg=3.0, shift_y=0.03, brightness=10.0, contrast=0.1),
)
# The default: three patch memories on the full-resolution pose crop (320×1000), fused: one on the whole crop at
# half resolution, one on the thread band at full resolution (where `thread_side` damage is a few pixels), one on
# the head and neck at full resolution, each with the residual-norm feature, the pooled per-cell spread and a
# 100-patch coreset per cell drawn from the good crops and their ± 0.5° turned copies; the whole crop and the head
# with a ±1 cell search, the thread band registered to a reference thread phase, in 8-pixel patches, searched ±1
# row only. Chosen on repeated stratified 5-fold of screws-300 (python -m training.variants; docs/training.md
# section 9): it ranks NG above OK far better than either ResNet18 preset, needs no NG images to fit and fits in
# a few minutes.
# Every member's bank also holds each good crop turned ± 0.5° about the crop's centre (its ends move ± 4 px): the
# pose crop's own residual error, which a good part's thread crests and collar would otherwise score as damage.
PATCH_MEMBER: dict[str, Any] = {"bank_size": 100, "jitter": [[0.5, 0.0], [-0.5, 0.0]]}
THREAD_ALIGNED: dict[str, Any] = {
    "patch": 8,
    "stride": 4,
    "dims": 16,
    "window": [1, 0],
    "align": [0.107, 0.821, 0.0607],
}
PATCH = TrainConfig(
    input_size=(320, 1000),
    # The calibration spends a 4 % false-reject budget on a margin below the weakest calibration NG: over 30
    # folds of screws-300, held-out NG recall at the calibrated thresholds 0.977 → 0.997, FRR 0.037 → 0.042.
    frr_budget=0.04,
    # The gauges' margins in the score (k 4 robust s.d., 0.25 logit per s.d. beyond): over 30 folds of
    # screws-300, AUROC per fold 0.992 → 0.996, FRR at NG recall 1.0 with the gauges 0.044 → 0.039.
    gauge_margins={},
    patch_window=(1, 1),  # ± 1 column: as good as ± 2 on screws-300 with the thread band, a third cheaper
    patch_sd_pool=3,
    patch_residual=True,
    patch_members=(
        {"pool": 2, **PATCH_MEMBER},  # the whole crop at half resolution
        # The thread band, tip end, at full resolution, registered to a reference thread phase (on its columns
        # 0.107–0.821, within ± 0.0607 of its width: about half a pitch) and coded in 8-pixel patches.
        {"region": [0.15, 0.85, 0.44, 1.0], **PATCH_MEMBER, **THREAD_ALIGNED},
        # The head and neck at full resolution: scratches on the head and neck are thin lines the half
        # resolution blurs. Its score is the mean of its 32 hottest cells, not 4: a head or neck scrape spans
        # tens of its cells, while a good part's odd cell (a glint, a speck in the recess) is alone.
        {"region": [0.0, 1.0, 0.0, 0.32], **PATCH_MEMBER, "top_k": 32},
    ),
)
PRESETS: dict[str, TrainConfig] = {
    "default": PATCH,
    "patch": PATCH,
    "cnn": CNN,
    "pose": CNN,
    "recipe": RECIPE,
}


def load_config_file(path: str | Path, base: TrainConfig) -> TrainConfig:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
        data = tomllib.loads(text) if p.suffix.lower() == ".toml" else json.loads(text)
    except (OSError, ValueError) as exc:
        raise ValueError(f"--config {p}: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {p} must hold an object of training options")
    return TrainConfig.from_dict(data, base)
