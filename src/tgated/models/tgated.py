"""CLIPSeg + T-Gated adapter: composition, shared-encoder inference core, save/load (docs/architecture.md, Model).

Data flow (one context window of K slices, centre at ``K // 2``, slices ordered inferior →
superior)::

    pixels (K, 3, S, S) ─► CLIP vision embeddings + pre-LayerNorm + encoder layers 0..deepest
        ─► tokens of the cached layers (K, L, N, C)  (N = (S/16)² + 1, CLS first)
        ─► adapter per adapted layer over the K slices; other layers from the centre slice
        ─► CLIPSeg decoder (FiLM by the organ's text embedding) ─► logits (S, S)

Layer numbering follows CLIPSeg's ``extract_layers``: layer ``i`` is the output of encoder block
``i`` (0-based), i.e. ``hidden_states[i + 1]``, before the post-LayerNorm. The stock
``CLIPSegForImageSegmentation.forward`` runs the vision tower under ``no_grad``; here it is composed
by hand and stops after the deepest layer used, so no parameter is left without a gradient.

The text tower gives each organ's conditioning vector (``conditioning: text``): frozen by default,
each prompt encoded once and cached; with ``train_text`` its transformer trains (the published
recipe) while its output projection stays frozen, as the published code leaves it out of its
optimizer. A training forward then encodes the batch's prompts with gradients, and the cache is
dropped whenever the text weights change.

Entry points
------------
* training: ``model(pixel_windows=(B, K, C, S, S), organs=...)`` (end to end, augmentation
  possible) or ``model(token_windows=(B, K, L, N, C), organs=...)`` with tokens from
  :meth:`TGatedModel.encode` / :meth:`TGatedModel.encode_stack` (frozen backbone, token cache);
  ``organs`` are canonical organ ids (B,) or text embeddings (B, projection_dim).
* inference: :meth:`TGatedModel.segment_stack` / :meth:`TGatedModel.iter_segment_stack` run the
  encoder once per distinct slice image and decode every organ from the same adapted tokens;
  :meth:`TGatedModel.segment_stack_naive` is the reference that re-encodes every window for
  every organ (as the published code does).
* ``save_pretrained`` / ``from_pretrained``: ``config.json`` + ``model.safetensors`` +
  ``tokenizer/``.

Images given with one channel are intensities in [0, 1] on the model grid
(:func:`tgated.data.slices.normalise_intensity` + :func:`~tgated.data.slices.to_model_grid`) and
are CLIP-normalised here; three-channel images are taken as CLIP-normalised pixel values.
"""

from __future__ import annotations

import copy
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tgated.config import (
    ConfigError,
    ModelConfig,
    check_model_config,
    from_dict,
    load_config,
    model_config_problems,
    shorten,
    to_dict,
)
from tgated.data.slices import (
    check_context,
    clip_normalise,
    context_indices,
    gather_windows,
    physical_context,
)
from tgated.io.files import atomic_path, atomic_write_json, read_json, replace_dir, safe_join, sha256_file
from tgated.models.adapter import COMPONENTS, TGatedAdapter
from tgated.models.backbone import build_clipseg, check_no_custom_code, load_backbone, seeded, skip_init
from tgated.models.decoder import decode_organs
from tgated.organs import NUM_ORGANS, ORGANS, Organ, get_organ, parse_organs
from tgated.progress import progress

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1

OrganSpec = str | int | Organ


# --------------------------------------------------------------------------------------------
# Context windows over a stack of slices
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowPlan:
    """The distinct images a set of context windows needs, and which one fills each window slot.

    Distinct image ``u`` is ``(1 - w[u]) · slice[lo[u]] + w[u] · slice[hi[u]]`` (``w = 0`` and
    ``lo = hi`` for an original slice); window ``i``'s k-th slice is image ``index[i, k]``, and the
    window is centred on slice ``centres[i]``. Encoding the ``U`` images once and gathering tokens
    with ``index`` gives the same windows as re-encoding every window.
    """

    lo: torch.Tensor
    hi: torch.Tensor
    w: torch.Tensor
    index: torch.Tensor
    centres: torch.Tensor

    @property
    def num_images(self) -> int:
        return int(self.lo.numel())

    def images(self, slices: torch.Tensor, which: slice | torch.Tensor | None = None) -> torch.Tensor:
        """Distinct images (or the subset ``which``) from per-slice tensors (Z, ...)."""
        sel = slice(None) if which is None else which
        return gather_windows(slices, (self.lo[sel], self.hi[sel], self.w[sel]))


def plan_windows(
    n_slices: int,
    context: int,
    *,
    mode: str = "index",
    step_mm: float = 3.0,
    positions_mm: np.ndarray | torch.Tensor | Sequence[float] | None = None,
    centres: torch.Tensor | Sequence[int] | None = None,
    neighbours: str = "real",
) -> WindowPlan:
    """Plan the context windows of ``centres`` (default: every slice) of an ``n_slices`` stack.

    ``mode="index"``: neighbours are the adjacent slices, edge slices repeated
    (:func:`tgated.data.slices.context_indices`). ``mode="physical"``: neighbours at
    ``k · step_mm`` millimetres, interpolated linearly between the two nearest slices and clamped
    at the ends (:func:`tgated.data.slices.physical_context`); ``positions_mm`` (increasing, one
    per slice) is required. Identical interpolated images are planned once.
    ``neighbours="centre"`` is the context ablation: every slot of a window holds its centre slice,
    so the adapter sees the same window shape with no information from the neighbours.
    """
    if neighbours not in ("real", "centre"):
        raise ValueError(f"neighbours={neighbours!r}: expected 'real' or 'centre'")
    if n_slices < 1:
        raise ValueError(f"a stack needs at least one slice, got {n_slices}")
    c = torch.arange(n_slices) if centres is None else torch.as_tensor(centres, dtype=torch.long)
    if c.numel() and (int(c.min()) < 0 or int(c.max()) >= n_slices):
        raise ValueError(f"centre slices must lie in 0..{n_slices - 1}, got {c.tolist()[:10]}")
    if mode == "index":
        lo = context_indices(n_slices, context, c)
        hi, w = lo, torch.zeros(lo.shape, dtype=torch.float32)
    elif mode == "physical":
        if positions_mm is None:
            raise ValueError(
                "context_mode 'physical' needs the slice positions in mm (positions_mm, one per slice); "
                "pass them or use context_mode 'index'"
            )
        pos = np.asarray(positions_mm, dtype=np.float64).reshape(-1)
        if pos.size != n_slices:
            raise ValueError(
                f"positions_mm has {pos.size} values for {n_slices} slices; expected one per slice"
            )
        if pos.size > 1 and not np.all(np.diff(pos) > 0):
            raise ValueError(
                "positions_mm must increase strictly (slices ordered inferior → superior, canonical frame); "
                f"got {pos[:6].tolist()}..."
            )
        lo, hi, w = physical_context(pos, context, step_mm, c)
        # An interpolation weight of exactly 0 or 1 is the original slice: plan it once.
        hi = torch.where(w == 0, lo, hi)
        lo = torch.where(w == 1, hi, lo)
        w = torch.where(w == 1, torch.zeros_like(w), w)
    else:
        raise ValueError(f"unknown context mode {mode!r}; expected 'index' or 'physical'")
    if neighbours == "centre":
        mid = context // 2
        lo, hi, w = (t[:, mid : mid + 1].expand(-1, context) for t in (lo, hi, w))
    keys = torch.stack([lo.reshape(-1), hi.reshape(-1), w.reshape(-1).view(torch.int32).long()], dim=1)
    uniq, inverse = torch.unique(keys, dim=0, return_inverse=True)
    return WindowPlan(
        lo=uniq[:, 0].contiguous(),
        hi=uniq[:, 1].contiguous(),
        w=uniq[:, 2].int().view(torch.float32).contiguous(),
        index=inverse.view(lo.shape),
        centres=c,
    )


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


