"""The CLIPSeg backbone: architectures, tokenizers, loading.

* ``rd64`` is CIDAS/clipseg-rd64-refined written out in code: ViT-B/16 vision tower (hidden 768,
  12 layers, 12 heads, MLP 3072, 224-pixel position grid that is interpolated to the 352-pixel
  input), CLIP text tower (hidden 512, 12 layers, 8 heads, vocabulary 49408), projection 512,
  decoder reading layers 3/6/9 at reduce_dim 64 with 4 heads, MLP 2048, FiLM on the first decoder
  layer and the "refined" (complex transposed convolution) upsampler. HF's default
  ``CLIPSegConfig()`` is *not* this model (patch 32).
* ``tiny`` is a small random architecture built from :class:`tgated.config.BackboneConfig`'s size
  fields (patch 16) for tests and the CPU demo.
* Random architectures get a small word-level tokenizer over the organ prompts (no CLIP vocabulary
  is needed offline); checkpoints bring their own tokenizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tgated.config import BackboneConfig
from tgated.io.files import read_json
from tgated.organs import ORGANS

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "CIDAS/clipseg-rd64-refined"
PAD, BOS, UNK, EOS = "<pad>", "<|startoftext|>", "<unk>", "<|endoftext|>"
TINY_TEXT_POSITIONS = 32
"""Longest tokenised prompt (incl. start/end tokens) of the word-level tokenizer."""


@dataclass
class Backbone:
    """A CLIPSeg model, its tokenizer (``None`` for an architecture-only build) and how it was made."""

    model: Any  # transformers.CLIPSegForImageSegmentation
    tokenizer: Any | None
    note: str


def rd64_config(special_tokens: dict[str, int] | None = None) -> Any:
    """CIDAS/clipseg-rd64-refined's architecture as a ``CLIPSegConfig``.

    ``special_tokens`` (``bos_token_id``/``eos_token_id``/``pad_token_id``) override the CLIP ids
    (49406/49407/1) when the model is paired with the word-level tokenizer.
    """
    from transformers import CLIPSegConfig

    text = {
        "vocab_size": 49408,
        "hidden_size": 512,
        "intermediate_size": 2048,
        "num_hidden_layers": 12,
        "num_attention_heads": 8,
        "max_position_embeddings": 77,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
    text.update(special_tokens or {})
    vision = {
        "hidden_size": 768,
        "intermediate_size": 3072,
        "num_hidden_layers": 12,
        "num_attention_heads": 12,
        "num_channels": 3,
        "image_size": 224,
        "patch_size": 16,
        "hidden_act": "quick_gelu",
        "layer_norm_eps": 1e-5,
    }
    return CLIPSegConfig(
        text_config=text,
        vision_config=vision,
        projection_dim=512,
        logit_scale_init_value=2.6592,
        extract_layers=[3, 6, 9],
        reduce_dim=64,
        decoder_num_attention_heads=4,
        decoder_attention_dropout=0.0,
        decoder_hidden_act="quick_gelu",
        decoder_intermediate_size=2048,
        conditional_layer=0,
        use_complex_transposed_convolution=True,
    )


def tiny_config(bb: BackboneConfig, image_size: int, special_tokens: dict[str, int], vocab_size: int) -> Any:
    """A small random CLIPSeg (patch 16, or 8) from the ``BackboneConfig`` size fields.

    The vision position grid is ``bb.image_size`` (0 = the model input size ``image_size``); the
    text tower uses ``num_attention_heads`` heads and an MLP of 4 × ``text_hidden_size``; the
    decoder has 4 heads and an MLP of 4 × ``reduce_dim``.
    """
    from transformers import CLIPSegConfig

    heads = bb.num_attention_heads
    for name, width in (
        ("hidden_size", bb.hidden_size),
        ("text_hidden_size", bb.text_hidden_size),
    ):
        if width % heads:
            raise ValueError(
                f"model.backbone.{name}={width} is not divisible by num_attention_heads={heads}; "
                "choose sizes that are multiples of the head count"
            )
    if bb.reduce_dim % 4 or bb.reduce_dim < 4:
        raise ValueError(
            f"model.backbone.reduce_dim={bb.reduce_dim}: expected a multiple of 4 (4 decoder heads)"
        )
    if bb.patch_size not in (8, 16):
        raise ValueError(f"model.backbone.patch_size={bb.patch_size}: expected 8 or 16")
    bad = [i for i in bb.extract_layers if not 0 <= i < bb.num_hidden_layers]
    if bad or not bb.extract_layers:
        raise ValueError(
            f"model.backbone.extract_layers={bb.extract_layers}: expected indices in "
            f"0..{bb.num_hidden_layers - 1} (num_hidden_layers={bb.num_hidden_layers})"
        )
    grid = bb.image_size or image_size
    return CLIPSegConfig(
        text_config={
            "vocab_size": vocab_size,
            "hidden_size": bb.text_hidden_size,
            "intermediate_size": 4 * bb.text_hidden_size,
            "num_hidden_layers": bb.text_num_hidden_layers,
            "num_attention_heads": heads,
            "max_position_embeddings": TINY_TEXT_POSITIONS,
            "hidden_act": "quick_gelu",
            **special_tokens,
        },
        vision_config={
            "hidden_size": bb.hidden_size,
            "intermediate_size": bb.intermediate_size,
            "num_hidden_layers": bb.num_hidden_layers,
            "num_attention_heads": heads,
            "num_channels": 3,
            "image_size": grid,
            "patch_size": bb.patch_size,
            "hidden_act": "quick_gelu",
        },
        projection_dim=bb.projection_dim,
        extract_layers=list(bb.extract_layers),
        reduce_dim=bb.reduce_dim,
        decoder_num_attention_heads=4,
        decoder_intermediate_size=4 * bb.reduce_dim,
        conditional_layer=0,
        # CLIPSeg's two-stage upsampling multiplies by (patch / 4)², which is the patch size only for 16
        use_complex_transposed_convolution=bb.patch_size == 16,
    )


def _words(text: str) -> list[str]:
    return re.findall(r"\w+|[^\w\s]", text.lower())


def word_tokenizer(prompts: Iterable[str] = ()) -> Any:
    """A word-level tokenizer over the organ prompts (and ``prompts``), CLIP-style framing.

    Ids: ``<pad>`` 0, ``<|startoftext|>`` 1, ``<unk>`` 2, the words in sorted order, then
    ``<|endoftext|>`` last. Lower-cases and splits on whitespace and punctuation; unknown words
    become ``<unk>``. Returned as a ``PreTrainedTokenizerFast`` (saved with the model).
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for p in [*(o.prompt for o in ORGANS), *prompts] for w in _words(p)})
    vocab = {PAD: 0, BOS: 1, UNK: 2}
    for w in words:
        vocab.setdefault(w, len(vocab))
    vocab[EOS] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", special_tokens=[(BOS, vocab[BOS]), (EOS, vocab[EOS])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        model_max_length=TINY_TEXT_POSITIONS,
    )


