"""Typed experiment configuration: dataclasses that map one-to-one to YAML.

* Unknown keys and wrong types are errors naming the key, the value found and the valid keys.
* ``--set a.b=value`` overrides use YAML syntax for the value (``--set train.lr=1e-4``,
  ``--set model.adapt_layers=[6,9]``).
* ``Literal`` fields list their valid values; nested sections are dataclasses.

This module imports nothing of ours. Sections: :class:`DataConfig`, :class:`ModelConfig` (with its
:class:`BackboneConfig`, :class:`AdapterConfig`, :class:`PreprocessConfig`, :class:`DynUNetConfig`),
:class:`TrainConfig` (with :class:`DynUNetTrainConfig`),
all under :class:`ExperimentConfig`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import difflib
import math
import os
import reprlib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin, get_type_hints

import yaml

T = TypeVar("T")

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


MAX_SHOWN_CHARS = 200
"""Values quoted in error messages are shortened to about this many characters."""

_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = MAX_SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 12
_REPR.maxlevel = 4


def shorten(value: Any) -> str:
    """``repr(value)`` for an error message, shortened to about :data:`MAX_SHOWN_CHARS` characters
    without ever building the full text (a value can be huge: a long string, a deeply nested list)."""
    text = _REPR.repr(value)
    if len(text) > MAX_SHOWN_CHARS + 20:
        text = text[:MAX_SHOWN_CHARS] + "…"
    return text


# --------------------------------------------------------------------------------------------
# Sections
# --------------------------------------------------------------------------------------------


@dataclass
class PreprocessConfig:
    """Intensity and geometry preprocessing; saved with the model so inference matches training."""

    modality: Literal["ct", "mr"] = "ct"
    ct_window: tuple[float, float] = (-125.0, 275.0)
    """CT window in HU, mapped to [0, 1]."""
    mr_percentiles: tuple[float, float] = (0.5, 99.5)
    """MR: per-volume percentile clip, mapped to [0, 1]."""
    orientation: Literal["RAS"] = "RAS"
    """Canonical frame: axial slices along the last axis, from inferior to superior."""
    image_size: int = 352
    """Slices are padded to square, then resized to this size."""
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    background_threshold: float = 0.5
    """A voxel is background unless some organ's probability reaches this value."""


@dataclass
class BackboneConfig:
    """Where the CLIPSeg backbone comes from.

    ``source`` is a hub id or a local directory holding a ``CLIPSegForImageSegmentation``
    checkpoint, or ``random`` to build the architecture named by ``preset`` with random weights
    (offline: ``tgated info``, benchmarks, tests and the demo). The ``tiny`` preset's sizes can be
    changed with the fields below; ``rd64`` is CIDAS/clipseg-rd64-refined's architecture.
    """

    source: str = "CIDAS/clipseg-rd64-refined"
    preset: Literal["rd64", "tiny"] = "rd64"
    hidden_size: int = 64
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    intermediate_size: int = 128
    text_hidden_size: int = 32
    text_num_hidden_layers: int = 2
    projection_dim: int = 32
    extract_layers: list[int] = field(default_factory=lambda: [1, 2, 3])
    reduce_dim: int = 16
    patch_size: int = 16
    """``tiny`` preset: vision patch size in pixels (16 as CLIPSeg; 8 gives a 4× finer token grid for
    small inputs such as the demo's 96-128 pixel slices)."""
    image_size: int = 0
    """``tiny`` preset: side of the vision position grid in pixels (0 = the model input size);
    a different size is interpolated, as rd64 interpolates its 224-pixel grid to 352."""
    seed: int = 0
    """Seed for random weights (``source: random``)."""