class TGatedModel(nn.Module):
    """CLIPSeg with the T-Gated adapter (or without: ``adapter: none``, the single-slice baseline).

    Build with :meth:`from_config` (backbone from a checkpoint or random) or
    :meth:`from_pretrained` (a saved model). Attributes: ``config`` (the resolved
    :class:`~tgated.config.ModelConfig`), ``context`` (K; 1 without adapter), ``token_layers``
    (encoder layers whose tokens are cached, in decoder input order), ``adapted_layers``,
    ``image_size`` (S), ``organs`` (the organs it segments), ``note`` (how the backbone was made).
    """

    def __init__(
        self, config: ModelConfig, backbone: Any, tokenizer: Any | None = None, *, note: str = ""
    ) -> None:
        super().__init__()
        self.config = copy.deepcopy(config)
        cfg = self.config
        if cfg.model_type != "tgated":
            raise ValueError(f"model.model_type is {cfg.model_type!r}; TGatedModel needs 'tgated'")
        self.backbone = backbone
        self.tokenizer = tokenizer
        self.note = note
        clip_cfg = backbone.config
        vis = clip_cfg.vision_config
        self.num_encoder_layers = int(vis.num_hidden_layers)
        self.channels = int(vis.hidden_size)
        self.image_size = int(cfg.preprocess.image_size)
        self._check_geometry(clip_cfg)
        check_model_config(cfg, width=self.channels)
        extract = [int(i) for i in clip_cfg.extract_layers]

        if cfg.adapter == "none":
            self.context = 1  # from_config says so when the config asked for more
        else:
            self.context = check_context(cfg.context, "model.context")

        if cfg.variant == "reference":
            final = self.num_encoder_layers - 1
            self.token_layers: tuple[int, ...] = (final,)
            self.adapted_layers: tuple[int, ...] = () if cfg.adapter == "none" else (final,)
        else:
            self.token_layers = tuple(extract)
            if cfg.adapter == "none":
                self.adapted_layers = ()
            else:
                if len(set(cfg.adapt_layers)) != len(cfg.adapt_layers) or not cfg.adapt_layers:
                    raise ValueError(
                        f"model.adapt_layers={cfg.adapt_layers}: expected one or more distinct layers from "
                        f"extract_layers {extract}"
                    )
                bad = [i for i in cfg.adapt_layers if i not in extract]
                if bad:
                    raise ValueError(
                        f"model.adapt_layers={cfg.adapt_layers}: {bad} not among the backbone's extract_layers "
                        f"{extract}; valid adapt layers: {', '.join(map(str, extract))}"
                    )
                self.adapted_layers = tuple(int(i) for i in cfg.adapt_layers)
        self.deepest = max(self.token_layers)
        self.adapters = nn.ModuleDict(
            {
                str(layer): TGatedAdapter(
                    self.channels,
                    self.context,
                    cfg.adapter_config,
                    temporal=cfg.temporal,
                    gate=cfg.gate,
                    spatial=cfg.spatial,
                    residual_head=cfg.variant != "reference",
                )
                for layer in self.adapted_layers
            }
        )
        if cfg.conditioning == "auto":  # a random text tower cannot tell the prompts apart
            cfg.conditioning = "learned" if cfg.backbone.source == "random" else "text"
        self.conditioning = cfg.conditioning
        if cfg.train_text and self.conditioning != "text":
            raise ValueError(
                f"model.train_text=true with model.conditioning={self.conditioning!r}: expected "
                "conditioning: text (the learned organ embeddings do not read the text tower, so it would "
                "not train) — set model.conditioning=text or model.train_text=false"
            )
        self.organ_embedding: nn.Parameter | None = None
        if self.conditioning == "learned":
            # filled by from_config (text or orthogonal init) or by from_pretrained (saved values)
            p = int(clip_cfg.projection_dim)
            self.organ_embedding = nn.Parameter(torch.zeros(NUM_ORGANS, p))
        self.organs: tuple[Organ, ...] = parse_organs(cfg.organs or None)
        cfg.organs = [o.name for o in self.organs]  # resolved: a saved model lists what it segments
        self.prompts: dict[str, str] = {}
        for key, prompt in cfg.prompts.items():
            self.prompts[get_organ(key).name] = str(prompt)
        self._text_cache: dict[str, torch.Tensor] = {}
        self._table_memo: dict[tuple[torch.device, torch.dtype], torch.Tensor] = {}
        self._text_version: int | None = None  # the text weights' version the caches were filled from
        self._tokens_memo: dict[str, dict[str, torch.Tensor]] = {}
        self._set_trainable()

    # ---------------------------------------------------------------- construction helpers

    def _check_geometry(self, clip_cfg: Any) -> None:
        vis = clip_cfg.vision_config
        patch, s = int(vis.patch_size), self.image_size
        if s % patch:
            raise ValueError(
                f"model.preprocess.image_size={s} is not a multiple of the backbone's patch size {patch}; "
                f"use e.g. {max(patch, s // patch * patch)}"
            )
        if clip_cfg.use_complex_transposed_convolution and (patch // 4) ** 2 != patch:
            raise ValueError(
                f"backbone patch size {patch} with the complex transposed convolution upsamples by "
                f"{(patch // 4) ** 2}, not {patch}: the decoder output would not match the {s}-pixel input"
            )

    @property
    def vision(self) -> Any:
        return self.backbone.clip.vision_model

    @property
    def decoder(self) -> Any:
        return self.backbone.decoder

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _set_trainable(self) -> None:
        """Freeze what is never trained or never used, so every trainable parameter gets a gradient."""
        self.backbone.requires_grad_(False)
        if self.config.train_backbone:
            vm = self.vision
            vm.embeddings.requires_grad_(True)
            vm.pre_layrnorm.requires_grad_(True)
            for layer in vm.encoder.layers[: self.deepest + 1]:
                layer.requires_grad_(True)
        if self.config.train_text:  # the transformer; text_projection stays frozen
            self.backbone.clip.text_model.requires_grad_(True)
        self.decoder.requires_grad_(True)
        n_inputs = len(self.token_layers)
        for module in (*self.decoder.reduces[n_inputs:], *self.decoder.layers[n_inputs:]):
            module.requires_grad_(False)  # the reference variant feeds one activation only
        self.adapters.requires_grad_(True)
        if self.organ_embedding is not None:
            self.organ_embedding.requires_grad_(True)

    @classmethod
    def from_config(
        cls,
        config: ModelConfig,
        *,
        device: str | torch.device | None = None,
        meta: bool = False,
        local_files_only: bool = False,
        fallback_to_random: bool = False,
    ) -> TGatedModel:
        """Build from a :class:`~tgated.config.ModelConfig`: backbone from ``backbone.source``
        (checkpoint directory, hub id, or ``random``), fresh adapters seeded by
        ``backbone.seed + 1``. ``meta`` builds the architecture without weights (counting
        parameters); ``fallback_to_random`` replaces an unavailable checkpoint by the rd64
        architecture with random weights (the model's ``note`` says so).

        With ``init_from`` (a saved model), its backbone, decoder and learned organ embeddings are
        the starting point instead, and only the adapters are new.
        """
        config = copy.deepcopy(config)
        if config.adapter == "none" and config.context != 1:
            # said here, not when a saved model is loaded (a stage-1 model loaded to train T-Gated from)
            logger.info("adapter: none — the single-slice baseline; context K=%d forced to 1", config.context)
        source: TGatedModel | None = None
        if config.init_from and not meta:
            source = cls.from_pretrained(config.init_from)
            _check_init_source(config, source)
            backbone, tokenizer = source.backbone, source.tokenizer
            random_text = source.config.backbone.source == "random"
            note = f"initialised from {config.init_from} ({source.note})"
            if config.conditioning == "auto":
                config.conditioning = source.conditioning
        else:
            bb = load_backbone(
                config.backbone,
                config.preprocess.image_size,
                config.prompts.values(),
                meta=meta,
                local_files_only=local_files_only,
                fallback_to_random=fallback_to_random,
            )
            backbone, tokenizer, note = bb.model, bb.tokenizer, bb.note
            random_text = config.backbone.source == "random"
        ctx = torch.device("meta") if meta else seeded(config.backbone.seed + 1)
        with ctx:
            model = cls(config, backbone, tokenizer, note=note)
        if model.organ_embedding is not None and not meta:
            with torch.no_grad():
                if source is not None and source.organ_embedding is not None:
                    model.organ_embedding.copy_(source.organ_embedding)
                else:
                    with seeded(config.backbone.seed + 2):
                        model.organ_embedding.copy_(model._initial_organ_embedding(random_text))
        if device is not None and not meta:
            model.to(device)
        return model

    def _initial_organ_embedding(self, random_text: bool) -> torch.Tensor:
        """Start values of the learned organ embeddings (NUM_ORGANS, P): each organ's text embedding,
        or, when the text tower is random, orthogonal rows (orthonormal columns when P < 13) with
        the text embeddings' mean norm, so distinct organs start far apart."""
        text = self.text_embeddings([self.prompt(o) for o in ORGANS]).float().cpu()
        if not random_text:
            return text
        table = torch.empty_like(text)
        nn.init.orthogonal_(table)
        scale = text.norm(dim=1).mean() / table.norm(dim=1).mean().clamp_min(1e-12)
        return table * scale

    # ---------------------------------------------------------------- text conditioning

    def prompt(self, organ: OrganSpec) -> str:
        """The text prompt of an organ (config ``prompts`` override, else organs.py)."""
        o = organ if isinstance(organ, Organ) else get_organ(organ)
        return self.prompts.get(o.name, o.prompt)

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:
        self._clear_text_caches()
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    def _clear_text_caches(self) -> None:
        self._text_cache.clear()
        self._table_memo.clear()
        self._text_version = None

    def _text_weights_version(self) -> int:
        """Sum of the text transformer's parameter version counters: it grows with every in-place
        change of those weights (an optimizer step, ``load_state_dict``)."""
        return sum(p._version for p in self.backbone.clip.text_model.parameters())

    def _check_text_caches(self) -> None:
        """With ``train_text`` the cached prompt embeddings are dropped once the text weights changed."""
        if not self.config.train_text:
            return
        version = self._text_weights_version()
        if self._text_version != version:
            self._clear_text_caches()
            self._text_version = version

    def _text_trains_now(self) -> bool:
        """True in a training forward of a model whose text tower trains: the prompt embeddings are
        then computed with gradients, never taken from the cache."""
        return bool(self.config.train_text and self.training and torch.is_grad_enabled())

    def _encode_prompt(self, prompt: str) -> torch.Tensor:
        """(1, projection_dim) embedding of one prompt, tokenised on its own (no padding), with the
        text tower in eval mode; gradients flow when enabled and the tower is trainable."""
        if self.tokenizer is None:
            raise ValueError(
                "this model has no tokenizer (built without weights); pass text embeddings instead"
            )
        text = self.backbone.clip
        enc = self._tokens_memo.get(prompt)
        if enc is None:
            max_len = int(self.backbone.config.text_config.max_position_embeddings)
            enc = dict(self.tokenizer(prompt, return_tensors="pt", truncation=True, max_length=max_len))
            self._tokens_memo[prompt] = enc
        dev = text.text_projection.weight.device
        was_training = text.training
        text.eval()
        try:
            return text.get_text_features(
                input_ids=enc["input_ids"].to(dev), attention_mask=enc["attention_mask"].to(dev)
            ).pooler_output
        finally:
            text.train(was_training)

    @torch.no_grad()
    def text_embeddings(self, prompts: Sequence[str]) -> torch.Tensor:
        """(O, projection_dim) conditional embeddings of ``prompts``, computed once per prompt.

        Each prompt is tokenised and encoded on its own (no padding), so an embedding never depends
        on the other prompts. The cache is dropped when the text weights change (``train_text``).
        """
        self._check_text_caches()
        for p in prompts:
            if p not in self._text_cache:
                self._text_cache[p] = self._encode_prompt(p)[0].detach().float().cpu()
        dev, dt = self.device, self.decoder.film_mul.weight.dtype
        return torch.stack([self._text_cache[p] for p in prompts]).to(dev, dt)

    def organ_embeddings(self, organ_ids: torch.Tensor) -> torch.Tensor:
        """(B,) canonical organ ids (1-13) → (B, projection_dim) conditioning vectors (the learned
        embeddings with ``conditioning: learned``, else the prompts' text embeddings)."""
        ids = torch.as_tensor(organ_ids)
        if ids.numel() and (int(ids.min()) < 1 or int(ids.max()) > NUM_ORGANS):
            raise ValueError(f"organ ids must be canonical ids 1-{NUM_ORGANS}, got {ids.unique().tolist()}")
        if self.organ_embedding is not None:
            return self.organ_embedding[ids.to(self.organ_embedding.device).long() - 1]
        if self._text_trains_now():  # each organ of the batch once, with gradients
            unique, inverse = torch.unique(ids.long(), return_inverse=True)
            emb = torch.cat([self._encode_prompt(self.prompt(int(o))) for o in unique.tolist()])
            return emb.to(self.decoder.film_mul.weight.dtype)[inverse.to(emb.device)]
        self._check_text_caches()
        key = (self.device, self.decoder.film_mul.weight.dtype)
        if key not in self._table_memo:
            emb = self.text_embeddings([self.prompt(o) for o in ORGANS])
            self._table_memo[key] = torch.cat([emb.new_zeros(1, emb.shape[1]), emb])
        return self._table_memo[key][ids.to(key[0]).long()]

    def organ_conditioning(self, organs: Sequence[Organ]) -> torch.Tensor:
        """(O, projection_dim) conditioning vectors of ``organs``, in that order."""
        return self.organ_embeddings(torch.tensor([o.id for o in organs])).to(
            self.decoder.film_mul.weight.dtype
        )

    @torch.no_grad()
    def conditioning_similarity(self, organs: Sequence[Organ] | None = None) -> dict[str, Any]:
        """Pairwise cosine similarity of the organs' conditioning vectors (default: the model's
        organs): ``{"organs": names, "cosine": rows, "max_off_diagonal": x}``. Near-parallel vectors
        (cosine close to 1) leave the decoder unable to tell those organs apart."""
        organ_list = list(organs) if organs is not None else list(self.organs)
        v = self.organ_conditioning(organ_list).float()
        v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cos = v @ v.T
        off = cos[~torch.eye(len(organ_list), dtype=torch.bool)]
        return {
            "conditioning": self.conditioning,
            "organs": [o.name for o in organ_list],
            "cosine": [[round(float(x), 4) for x in row] for row in cos],
            "max_off_diagonal": round(float(off.max()), 4) if off.numel() else None,
        }

    def _conditioning(self, organs: Any, batch: int) -> torch.Tensor:
        if isinstance(organs, torch.Tensor) and organs.is_floating_point():
            cond = organs
        elif isinstance(organs, torch.Tensor):
            cond = self.organ_embeddings(organs.reshape(-1))
        elif isinstance(organs, (list, tuple)):
            cond = self.organ_embeddings(
                torch.tensor([get_organ(o).id if not isinstance(o, Organ) else o.id for o in organs])
            )
        else:
            raise ValueError(
                f"organs: expected canonical organ ids (B,), names, or text embeddings (B, P); got {type(organs).__name__}"
            )
        p = int(self.backbone.config.projection_dim)
        if cond.dim() != 2 or cond.shape != (batch, p):
            raise ValueError(
                f"organ conditioning has shape {tuple(cond.shape)}; expected ({batch}, {p}) for a batch of {batch}"
            )
        return cond.to(self.decoder.film_mul.weight.dtype)

    # ---------------------------------------------------------------- composed forward

    def _pixels(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(
                f"expected images (M, 1 or 3, S, S), got shape {tuple(images.shape)}: one channel = intensities "
                "in [0, 1] on the model grid, three = CLIP-normalised pixel values"
            )
        if images.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(
                f"images are {tuple(images.shape[-2:])} pixels; this model runs at "
                f"{self.image_size}×{self.image_size} (preprocess.image_size): resize with "
                "tgated.data.slices.to_model_grid"
            )
        x = images.to(self.device, self.vision.embeddings.patch_embedding.weight.dtype)
        return clip_normalise(x, self.config.preprocess) if x.shape[1] == 1 else x

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Vision tokens of single slices: (M, 1|3, S, S) → (M, L, N, C), L = ``len(token_layers)``.

        Runs embeddings (position grid interpolated to S), pre-LayerNorm and encoder blocks
        ``0..deepest``. Gradients flow only when ``train_backbone`` is on.
        """
        x = self._pixels(images)
        vm = self.vision
        grad = torch.is_grad_enabled() and self.config.train_backbone
        wanted = {layer: j for j, layer in enumerate(self.token_layers)}
        outs: list[torch.Tensor | None] = [None] * len(self.token_layers)
        with torch.set_grad_enabled(grad):
            h = vm.pre_layrnorm(vm.embeddings(x, interpolate_pos_encoding=True))
            for i, layer in enumerate(vm.encoder.layers[: self.deepest + 1]):
                h = layer(h, None)
                if i in wanted:
                    outs[wanted[i]] = h
        return torch.stack(outs, dim=1)  # type: ignore[arg-type]

    def adapt(self, token_windows: torch.Tensor, index: torch.Tensor | None = None) -> list[torch.Tensor]:
        """(B, K, L, N, C) window tokens → the decoder's L inputs, each (B, N, C).

        Adapted layers go through their adapter; the others come from the centre slice. With
        ``index`` (B, K), ``token_windows`` are the tokens of distinct images (U, L, N, C) and window
        ``b``'s k-th slice is image ``index[b, k]``: each layer gathers only what it reads (the
        centre for a layer without adapter; an adapter projects each image once and gathers its
        windows from that, :meth:`TGatedAdapter.forward_indexed`), not every layer of every slice.
        """
        if index is None:
            k = token_windows.shape[1]
            adapted = lambda adapter, j: adapter(token_windows[:, :, j])  # noqa: E731
            centre = lambda j: token_windows[:, k // 2, j]  # noqa: E731
        else:
            k, dt = index.shape[1], self.decoder.film_mul.weight.dtype  # cached tokens may be stored narrower
            # the adapter gathers its windows itself, after the work it can do once per image
            adapted = lambda adapter, j: adapter.forward_indexed(token_windows[:, j].to(dt), index)  # noqa: E731
            centre = lambda j: token_windows[index[:, k // 2], j].to(dt)  # noqa: E731
        out = []
        for j, layer in enumerate(self.token_layers):
            key = str(layer)
            out.append(adapted(self.adapters[key], j) if key in self.adapters else centre(j))
        return out

    def decode(self, activations: list[torch.Tensor], conditional: torch.Tensor) -> torch.Tensor:
        """CLIPSeg decoder: L activations (B, N, C) + text embeddings (B, P) → logits (B, S, S)."""
        dt = self.decoder.film_mul.weight.dtype
        return self.decoder([a.to(dt) for a in activations], conditional.to(dt)).logits

    def forward(
        self,
        pixel_windows: torch.Tensor | None = None,
        organs: torch.Tensor | Sequence[OrganSpec] | None = None,
        *,
        token_windows: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Training / evaluation forward → logits (B, S, S) for the windows' centre slices.

        Give exactly one of ``pixel_windows`` (B, K, 1|3, S, S) or ``token_windows``
        (B, K, L, N, C) from :meth:`encode`; ``organs`` are canonical organ ids (B,), organ names,
        or text embeddings (B, projection_dim).
        """
        if (pixel_windows is None) == (token_windows is None):
            raise ValueError(
                "pass exactly one of pixel_windows (B, K, C, S, S) or token_windows (B, K, L, N, C)"
            )
        if organs is None:
            raise ValueError("organs is required: canonical organ ids (B,), names, or text embeddings (B, P)")
        if pixel_windows is not None:
            if pixel_windows.dim() != 5:
                raise ValueError(
                    f"pixel_windows: expected (B, K, C, S, S), got shape {tuple(pixel_windows.shape)}"
                )
            b, k = pixel_windows.shape[:2]
            self._check_k(k)
            tokens = self.encode(pixel_windows.flatten(0, 1)).unflatten(0, (b, k))
        else:
            assert token_windows is not None
            expected = (len(self.token_layers), None, self.channels)
            if (
                token_windows.dim() != 5
                or token_windows.shape[2] != expected[0]
                or token_windows.shape[4] != expected[2]
            ):
                raise ValueError(
                    f"token_windows: expected (B, K, L={expected[0]}, N, C={self.channels}), "
                    f"got shape {tuple(token_windows.shape)}"
                )
            b, k = token_windows.shape[:2]
            self._check_k(k)
            tokens = token_windows.to(self.device, self.decoder.film_mul.weight.dtype)
        return self.decode(self.adapt(tokens), self._conditioning(organs, b))

    def _check_k(self, k: int) -> None:
        if k != self.context:
            raise ValueError(f"windows hold {k} slices; this model uses context K={self.context}")

    # ---------------------------------------------------------------- training helpers

    def track_adapter_stats(self, on: bool = True) -> None:
        """Record the adapters' gate opening and temporal share in every forward pass (or stop)."""
        for adapter in self.adapters.values():
            adapter.track_stats = on
            adapter.pop_stats()

    def pop_adapter_stats(self) -> dict[int, dict[str, float]]:
        """Per adapted layer, the means recorded since the last call (see
        :meth:`tgated.models.adapter.TGatedAdapter.pop_stats`); layers without records are left out."""
        out = {}
        for layer, adapter in self.adapters.items():
            stats = adapter.pop_stats()
            if stats is not None:
                out[int(layer)] = stats
        return out

    def gate_regularization(self) -> torch.Tensor:
        """Sum over adapters of ``λ · mean(σ(b)(1 − σ(b)))`` (0 without gates): add to the loss."""
        terms = [a.gate_regularization() for a in self.adapters.values()]
        if not terms:
            return self.decoder.film_mul.weight.new_zeros(())
        return torch.stack(terms).sum()

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        """Trainable parameters by learning-rate group: ``adapter``, ``decoder``, ``backbone`` (the
        vision tower), ``conditioning`` (the learned organ embeddings), ``text`` (the text transformer)."""
        return {
            "adapter": [p for p in self.adapters.parameters() if p.requires_grad],
            "decoder": [p for p in self.decoder.parameters() if p.requires_grad],
            "backbone": [p for p in self.vision.parameters() if p.requires_grad],
            "conditioning": [self.organ_embedding] if self.organ_embedding is not None else [],
            "text": [p for p in self.backbone.clip.text_model.parameters() if p.requires_grad],
        }

    def parameter_counts(self) -> dict[str, Any]:
        """Parameter counts: backbone (CLIP towers), adapter, decoder, learned organ conditioning, total,
        trainable, per adapter part."""

        def n(ps: Any) -> int:
            return sum(p.numel() for p in ps)

        comps: dict[str, int] = {}
        for adapter in self.adapters.values():
            for name, count in adapter.component_parameters().items():
                comps[name] = comps.get(name, 0) + count
        return {
            "backbone": n(self.backbone.clip.parameters()),
            "adapter": n(self.adapters.parameters()),
            "decoder": n(self.decoder.parameters()),
            "conditioning": self.organ_embedding.numel() if self.organ_embedding is not None else 0,
            "total": n(self.parameters()),
            "trainable": n(p for p in self.parameters() if p.requires_grad),
            "adapter_components": {k: comps[k] for k in COMPONENTS if k in comps},
        }

    # ---------------------------------------------------------------- shared-encoder inference

    def plan(
        self,
        n_slices: int,
        positions_mm: np.ndarray | torch.Tensor | Sequence[float] | None = None,
        centres: torch.Tensor | Sequence[int] | None = None,
        neighbours: str = "real",
    ) -> WindowPlan:
        """:func:`plan_windows` with this model's K, ``context_mode`` and ``context_step_mm``
        (``neighbours="centre"``: the context ablation)."""
        mode = self.config.context_mode if self.context > 1 else "index"
        return plan_windows(
            n_slices,
            self.context,
            mode=mode,
            step_mm=self.config.context_step_mm,
            positions_mm=positions_mm,
            centres=centres,
            neighbours=neighbours,
        )

    @torch.no_grad()
    def encode_stack(
        self,
        slices: torch.Tensor,
        *,
        positions_mm: np.ndarray | torch.Tensor | Sequence[float] | None = None,
        centres: torch.Tensor | Sequence[int] | None = None,
        batch_size: int = 16,
        cache_dtype: torch.dtype | None = None,
        quiet: bool = True,
        neighbours: str = "real",
    ) -> tuple[torch.Tensor, WindowPlan]:
        """Encode each distinct image of a stack's windows once.

        ``slices`` (Z, 1, S, S) in [0, 1] (or (Z, 3, S, S) CLIP-normalised) on any device.
        Returns tokens (U, L, N, C) on the model's device (``cache_dtype``, default the model's)
        and the :class:`WindowPlan`; window tokens are ``tokens[plan.index]``.
        """
        if slices.dim() != 4:
            raise ValueError(f"slices: expected (Z, 1, S, S), got shape {tuple(slices.shape)}")
        _check_batch_size(batch_size)
        plan = self.plan(slices.shape[0], positions_mm, centres, neighbours)
        tokens: torch.Tensor | None = None  # filled in place: never the cache and its parts at once
        batches = range(0, plan.num_images, batch_size)
        for start in progress(batches, desc="encode", quiet=quiet, lines=False, leave=False):
            which = slice(start, start + batch_size)
            tok = self.encode(plan.images(slices, which))
            if tokens is None:
                tokens = tok.new_empty((plan.num_images, *tok.shape[1:]), dtype=cache_dtype or tok.dtype)
            tokens[which] = tok
        assert tokens is not None
        return tokens, plan

    def _organ_list(self, organs: Sequence[OrganSpec] | None) -> list[Organ]:
        if organs is None:
            return list(self.organs)
        out = [o if isinstance(o, Organ) else get_organ(o) for o in organs]
        if not out:
            raise ValueError("organs: expected at least one organ")
        return out

    @torch.no_grad()
    def iter_segment_stack(
        self,
        slices: torch.Tensor,
        organs: Sequence[OrganSpec] | None = None,
        *,
        positions_mm: np.ndarray | torch.Tensor | Sequence[float] | None = None,
        batch_size: int = 16,
        quiet: bool = True,
        neighbours: str = "real",
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Stream logits over a stack: yields ``(centres (n,), logits (n, O, S, S))`` chunks.

        The encoder runs once per distinct image (tokens of the whole stack are kept: Z × L × N × C
        values), the adapter once per centre slice over its window's cached tokens, and the
        decoder's organ-independent part once per slice and the rest per (slice, organ) pair,
        ``batch_size`` slices × O organs per call (:func:`~tgated.models.decoder.decode_organs`). Organs
        (default: the model's) are returned in the order given. Call in eval mode.
        ``neighbours="centre"`` runs the context ablation (:func:`plan_windows`).
        """
        organ_list = self._organ_list(organs)
        cond = self.organ_conditioning(organ_list)
        tokens, plan = self.encode_stack(
            slices, positions_mm=positions_mm, batch_size=batch_size, quiet=quiet, neighbours=neighbours
        )
        for start in progress(
            range(0, plan.index.shape[0], batch_size), desc="decode", quiet=quiet, lines=False, leave=False
        ):
            idx = plan.index[start : start + batch_size].to(tokens.device)
            n = idx.shape[0]
            acts = self.adapt(tokens, idx)
            yield plan.centres[start : start + n], decode_organs(self.decoder, acts, cond)

    @torch.no_grad()
    def segment_stack(
        self,
        slices: torch.Tensor,
        organs: Sequence[OrganSpec] | None = None,
        *,
        positions_mm: np.ndarray | torch.Tensor | Sequence[float] | None = None,
        batch_size: int = 16,
        quiet: bool = True,
        neighbours: str = "real",
    ) -> torch.Tensor:
        """Logits (Z, O, S, S) for every slice of a (Z, 1, S, S) stack and every organ (shared encoder).

        ``slices``: intensities in [0, 1] on the model grid, ordered inferior → superior;
        ``positions_mm``: slice positions (needed for ``context_mode: physical``); ``neighbours``:
        ``"centre"`` for the context ablation (:func:`plan_windows`). The result lives
        on ``slices``' device; apply ``sigmoid`` for probabilities.
        """
        parts = [
            lg.to(slices.device)
            for _, lg in self.iter_segment_stack(
                slices,
                organs,
                positions_mm=positions_mm,
                batch_size=batch_size,
                quiet=quiet,
                neighbours=neighbours,
            )
        ]
        return torch.cat(parts)

    @torch.no_grad()
    def segment_stack_naive(
        self,
        slices: torch.Tensor,
        organs: Sequence[OrganSpec] | None = None,
        *,
        positions_mm: np.ndarray | torch.Tensor | Sequence[float] | None = None,
        batch_size: int = 16,
    ) -> torch.Tensor:
        """Reference for :meth:`segment_stack`: re-encodes all K slices of every window for every
        organ (the published code's inference), ``batch_size`` windows per forward."""
        _check_batch_size(batch_size)
        organ_list = self._organ_list(organs)
        cond = self.organ_conditioning(organ_list)
        z = slices.shape[0]
        if self.context > 1 and self.config.context_mode == "physical":
            if positions_mm is None:
                raise ValueError("context_mode 'physical' needs positions_mm (one per slice)")
            index: Any = physical_context(
                np.asarray(positions_mm, dtype=np.float64), self.context, self.config.context_step_mm
            )
        else:
            index = context_indices(z, self.context)
        out = None
        for o in range(len(organ_list)):
            for start in range(0, z, batch_size):
                sel = slice(start, start + batch_size)
                idx = index[sel] if isinstance(index, torch.Tensor) else tuple(t[sel] for t in index)
                windows = gather_windows(slices, idx)
                logits = self(pixel_windows=windows, organs=cond[o].expand(windows.shape[0], -1))
                if out is None:
                    out = logits.new_empty(z, len(organ_list), *logits.shape[-2:])
                out[sel, o] = logits
        assert out is not None
        return out.to(slices.device)

    # ---------------------------------------------------------------- save / load

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write ``config.json``, ``model.safetensors`` and ``tokenizer/`` into ``directory``.

        ``config.json`` holds ``model_type: tgated``, the full model config (incl. preprocessing),
        the CLIPSeg architecture (loading never needs the hub) and the weights' SHA-256. Each file
        is written atomically; ``config.json`` last.
        """
        from safetensors.torch import save_file

        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().to("cpu").contiguous() for k, v in self.state_dict().items()}
        with atomic_path(out / WEIGHTS_NAME, suffix=".safetensors") as tmp:
            save_file(state, str(tmp), metadata={"format": "pt", "model_type": "tgated"})
        digest = sha256_file(out / WEIGHTS_NAME)
        has_tok = self.tokenizer is not None
        if has_tok:
            replace_dir(out / TOKENIZER_DIR, self.tokenizer.save_pretrained)
        from tgated import __version__

        atomic_write_json(
            out / CONFIG_NAME,
            {
                "model_type": "tgated",
                "format_version": FORMAT_VERSION,
                "tgated_version": __version__,
                "model": to_dict(self.config),
                "clipseg": self.backbone.config.to_dict(),
                "weights": WEIGHTS_NAME,
                "weights_sha256": digest,
                "tokenizer": TOKENIZER_DIR if has_tok else None,
            },
        )
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device: str | torch.device = "cpu") -> TGatedModel:
        """Load a model written by :meth:`save_pretrained` (or a run folder holding ``model/``).

        The weights' checksum is verified; a missing, truncated or modified ``model.safetensors``,
        a config that is not ours (e.g. a raw CLIPSeg checkpoint) or mismatched tensors raise a
        ``ValueError`` naming the file. Returned in eval mode.
        """
        from safetensors import SafetensorError
        from safetensors.torch import load_file
        from transformers import AutoTokenizer, CLIPSegConfig

        root = Path(directory)
        if not (root / CONFIG_NAME).is_file() and (root / "model" / CONFIG_NAME).is_file():
            root = root / "model"
        cfg_path = root / CONFIG_NAME
        if not root.is_dir():
            raise FileNotFoundError(f"model folder {str(root)!r} does not exist")
        if not cfg_path.is_file():
            raise FileNotFoundError(
                f"{cfg_path} does not exist: {str(root)!r} is not a saved T-Gated model "
                "(expected config.json + model.safetensors written by save_pretrained)"
            )
        meta = read_json(cfg_path)
        model_type = meta.get("model_type") if isinstance(meta, dict) else None
        if model_type == "clipseg":
            raise ValueError(
                f"{cfg_path}: this is a raw CLIPSeg checkpoint (model_type 'clipseg'), not a T-Gated model; "
                "use it as model.backbone.source in a training config"
            )
        if model_type != "tgated":
            raise ValueError(
                f"{cfg_path}: model_type is {model_type!r}; expected 'tgated' (a model saved by tgated)"
            )
        version = meta.get("format_version", 0)
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"{cfg_path}: format_version={shorten(version)}; expected an integer")
        if version > FORMAT_VERSION:
            raise ValueError(
                f"{cfg_path}: format_version {meta.get('format_version')} is newer than this tgated "
                f"understands ({FORMAT_VERSION}); upgrade tgated"
            )
        for key in ("model", "clipseg", "weights_sha256"):
            if key not in meta:
                raise ValueError(
                    f"{cfg_path}: missing key {key!r}; the file is incomplete — re-save the model"
                )
        if isinstance(meta["model"], dict) and "conditioning" not in meta["model"]:
            meta["model"]["conditioning"] = "text"  # saved before the key existed: text conditioning
        _check_meta(meta, cfg_path)
        try:
            model_cfg = from_dict(ModelConfig, meta["model"])
        except ConfigError as exc:
            raise ValueError(f"{cfg_path}: {exc}") from None
        try:
            clip_cfg = CLIPSegConfig.from_dict(meta["clipseg"])
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ValueError(
                f"{cfg_path}: clipseg is not a CLIPSeg configuration ({shorten(str(exc))})"
            ) from None
        problems = _clipseg_problems(clip_cfg) + model_config_problems(
            model_cfg, width=int(clip_cfg.vision_config.hidden_size), saved=True
        )
        if problems:
            more = f" (and {len(problems) - 1} more problem(s))" if len(problems) > 1 else ""
            raise ValueError(f"{cfg_path}: {problems[0]}{more}; fix the file or re-save the model")
        # File names inside config.json are data: each must be a plain name inside the model folder.
        weights = safe_join(
            root, str(meta.get("weights", WEIGHTS_NAME)), what="weights file", source=cfg_path
        )
        if not weights.is_file():
            raise ValueError(
                f"{weights} is missing; the saved model is incomplete — re-save it with save_pretrained"
            )
        digest = sha256_file(weights)
        if digest != meta["weights_sha256"]:
            raise ValueError(
                f"{weights}: SHA-256 {digest[:16]}… does not match the {meta['weights_sha256'][:16]}… recorded in "
                f"{cfg_path}: the file was truncated or modified after saving — restore it or re-save the model"
            )
        try:
            state = load_file(str(weights), device="cpu")
        except (SafetensorError, OSError) as exc:
            raise ValueError(f"{weights}: not a readable safetensors file ({exc})") from None
        tokenizer = None
        if meta.get("tokenizer"):
            tok_dir = safe_join(root, str(meta["tokenizer"]), what="tokenizer folder", source=cfg_path)
            if not tok_dir.is_dir():
                raise ValueError(f"{tok_dir} is missing; the saved model is incomplete — re-save it")
            check_no_custom_code(tok_dir)
            tokenizer = AutoTokenizer.from_pretrained(
                str(tok_dir), local_files_only=True, trust_remote_code=False
            )
        try:
            with skip_init():
                model = cls(
                    model_cfg, build_clipseg(clip_cfg, init=False), tokenizer, note=f"loaded from {root}"
                )
        except (ValueError, TypeError, KeyError, AssertionError) as exc:
            # the architecture comes from the file: a message naming it, never a traceback
            raise ValueError(
                f"{cfg_path}: the model it describes cannot be built ({shorten(str(exc))})"
            ) from None
        try:
            result = model.load_state_dict(state, strict=False)
        except RuntimeError as exc:
            raise ValueError(
                f"{weights}: tensors do not fit the model in {cfg_path} ({str(exc)[:500]})"
            ) from None
        if result.missing_keys or result.unexpected_keys:
            raise ValueError(
                f"{weights}: tensors do not match the model described by {cfg_path} "
                f"(missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]})"
            )
        return model.to(device).eval()


def _check_init_source(config: ModelConfig, source: TGatedModel) -> None:
    """``model.init_from`` must have been trained on the same model grid and intensity mapping."""
    mine, theirs = to_dict(config.preprocess), to_dict(source.config.preprocess)
    diffs = [k for k in mine if k != "background_threshold" and mine[k] != theirs.get(k)]
    if diffs:
        listed = ", ".join(f"{k}: {theirs.get(k)!r} there, {mine[k]!r} here" for k in diffs)
        raise ValueError(
            f"model.init_from={config.init_from!r} was trained with other preprocessing ({listed}); "
            "use the same model.preprocess as the model it starts from"
        )


def _check_meta(meta: dict[str, Any], cfg_path: Path) -> None:
    """Types of the top-level fields of a saved model's ``config.json`` (values are data)."""
    sha = meta.get("weights_sha256")
    tok = meta.get("tokenizer")
    for key, ok, expected in (
        ("model", isinstance(meta.get("model"), dict), "a mapping (the model config)"),
        ("clipseg", isinstance(meta.get("clipseg"), dict), "a mapping (the CLIPSeg architecture)"),
        (
            "weights_sha256",
            isinstance(sha, str) and len(sha) == 64 and all(c in "0123456789abcdef" for c in sha),
            "the weights' SHA-256 (64 hexadecimal digits)",
        ),
        ("weights", isinstance(meta.get("weights", WEIGHTS_NAME), str), "a file name"),
        ("tokenizer", tok is None or isinstance(tok, str), "a folder name or null"),
    ):
        if not ok:
            raise ValueError(
                f"{cfg_path}: {key}={shorten(meta.get(key))}: expected {expected}; the file was edited or damaged "
                "— restore it or re-save the model"
            )


def _clipseg_problems(clip_cfg: Any) -> list[str]:
    """Sizes of a saved CLIPSeg architecture that are out of reason (building it would exhaust memory)."""
    out = []
    for part in ("vision_config", "text_config"):
        sub = getattr(clip_cfg, part)
        for key, high in (("hidden_size", 8192), ("intermediate_size", 32768), ("num_hidden_layers", 64)):
            value = getattr(sub, key, None)
            if not isinstance(value, int) or not 1 <= value <= high:
                out.append(f"clipseg.{part}.{key}={shorten(value)}: expected an integer in 1..{high}")
    vis = clip_cfg.vision_config
    for key, high in (("patch_size", 64), ("image_size", 2048)):
        value = getattr(vis, key, None)
        if not isinstance(value, int) or not 1 <= value <= high:
            out.append(f"clipseg.vision_config.{key}={shorten(value)}: expected an integer in 1..{high}")
    return out


def _check_batch_size(batch_size: int) -> None:
    if int(batch_size) < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


# --------------------------------------------------------------------------------------------
# tgated info
# --------------------------------------------------------------------------------------------


def model_info(path: str | os.PathLike, overrides: list[str] | None = None) -> dict[str, Any]:
    """What ``tgated info CONFIG_OR_RUN [--set k=v ...]`` prints.

    For a YAML config: the resolved config and parameter counts, built without weights (meta device:
    fast, no memory; a checkpoint that is not available locally is not downloaded, the built-in
    rd64-refined architecture is counted instead and ``note`` says so), and for a tiny random
    backbone the organ conditioning vectors' pairwise cosine similarity.

    For a saved model (model folder or run folder): its config and parameter counts, the
    conditioning similarity, and, from a run's ``log.csv``, the last epoch's adapter statistics
    (gate opening, temporal share per adapted layer) and validation Dice with and without the
    neighbours.
    """
    p = Path(path)
    if p.is_dir():
        if overrides:
            raise ValueError(f"--set applies to a config file; {p} is a saved model or run folder")
        from tgated.models.dynunet import DynUNetModel, saved_model_type

        if saved_model_type(p) == "dynunet":
            dyn = DynUNetModel.from_pretrained(p)
            return {"model": str(p), "config": to_dict(dyn.config), "parameters": dyn.parameter_counts()}
        model = TGatedModel.from_pretrained(p)
        out: dict[str, Any] = {
            "model": str(p),
            "config": to_dict(model.config),
            "parameters": model.parameter_counts(),
            "conditioning": model.conditioning_similarity(),
        }
        log = p / "log.csv"
        if log.is_file():
            import csv

            rows = list(csv.DictReader(log.read_text(encoding="utf-8").splitlines()))
            if rows:
                keep = ("epoch", "step", "val_dice", "val_dice_centre_only")
                last = rows[-1]
                out["last_epoch"] = {
                    k: v
                    for k, v in last.items()
                    if v not in ("", None) and (k in keep or k.startswith(("gate_open", "temporal_share")))
                }
        return out
    cfg = load_config(path, overrides)
    if cfg.model.model_type == "dynunet":
        from tgated.models.dynunet import DynUNetModel, kernels_and_strides

        with torch.device("meta"):
            dyn = DynUNetModel(cfg.model)
        kernels, strides = kernels_and_strides(cfg.model.dynunet.patch_size, cfg.model.dynunet.spacing)
        return {
            "config": to_dict(cfg),
            "parameters": dyn.parameter_counts(),
            "note": f"MONAI DynUNet, {len(strides)} levels, kernels {kernels}, strides {strides}",
        }
    try:
        check_model_config(cfg.model)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    model = TGatedModel.from_config(cfg.model, meta=True, local_files_only=True, fallback_to_random=True)
    notes = [model.note]
    if cfg.model.adapter == "none" and cfg.model.context != 1:
        notes.append(
            f"adapter: none is the single-slice baseline: context {cfg.model.context} is used as K=1"
        )
    if cfg.model.variant == "reference":
        notes.append(
            f"variant: reference adapts the final encoder layer ({model.num_encoder_layers - 1}) and feeds "
            "only it to the decoder; adapt_layers is not used"
        )
    info: dict[str, Any] = {
        "config": to_dict(cfg),
        "parameters": model.parameter_counts(),
        "note": "; ".join(notes),
    }
    if cfg.model.backbone.source == "random" and cfg.model.backbone.preset == "tiny" and not cfg.model.init_from:
        info["conditioning"] = TGatedModel.from_config(cfg.model).conditioning_similarity()
    else:
        notes.append(
            "conditioning similarity: shown for saved models (tgated info RUN) and tiny random backbones"
        )
        info["note"] = "; ".join(notes)
    return info