def _special_ids(tokenizer: Any) -> dict[str, int]:
    return {
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with ``torch.manual_seed(seed)`` without disturbing the global CPU RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def skip_init() -> Iterator[None]:
    """Build transformers models without initialising weights (they are loaded right after)."""
    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # pragma: no cover - older transformers
        yield
        return
    with no_init_weights():
        yield


RANDOM_FOREGROUND_PRIOR = 0.02
"""Initial foreground probability of a randomly initialised decoder (see :func:`build_clipseg`)."""


def decoder_output_layer(model: Any) -> nn.ConvTranspose2d:
    """The CLIPSeg decoder's last upsampling layer (its bias sets the logits' starting level)."""
    up = model.decoder.transposed_convolution
    return up[-1] if isinstance(up, nn.Sequential) else up


def build_clipseg(config: Any, *, meta: bool = False, seed: int = 0, init: bool = True) -> Any:
    """``CLIPSegForImageSegmentation(config)``: on the meta device (architecture only), with
    random weights from ``seed``, or uninitialised (``init=False``, for loading weights).

    Random weights use transformers' CLIPSeg init, except that the decoder's FiLM, reduce and
    upsampling layers get PyTorch's default (fan-in) init, and the bias of the last upsampling layer
    starts at the logit of :data:`RANDOM_FOREGROUND_PRIOR`: an organ covers a few percent of a slice,
    so starting at p = 0.5 everywhere spends the first hundreds of steps learning "mostly background"
    before the Dice term can act (the prior initialisation of Lin et al., *Focal Loss*, 2017).
    """
    from transformers import CLIPSegForImageSegmentation

    if meta:
        with torch.device("meta"):
            return CLIPSegForImageSegmentation(config)
    if not init:
        with skip_init():
            return CLIPSegForImageSegmentation(config)
    with seeded(seed):
        model = CLIPSegForImageSegmentation(config)
        # transformers' generic init draws the decoder's FiLM, reduce and upsampling weights with
        # std = initializer_factor (1.0), which makes random logits explode (|logit| ~ 1e2-1e3);
        # use PyTorch's default fan-in init for them, as the original CLIPSeg code did.
        for name, module in model.decoder.named_modules():
            if not name.startswith("layers.") and isinstance(
                module, (nn.Linear, nn.Conv2d, nn.ConvTranspose2d)
            ):
                module.reset_parameters()
        with torch.no_grad():
            decoder_output_layer(model).bias.fill_(
                math.log(RANDOM_FOREGROUND_PRIOR / (1 - RANDOM_FOREGROUND_PRIOR))
            )
        return model


CODE_KEYS = ("auto_map",)
"""Keys of a checkpoint's JSON files that ask transformers to import Python code from the folder."""


def check_no_custom_code(
    folder: str | Path, names: Iterable[str] = ("config.json", "tokenizer_config.json")
) -> None:
    """Refuse a checkpoint folder whose JSON files declare custom code (``auto_map``).

    tgated loads every checkpoint with ``trust_remote_code=False`` (and the concrete CLIPSeg classes,
    which never import code from a folder); this check turns transformers' refusal into an error
    that names the file. Python files in the folder are never imported.
    """
    for name in names:
        f = Path(folder) / name
        if not f.is_file():
            continue
        meta = read_json(f)
        found = [k for k in CODE_KEYS if isinstance(meta, dict) and k in meta]
        if found:
            raise ValueError(
                f"{f}: declares custom code ({found[0]}: {json.dumps(meta[found[0]])[:120]}); tgated never runs "
                "code from a model folder (trust_remote_code=False) — use a standard CLIPSeg checkpoint or "
                "re-save the model"
            )


def _looks_like_path(source: str) -> bool:
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def _check_checkpoint_dir(path: Path) -> None:
    cfg = path / "config.json"
    if not cfg.is_file():
        raise FileNotFoundError(
            f"backbone source {str(path)!r} has no config.json; expected a CLIPSeg checkpoint directory "
            "(config.json + model.safetensors + tokenizer files) or a hub id such as "
            f"{DEFAULT_SOURCE!r}"
        )
    try:
        model_type = json.loads(cfg.read_text(encoding="utf-8")).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError, RecursionError) as exc:
        raise ValueError(f"{cfg}: not a valid JSON config ({exc})") from None
    if model_type == "tgated":
        raise ValueError(
            f"backbone source {str(path)!r} is a saved T-Gated model, not a CLIPSeg checkpoint; "
            "load it with TGatedModel.from_pretrained"
        )
    if model_type != "clipseg":
        raise ValueError(
            f"{cfg}: model_type is {model_type!r}; expected 'clipseg' (a CLIPSegForImageSegmentation checkpoint)"
        )
    check_no_custom_code(path)