@dataclass
class AdapterConfig:
    """Sizes of the T-Gated adapter (docs/architecture.md, Model); defaults reproduce the published adapter."""

    dim: int = 256
    layers: int = 4
    heads: int = 8
    ffn_dim: int = 1024
    dropout: float = 0.1
    drop_path: float = 0.1
    """Stochastic depth of the temporal layers, linearly 0 -> drop_path."""
    spatial_heads: int = 8
    spatial_dropout: float = 0.1
    spatial_drop_path: float = 0.05
    head_dropout: float = 0.1
    head_out_dropout: float = 0.05
    gate_bias_init: float = -5.0
    gate_reg: float = 1e-3
    """Weight λ of the gate regulariser λ·mean(σ(b)(1−σ(b)))."""
    temporal_out_init: Literal["zero", "normal"] = "zero"
    """Initialisation of the temporal branch's output projection: ``zero`` (the temporal output
    starts at 0, so adapted tokens equal the centre tokens up to the gate's σ(b)) or ``normal``
    (PyTorch's default fan-in init, as the published code: the gate's weights get a gradient from
    step 0, and the adapted tokens still stay within a few σ(b) of the centre tokens)."""
    spatial_out_init: Literal["zero", "normal"] = "zero"
    """Initialisation of the spatial block's two output projections (attention and MLP): ``zero``
    (the block starts as the identity) or ``normal`` (PyTorch's default, as the published code)."""
    attention_init: Literal["linear", "xavier"] = "linear"
    """Initialisation of the adapter's attention projections (temporal and spatial): ``linear``
    (``nn.Linear``'s default for q/k/v and the output) or ``xavier`` (``nn.MultiheadAttention``'s,
    as the published code: Xavier-uniform q/k/v weights, zero q/k/v and output biases)."""


@dataclass
class DynUNetConfig:
    """The 3-D DynUNet baseline (``model.model_type: dynunet``, MONAI's ``DynUNet``); the defaults are
    the published baseline's recipe (docs/protocol.md)."""

    spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)
    """Volumes are resampled to this voxel size (mm) for the network, predictions back to the native grid."""
    patch_size: tuple[int, int, int] = (96, 96, 96)
    """Training patches and sliding-window tiles (voxels)."""
    filters: list[int] = field(default_factory=list)
    """Channels per resolution level (empty = MONAI's default, 32·2^level up to 320); the number of
    levels follows from ``patch_size`` and ``spacing`` (strides halve each axis until it is 8 or less)."""
    res_block: bool = True
    norm: Literal["instance", "batch"] = "instance"
    """``instance`` (per patch: DDP with N processes matches one process) or ``batch`` (statistics over
    the batch: under DDP they are made global with ``SyncBatchNorm``, which needs CUDA)."""
    deep_supervision: bool = True
    deep_supr_num: int = 2
    """Deep-supervision heads (loss weights 1, 1/2, 1/4 ..., normalised to sum to 1)."""
    crop_foreground: bool = True
    """Crop each volume to its foreground (normalised intensity > 0) before patching and inference."""
    sw_overlap: float = 0.5
    """Sliding-window inference: overlap of neighbouring tiles (Gaussian weighting)."""
    sw_batch_size: int = 2
    """Sliding-window inference: tiles per forward pass."""


@dataclass
class ModelConfig:
    model_type: Literal["tgated", "dynunet"] = "tgated"
    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    adapter: Literal["tgated", "none"] = "tgated"
    """``none`` is the baseline: CLIPSeg fine-tuned on single slices."""
    variant: Literal["standard", "reference"] = "standard"
    """``reference`` reproduces the published wiring (final encoder layer only into the decoder)."""
    context: int = 5
    """Slices per window K (odd); 1 keeps the adapter without neighbours."""
    context_mode: Literal["index", "physical"] = "index"
    context_step_mm: float = 3.0
    """Spacing of neighbours in ``physical`` mode."""
    temporal: bool = True
    spatial: bool = True
    gate: bool = True
    adapt_layers: list[int] = field(default_factory=lambda: [9])
    """Which extracted encoder layers are adapted; the decoder still reads all of them."""
    train_backbone: bool = False
    """Fine-tune the CLIP vision tower at ``train.lr_backbone`` (false: frozen, its tokens can be cached)."""
    train_text: bool = False
    """Fine-tune the CLIP text transformer at ``train.lr_text`` (``conditioning: text`` only), as the
    published code does; its output projection stays frozen (the published code leaves it out of its
    optimizer). False: frozen, each prompt's embedding computed once and cached."""
    conditioning: Literal["auto", "text", "learned"] = "auto"
    """How the decoder is told which organ to segment: ``text`` = the text tower's prompt
    embedding (the paper; frozen unless ``train_text``); ``learned`` = a trainable embedding per organ, initialised from the text
    embeddings, or orthogonally when the backbone is random (a random text tower maps every prompt to
    nearly the same vector); ``auto`` = ``learned`` for ``backbone.source: random``, else ``text``.
    A saved model records the resolved value."""
    init_from: str = ""
    """A saved T-Gated model (model folder or run folder) whose backbone, decoder and organ
    conditioning initialise this model; its adapters start fresh. Empty = ``backbone.source``."""
    adapter_config: AdapterConfig = field(default_factory=AdapterConfig)
    organs: list[str] = field(default_factory=list)
    """Organs the model segments (empty = all 13)."""
    prompts: dict[str, str] = field(default_factory=dict)
    """Prompt overrides by organ name (default: organs.py)."""
    preprocess: PreprocessConfig = field(default_factory=PreprocessConfig)
    dynunet: DynUNetConfig = field(default_factory=DynUNetConfig)
    """Architecture and grid of ``model_type: dynunet`` (unused by T-Gated)."""


@dataclass
class DataConfig:
    root: str = ""
    """Dataset root folder (layout below)."""
    layout: Literal["flare22", "btcv", "amos", "nnunet", "totalseg", "folder"] = "flare22"
    """A name of :data:`tgated.data.layouts.LAYOUTS` (config.py imports nothing of ours, so the names
    are repeated here; a test checks that they equal the registry)."""
    labels: str = ""
    """Label folder for the ``folder`` layout (default: ``ROOT/labels``)."""
    totalseg_task: Literal["", "total", "total_mr"] = ""
    splits: str = ""
    """A ``splits.json`` to use instead of the default split."""
    split_seed: int = 42
    split_sizes: tuple[int, int, int] = (30, 10, 10)
    """Train / val / test case counts of the default split (scaled down for smaller datasets)."""


@dataclass
class DynUNetTrainConfig:
    """Training settings of ``model.model_type: dynunet`` (the published baseline's recipe); the
    schedule (``warm_restart_epochs``, ``min_lr_ratio``), ``batch_size``, ``epochs``, ``grad_clip``,
    ``precision``, ``weight_decay`` and ``seed`` come from the ``train`` section as for T-Gated."""

    lr: float = 1e-3
    """AdamW learning rate of the whole network."""
    samples_per_volume: int = 2
    """Patches drawn from each training volume per epoch."""
    pos_neg_ratio: float = 1.0
    """Patches centred on an organ voxel vs on background (MONAI ``RandCropByPosNegLabeld``, pos/neg)."""
    flip_prob: float = 0.1
    """Probability of a flip along each axis (the published recipe flips all three, labels unchanged)."""
    rotate90_prob: float = 0.1
    """Probability of an axial rotation by 90°, 180° or 270°."""
    deep_supervision_weights: list[float] = field(default_factory=list)
    """Loss weights of the full-resolution output and of each deep-supervision head (1 +
    ``model.dynunet.deep_supr_num`` values, used as given); empty = 1, 1/2, 1/4 ... normalised to sum
    to 1. The published baseline uses [0.5333, 0.2667, 0.2]."""
    dice_background: bool = True
    """Include the background channel in DiceCE's Dice term (MONAI ``include_background``; the
    cross-entropy always covers every class). The published baseline leaves it out."""