def random_backbone(
    bb: BackboneConfig, image_size: int, prompts: Iterable[str] = (), *, meta: bool = False
) -> Backbone:
    """The ``preset`` architecture with random weights (seeded by ``bb.seed``) and a word tokenizer."""
    tokenizer = word_tokenizer(prompts)
    special = _special_ids(tokenizer)
    if bb.preset == "rd64":
        config = rd64_config(special)
    elif bb.preset == "tiny":
        config = tiny_config(bb, image_size, special, vocab_size=len(tokenizer))
    else:  # config.py restricts the values; kept for direct callers
        raise ValueError(f"model.backbone.preset {bb.preset!r}: expected 'rd64' or 'tiny'")
    model = build_clipseg(config, meta=meta, seed=bb.seed)
    return Backbone(
        model, tokenizer, f"random weights (backbone.source: random, preset {bb.preset}, seed {bb.seed})"
    )


def load_backbone(
    bb: BackboneConfig,
    image_size: int,
    prompts: Iterable[str] = (),
    *,
    meta: bool = False,
    local_files_only: bool = False,
    fallback_to_random: bool = False,
) -> Backbone:
    """Load (or build) the CLIPSeg backbone named by ``bb.source``.

    ``source: random`` builds ``bb.preset`` with random weights. Otherwise ``source`` is a local
    checkpoint directory or a hub id; with ``meta`` only its config is read and the architecture
    is built on the meta device (parameter counts without weights). With ``fallback_to_random``, an
    unavailable checkpoint is replaced by the ``rd64`` architecture (architecture only when
    ``meta``), which the returned ``note`` says (and a warning is logged).
    """
    if bb.source == "random":
        return random_backbone(bb, image_size, prompts, meta=meta)
    from transformers import AutoTokenizer, CLIPSegConfig, CLIPSegForImageSegmentation

    path = Path(bb.source).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ValueError(
                f"backbone source {bb.source!r} is a file; expected a CLIPSeg checkpoint directory or a hub id"
            )
        _check_checkpoint_dir(path)
        source = str(path)
    elif _looks_like_path(bb.source):
        raise FileNotFoundError(
            f"backbone source {bb.source!r} does not exist; expected a CLIPSeg checkpoint directory, "
            f"a hub id such as {DEFAULT_SOURCE!r}, or 'random'"
        )
    else:
        source = bb.source
    try:
        # Safe loading: concrete classes (never code from the checkpoint), trust_remote_code=False
        # for the tokenizer's Auto class, and transformers' torch.load (a .bin file) with weights_only.
        if meta:
            config = CLIPSegConfig.from_pretrained(
                source, local_files_only=local_files_only, trust_remote_code=False
            )
            model = build_clipseg(config, meta=True)
            return Backbone(model, None, f"architecture from {source} (weights not loaded)")
        model = CLIPSegForImageSegmentation.from_pretrained(
            source,
            local_files_only=local_files_only,
            dtype=torch.float32,
            trust_remote_code=False,
            weights_only=True,
        )
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=local_files_only, trust_remote_code=False
        )
    except OSError as exc:
        if not fallback_to_random:
            raise OSError(
                f"could not load the CLIPSeg backbone {bb.source!r} ({str(exc).splitlines()[0]}). Download it "
                "once with network access, set model.backbone.source to a local checkpoint directory, or "
                "use model.backbone.source=random for random weights"
            ) from exc
        what = (
            "counted the built-in rd64-refined architecture (no weights)"
            if meta
            else ("built the rd64-refined architecture with random weights instead")
        )
        note = f"checkpoint {bb.source!r} is not available offline; {what}"
        logger.warning(note)
        rnd = random_backbone(
            BackboneConfig(source="random", preset="rd64", seed=bb.seed), image_size, prompts, meta=meta
        )
        return Backbone(rnd.model, rnd.tokenizer, note)
    return Backbone(model, tokenizer, f"pretrained weights from {source}")