@dataclass
class TrainConfig:
    """Training recipe (``tgated train``; see :mod:`tgated.training`)."""

    epochs: int = 50
    steps_per_epoch: int = 0
    """Optimizer steps per epoch; 0 = one pass over the sampled training slices per epoch."""
    batch_size: int = 8
    """Samples per forward pass, summed over all processes (each of N processes takes
    ``batch_size / N``), so a run's result does not depend on the number of processes."""
    grad_accum: int = 1
    """Forward passes per optimizer step (effective batch ``batch_size × grad_accum``)."""
    lr_adapter: float = 1e-4
    lr_decoder: float = 1e-4
    lr_backbone: float = 1e-6
    """Learning rate of the CLIP vision tower (used with ``model.train_backbone: true``)."""
    lr_text: float = 1e-6
    """Learning rate of the CLIP text transformer (used with ``model.train_text: true``)."""
    lr_conditioning: float = 1e-4
    """Learning rate of the learned organ embeddings (``model.conditioning: learned``)."""
    weight_decay: float = 1e-4
    warm_restart_epochs: int = 10
    """Cosine schedule with warm restarts: length of each cycle in epochs."""
    schedule_step: Literal["step", "epoch"] = "step"
    """When the schedule moves: ``step`` = after every optimizer step (a smooth cosine within each
    epoch), ``epoch`` = once per epoch, the rate constant within an epoch (PyTorch's
    ``CosineAnnealingWarmRestarts`` stepped at epoch ends, as the published code)."""
    min_lr: float = 0.0
    """Lowest learning rate of a cycle, absolute and shared by every group (PyTorch's ``eta_min``;
    the published code uses 1e-7). A group's lowest rate is ``min_lr + min_lr_ratio · (lr − min_lr)``."""
    min_lr_ratio: float = 0.01
    """Lowest learning rate of a cycle as a fraction of the way from ``min_lr`` to the group's rate
    (with ``min_lr: 0``: a fraction of the group's rate)."""
    grad_clip: float = 1.0
    """Clip the global gradient norm to this value (0 = no clipping)."""
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    """auto = bf16 on CUDA where supported, else fp16 on CUDA, fp32 on CPU."""
    negative_fraction: float = 0.1
    """Share of negative samples among each epoch's draws (an empty target for the sample's organ)."""
    negatives: Literal["organ_absent", "label_free"] = "organ_absent"
    """Which (slice, organ) pairs are negatives: ``organ_absent`` = the organ is labelled by the
    dataset but absent from the slice (every prompt learns "not here"); ``label_free`` = slices
    without any labelled voxel, paired with organs in proportion to their weighted positive counts
    (the published code's negatives)."""
    organ_weights: dict[str, float] = field(
        default_factory=lambda: {
            "right_adrenal_gland": 8.0,
            "left_adrenal_gland": 8.0,
            "esophagus": 8.0,
            "duodenum": 5.0,
            "pancreas": 3.0,
            "stomach": 2.0,
            "gallbladder": 2.0,
        }
    )
    """Sampling weights of small organs (the reference recipe); others weigh 1."""
    augment: bool = True
    flip_lr: float = 0.0
    """Probability of a left-right flip of a sample (window and mask)."""
    flip_lateral: Literal["swap", "skip"] = "swap"
    """What a flip does to a sample of a lateral organ (kidneys, adrenal glands): ``swap`` = its
    target becomes its partner's mirrored mask ("right kidney" is the flipped left kidney); ``skip``
    = it is never flipped, only organs without a side are (the published rule)."""
    rotate_deg: float = 10.0
    """Rotations drawn uniformly in ±rotate_deg degrees."""
    scale: float = 0.1
    """Zoom drawn uniformly in [1 − scale, 1 + scale]."""
    intensity: float = 0.1
    """Contrast and brightness jitter: ``x · (1 + a) + b`` with a, b uniform in ±intensity."""
    dice_weight: float = 1.0
    bce_weight: float = 1.0
    bce_pos_weight: float = 1.0
    """Weight of the organ's pixels in the BCE term (PyTorch's ``pos_weight``; 1 = plain BCE). An
    organ covers about 1 % of a slice: with plain BCE the background's pull drives the logits of
    small organs to about −14 everywhere early in training from a random backbone, and the organ
    never comes back (its Dice gradient vanishes in the saturated sigmoid); see docs/evidence.md."""
    dice_smooth: float = 1.0
    """Smoothing ``s`` of the soft Dice ``(2 Σ p·t + s) / (Σ p + Σ t + s)`` per sample: 1 (ours) lets
    a negative sample predicted empty cost nothing; the published code uses MONAI ``DiceLoss``'s 1e-5,
    with which every negative sample costs a Dice loss of about 1."""
    cache_tokens: Literal["auto", "off", "memory", "disk"] = "auto"
    """Cache vision tokens when the backbone is frozen (turns image-space augmentation off)."""
    cache_max_gb: float = 8.0
    val_every: int = 1
    """Validate every N epochs (3-D Dice on the validation volumes) and after the last epoch."""
    val_max_cases: int = 0
    """0 = all validation cases."""
    val_context_ablation: bool = True
    """Models with context (K > 1) are also validated with every window's neighbours replaced by its
    centre slice (``val_dice_centre_only`` in ``log.csv``): the difference is what context adds."""
    num_workers: int | Literal["auto"] = "auto"
    """Processes that draw and augment the training batches while the model computes, per training
    process (0 = in the training process itself). ``auto``: on CUDA, the CPU cores this process may
    use (shared among the processes of a multi-GPU run on this machine) less one for the training
    process, at most 8; on the CPU 0, where workers would only take cores from the computation.
    The batches do not depend on it (each sample's randomness comes from its seed, epoch and index),
    so it may change on resume."""
    seed: int = 0
    tensorboard: bool = False
    device: str = "auto"
    checkpoint_every: int = 0
    """Also write ``RUN/checkpoints/last.pt`` every N optimizer steps (0 = at epoch ends only)."""
    max_steps: int = 0
    """Stop after this many optimizer steps in total, with a checkpoint (0 = no limit); continue with
    ``--resume`` and a larger (or zero) value."""
    dynunet: DynUNetTrainConfig = field(default_factory=DynUNetTrainConfig)
    """Settings that only ``model.model_type: dynunet`` uses."""


@dataclass
class PretrainConfig:
    """How the model named by ``model.init_from`` is made when it does not exist yet.

    ``tgated train`` then first trains this same config with ``overrides`` applied (``key=value``
    strings as ``--set``; typically ``model.adapter=none``, ``model.train_backbone=true`` and a
    schedule) into the run folder ``model.init_from``, and initialises from it. Several runs naming
    the same folder share one stage-1 model. Empty ``overrides``: nothing is trained, and a missing
    ``model.init_from`` is an error."""

    overrides: list[str] = field(default_factory=list)


@dataclass
class ExperimentConfig:
    name: str = "experiment"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)


# --------------------------------------------------------------------------------------------
# model config validation
# --------------------------------------------------------------------------------------------

MAX_IMAGE_SIZE = 2048
"""Largest model input size in pixels (CLIPSeg uses 352; memory grows with its fourth power)."""
MAX_CONTEXT = 63
"""Most slices per window."""
_MAX_WIDTH, _MAX_LAYERS, _MAX_HEADS = 8192, 64, 128


def _finite(values: Any) -> bool:
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


ADAPTER_DROPOUT_KEYS = (
    "dropout",
    "drop_path",
    "spatial_dropout",
    "spatial_drop_path",
    "head_dropout",
    "head_out_dropout",
)
"""The adapter's dropout and stochastic-depth rates (``model.adapter_config``), each in [0, 1)."""


def model_config_problems(cfg: ModelConfig, *, width: int | None = None, saved: bool = False) -> list[str]:
    """What is wrong with a model config, one ``model.KEY=VALUE: expected ...`` text per violation.

    Checks values that type checking lets through but that give garbage or a crash later: windows
    that are finite and ordered, positive normalisation std, organs unique (and, for a ``saved``
    model, listed), sizes within reason, attention heads dividing their width (``width``: the
    backbone's, when known), an odd context. Architecture checks that need the backbone itself
    (patch size, extract layers) happen when the model is built.
    """
    out: list[str] = []

    def need(ok: bool, key: str, value: Any, expected: str) -> None:
        if not ok:
            out.append(f"model.{key}={shorten(value)}: expected {expected}")

    def size(key: str, value: int, low: int, high: int, what: str = "") -> None:
        need(low <= value <= high, key, value, f"{what or 'an integer'} in {low}..{high}")

    p = cfg.preprocess
    lo, hi = p.ct_window
    need(
        _finite(p.ct_window) and lo < hi,
        "preprocess.ct_window",
        list(p.ct_window),
        "two finite HU values [low, high] with low < high, e.g. [-125, 275]",
    )
    lo, hi = p.mr_percentiles
    need(
        _finite(p.mr_percentiles) and 0 <= lo < hi <= 100,
        "preprocess.mr_percentiles",
        list(p.mr_percentiles),
        "two percentiles [low, high] with 0 <= low < high <= 100, e.g. [0.5, 99.5]",
    )
    size("preprocess.image_size", p.image_size, 16, MAX_IMAGE_SIZE, "an input size in pixels (CLIPSeg: 352)")
    need(_finite(p.mean), "preprocess.mean", list(p.mean), "three finite numbers, e.g. the CLIP mean")
    need(
        _finite(p.std) and all(v > 0 for v in p.std),
        "preprocess.std",
        list(p.std),
        f"three positive numbers, e.g. the CLIP std {list(CLIP_STD)}",
    )
    t = p.background_threshold
    need(
        _finite([t]) and 0 < t < 1, "preprocess.background_threshold", t, "a probability in (0, 1), e.g. 0.5"
    )

    need(
        cfg.context >= 1 and cfg.context % 2 == 1 and cfg.context <= MAX_CONTEXT,
        "context",
        cfg.context,
        f"an odd number of slices in 1..{MAX_CONTEXT} (1, 3, 5, ...)",
    )
    need(
        _finite([cfg.context_step_mm]) and cfg.context_step_mm > 0,
        "context_step_mm",
        cfg.context_step_mm,
        "a positive distance in mm",
    )
    if cfg.adapter != "none":
        layers = cfg.adapt_layers
        need(
            bool(layers) and len(set(layers)) == len(layers) and min(layers, default=0) >= 0,
            "adapt_layers",
            layers,
            "one or more distinct encoder layer indices >= 0",
        )

    names = [str(o).strip().lower().replace(" ", "_").replace("-", "_") for o in cfg.organs]
    dupes = sorted({n for n in names if names.count(n) > 1})
    need(not dupes, "organs", cfg.organs, f"each organ once (repeated: {', '.join(dupes)})")
    need(all(names), "organs", cfg.organs, "organ names (no empty entries)")
    if saved:
        need(
            bool(cfg.organs),
            "organs",
            cfg.organs,
            "the organs the model was trained for (a saved model lists them; an empty list would segment "
            "all 13, including organs it never learned)",
        )
    for organ, prompt in cfg.prompts.items():
        need(bool(str(prompt).strip()), f"prompts.{organ}", prompt, "a non-empty text prompt")

    a = cfg.adapter_config
    size("adapter_config.dim", a.dim, 1, _MAX_WIDTH)
    size("adapter_config.layers", a.layers, 1, _MAX_LAYERS)
    size("adapter_config.heads", a.heads, 1, _MAX_HEADS)
    need(
        a.heads < 1 or a.dim % a.heads == 0,
        "adapter_config.heads",
        a.heads,
        f"a divisor of adapter_config.dim={a.dim} (e.g. {_divisor_near(a.dim, a.heads)})",
    )
    size("adapter_config.ffn_dim", a.ffn_dim, 1, 4 * _MAX_WIDTH)
    size("adapter_config.spatial_heads", a.spatial_heads, 1, _MAX_HEADS)
    if width is not None and a.spatial_heads >= 1:
        need(
            width % a.spatial_heads == 0,
            "adapter_config.spatial_heads",
            a.spatial_heads,
            f"a divisor of the backbone width {width} (e.g. {_divisor_near(width, a.spatial_heads)})",
        )
    for key in ADAPTER_DROPOUT_KEYS:
        v = getattr(a, key)
        need(_finite([v]) and 0 <= v < 1, f"adapter_config.{key}", v, "a probability in [0, 1)")
    need(_finite([a.gate_bias_init]), "adapter_config.gate_bias_init", a.gate_bias_init, "a finite number")
    need(
        _finite([a.gate_reg]) and a.gate_reg >= 0,
        "adapter_config.gate_reg",
        a.gate_reg,
        "a finite number >= 0",
    )

    b = cfg.backbone
    if b.source == "random" and b.preset == "tiny":
        for key in ("hidden_size", "text_hidden_size", "projection_dim", "reduce_dim"):
            size(f"backbone.{key}", getattr(b, key), 1, _MAX_WIDTH)
        size("backbone.intermediate_size", b.intermediate_size, 1, 4 * _MAX_WIDTH)
        for key in ("num_hidden_layers", "text_num_hidden_layers"):
            size(f"backbone.{key}", getattr(b, key), 1, _MAX_LAYERS)
        size("backbone.num_attention_heads", b.num_attention_heads, 1, _MAX_HEADS)
        size("backbone.patch_size", b.patch_size, 1, 64, "a patch size in pixels")
        size("backbone.image_size", b.image_size, 0, MAX_IMAGE_SIZE, "a size in pixels (0 = the input size)")
    return out


def _divisor_near(n: int, k: int) -> int:
    """The divisor of ``n`` closest to ``k`` (a suggestion for a head count)."""
    if n < 1:
        return 1
    return min((d for d in range(1, min(n, 4 * max(k, 1)) + 1) if n % d == 0), key=lambda d: (abs(d - k), d))


def check_model_config(cfg: ModelConfig, *, width: int | None = None, saved: bool = False) -> None:
    """Raise :class:`ConfigError` with the first of :func:`model_config_problems` (and how many
    more there are); callers put the file's name in front."""
    problems = model_config_problems(cfg, width=width, saved=saved)
    if problems:
        more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
        raise ConfigError(problems[0] + more)


# --------------------------------------------------------------------------------------------
# dataclass <-> dict
# --------------------------------------------------------------------------------------------


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in get_args(tp))
    if origin is not None:
        return f"{getattr(origin, '__name__', str(origin))}[{', '.join(_type_name(a) for a in get_args(tp) if a is not Ellipsis)}]"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp`` and convert (list -> tuple, int -> float)."""
    origin = get_origin(tp)
    bad = ConfigError(
        f"config key {shorten(key)}: got {shorten(value)} ({type(value).__name__}); expected {_type_name(tp)}"
    )
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise bad
        return _from_dict(tp, value, prefix=f"{key}.")
    if origin is Literal:
        if value in get_args(tp) and type(value) is type(get_args(tp)[list(get_args(tp)).index(value)]):
            return value
        raise ConfigError(
            f"config key {shorten(key)}: got {shorten(value)}; expected one of {', '.join(repr(a) for a in get_args(tp))}"
        )
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                continue
        raise bad
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise bad
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(value) != len(args):
                raise ConfigError(
                    f"config key {shorten(key)}: got {len(value)} values {shorten(value)}; expected {len(args)}"
                )
            return tuple(
                _convert(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args, strict=True))
            )
        item = args[0] if args else Any
        items = [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict:
        if not isinstance(value, dict):
            raise bad
        kt, vt = get_args(tp) or (Any, Any)
        return {_convert(k, kt, f"{key}.<key>"): _convert(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise bad
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise bad
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            with contextlib.suppress(ValueError):
                return float(value)
        raise bad
    if tp is str:
        if isinstance(value, str):
            return value
        raise bad
    raise ConfigError(f"config key {shorten(key)}: unsupported annotation {tp!r}")


def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls, globalns=vars(typing) | globals())


def _from_dict(cls: type[T], data: dict[str, Any], prefix: str = "") -> T:
    if not isinstance(data, dict):
        raise ConfigError(
            f"config section {prefix.rstrip('.') or '<root>'!r}: expected a mapping, got {shorten(data)}"
        )
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"unknown config key {shorten(prefix + str(key))}; valid keys{' in ' + prefix.rstrip('.') if prefix else ''}: "
                f"{', '.join(names)}.{hint}"
            )
        kwargs[key] = _convert(value, hints[key], prefix + key)
    return cls(**kwargs)


def from_dict(cls: type[T], data: dict[str, Any] | None) -> T:
    """Build a config dataclass from a (YAML) mapping; unknown keys and wrong types are errors."""
    return _from_dict(cls, data or {})


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain mapping (lists for tuples) suitable for YAML / JSON."""

    def plain(v: Any) -> Any:
        if dataclasses.is_dataclass(v):
            return {f.name: plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
        if isinstance(v, (list, tuple)):
            return [plain(x) for x in v]
        if isinstance(v, dict):
            return {k: plain(x) for k, x in v.items()}
        return v

    return plain(cfg)


# --------------------------------------------------------------------------------------------
# bounded YAML
# --------------------------------------------------------------------------------------------

MAX_CONFIG_BYTES = 1 << 20
"""Largest config file read (our configs are a few kB)."""
MAX_CONFIG_DEPTH = 32
"""Deepest nesting of lists / mappings in a config, aliases expanded."""
MAX_CONFIG_NODES = 10_000
"""Most values (scalars, lists, mappings) a config may hold once its aliases are expanded."""


class _BoundedLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` with limits: nesting depth while composing, and duplicate keys refused
    (PyYAML silently keeps the last one). Aliases are checked by :func:`_check_expansion`."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        self._depth += 1
        try:
            if self._depth > MAX_CONFIG_DEPTH:
                line = self.peek_event().start_mark.line + 1
                raise ConfigError(
                    f"line {line}: nested more than {MAX_CONFIG_DEPTH} levels deep; expected a config of "
                    "sections, values and short lists"
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _value in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                line = key_node.start_mark.line + 1
                if key in seen:
                    raise ConfigError(
                        f"line {line}: duplicate key {shorten(key)} (first on line {seen[key]}); "
                        "expected each key once — delete one of them"
                    )
                seen[key] = line
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Refuse a document whose aliases expand beyond :data:`MAX_CONFIG_NODES` values or
    :data:`MAX_CONFIG_DEPTH` levels (an "alias bomb": a few kB that expand to gigabytes), or refer
    to themselves. Shared nodes are sized once, so this takes time linear in the file's size."""
    seen: dict[int, tuple[int, int]] = {}  # node -> (values, levels) with aliases expanded
    active: set[int] = set()

    def measure(node: yaml.Node, depth: int) -> tuple[int, int]:
        key = id(node)
        line = node.start_mark.line + 1
        if key in active:
            raise ConfigError(f"line {line}: an alias refers to the value that contains it; expected plain values")
        if key not in seen:
            active.add(key)
            if isinstance(node, yaml.SequenceNode):
                children = node.value
            elif isinstance(node, yaml.MappingNode):
                children = [n for pair in node.value for n in pair]
            else:
                children = []
            total, levels = 1, 1
            for child in children:
                n, h = measure(child, depth + 1)
                total, levels = total + n, max(levels, h + 1)
                if total > MAX_CONFIG_NODES:
                    raise ConfigError(
                        f"line {line}: aliases (*name) expand to more than {MAX_CONFIG_NODES:,} values; expected a "
                        "config of at most that size — write the values out instead of nesting aliases"
                    )
            active.discard(key)
            seen[key] = (total, levels)
        total, levels = seen[key]
        if depth + levels - 1 > MAX_CONFIG_DEPTH:
            raise ConfigError(
                f"line {line}: aliases expand to more than {MAX_CONFIG_DEPTH} levels of nesting; write the values out"
            )
        return total, levels

    measure(root, 1)


def load_yaml(text: str) -> Any:
    """Parse YAML (one document, safe types only) within the limits above: at most
    :data:`MAX_CONFIG_BYTES`, :data:`MAX_CONFIG_DEPTH` levels and :data:`MAX_CONFIG_NODES` values
    with aliases expanded; duplicate keys are errors. Raises :class:`ConfigError` (with the line)."""
    n_bytes = len(text.encode("utf-8", "surrogatepass"))
    if n_bytes > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{n_bytes:,} bytes; expected a config of at most {MAX_CONFIG_BYTES:,} bytes (is this the right file?)"
        )
    loader = _BoundedLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node)
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        raise ConfigError(f"not a valid YAML file ({' '.join(str(exc).split())[:300]})") from None
    finally:
        loader.dispose()


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr_adapter=1e-4"`` -> (["train", "lr_adapter"], 1e-4); the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {shorten(item)}: expected key=value, e.g. train.epochs=10")
    key, raw = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {shorten(item)}: empty key")
    try:
        value = load_yaml(raw) if raw.strip() else ""
    except ConfigError as exc:
        raise ConfigError(f"override {shorten(item)}: value: {exc}") from None
    return key.split("."), value


def apply_overrides(cfg: T, overrides: list[str] | None) -> T:
    """Return a copy of ``cfg`` with ``key=value`` overrides applied and type-checked."""
    data = to_dict(cfg)
    for item in overrides or []:
        path, value = parse_override(item)
        node = data
        for i, part in enumerate(path[:-1]):
            if not isinstance(node, dict) or part not in node or not isinstance(node[part], dict):
                where = ".".join(path[: i + 1])
                valid = [k for k, v in node.items() if isinstance(v, dict)] if isinstance(node, dict) else []
                raise ConfigError(
                    f"override {shorten(item)}: {where!r} is not a config section; sections: {', '.join(valid)}"
                )
            node = node[part]
        node[path[-1]] = value
    return from_dict(type(cfg), data)


def load_config(
    path: str | os.PathLike, overrides: list[str] | None = None, cls: type[T] = ExperimentConfig
) -> T:
    """Read a YAML config file (errors name the file) and apply ``key=value`` overrides."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file {str(p)!r} does not exist")
    with open(p, "rb") as fh:
        raw = fh.read(MAX_CONFIG_BYTES + 1)
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(
            f"{p}: larger than {MAX_CONFIG_BYTES:,} bytes; expected a YAML config of a few kB (is this the right file?)"
        )
    try:
        data = load_yaml(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{p}: not a valid YAML file ({exc}); expected UTF-8 text") from None
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None
    try:
        cfg = from_dict(cls, data if data is not None else {})
        return apply_overrides(cfg, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def dump_yaml(cfg: Any) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)


def replace(cfg: T, **changes: Any) -> T:
    """``dataclasses.replace`` with a deep copy, so nested sections are never shared."""
    return dataclasses.replace(copy.deepcopy(cfg), **changes)
