"""End-to-end training on phantoms with a tiny random CLIPSeg: loss, run folder, CLI, resume, token cache."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch

from tests.training.conftest import TINY_CONFIG, no_dropout
from tgated.config import dump_yaml
from tgated.io.files import is_temporary
from tgated.training import TrainResult, train
from tgated.training.checkpoint import load_checkpoint


def log_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "log.csv", newline="") as fh:
        return list(csv.DictReader(fh))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / "checkpoints" / "last.pt")["model"]


def test_short_run_decreases_the_loss(tiny_cfg, tmp_path):
    """100 steps on the liver (frozen tiny backbone): the loss falls well below its start, past the
    early phase that only learns "background", and the validation volume's liver is found."""
    cfg = tiny_cfg(
        "model.organs=[liver]",
        "train.epochs=4",
        "train.steps_per_epoch=25",
        "train.augment=false",
        "train.lr_adapter=1e-2",
        "train.lr_decoder=1e-2",
        "train.warm_restart_epochs=4",
        "train.val_every=4",
    )
    result = train(cfg, out=tmp_path / "run", quiet=True)
    rows = log_rows(tmp_path / "run")
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3, 4]
    assert [int(r["step"]) for r in rows] == [25, 50, 75, 100]
    first, last = float(rows[0]["loss"]), float(rows[-1]["loss"])
    assert last < first - 0.3, (first, last)
    # validation only at the 4th (= last) epoch
    assert [r["val_dice"] != "" for r in rows] == [False, False, False, True]
    assert float(rows[-1]["val_dice"]) > 0.3
    assert result.finished and result.steps == 100 and result.best_epoch == 4
    # the schedule: cosine over 4 epochs from the base learning rate
    assert float(rows[0]["lr_adapter"]) < 1e-2 and float(rows[-1]["lr_adapter"]) < float(
        rows[0]["lr_adapter"]
    )
    assert rows[0]["lr_backbone"] == ""  # frozen backbone: no group


def test_run_folder_layout_cli_and_refusal(phantom_root, tmp_path, capsys):
    from tgated.cli import main
    from tgated.models.tgated import TGatedModel

    run = tmp_path / "run"
    args = ["train", str(TINY_CONFIG), "--out", str(run), "--set", f"data.root={phantom_root}"]
    fast = ["--set", "train.epochs=1", "--set", "train.steps_per_epoch=2", "--set", "train.batch_size=4"]
    assert main([*args, *fast, "--quiet"]) == 0
    for name in (
        "config.yaml",
        "splits.json",
        "environment.json",
        "log.csv",
        "val.json",
        "checkpoints/last.pt",
        "model/config.json",
    ):
        assert (run / name).is_file(), name
    model = TGatedModel.from_pretrained(run / "model")
    assert model.context == 3
    splits = json.loads((run / "splits.json").read_text())
    assert [len(splits[k]) for k in ("train", "val", "test")] == [2, 1, 1]
    val = json.loads((run / "val.json").read_text())
    assert val["best"]["epoch"] == 1 and val["latest"] == val["best"]
    assert set(val["best"]["organs"]) <= {o.name for o in model.organs}
    assert all(0.0 <= v["dice"] <= 1.0 and v["n"] == 1 for v in val["best"]["organs"].values())
    assert "train:\n  epochs: 1\n" in (run / "config.yaml").read_text()
    # a second run into the same folder is refused ...
    capsys.readouterr()
    assert main([*args, *fast, "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "run folder is not empty" in err and "--resume" in err
    # ... and resuming the finished run is a no-op that reports the same result
    result = train(
        TINY_CONFIG, out=run, overrides=[f"data.root={phantom_root}", *fast[1::2]], resume=True, quiet=True
    )
    assert isinstance(result, TrainResult) and result.epochs == 1 and result.run_dir == run


@pytest.mark.filterwarnings("ignore:This DataLoader will create")  # more workers than a CI machine's cores
def test_resume_continues_exactly(tiny_cfg, tmp_path):
    """An interrupted run (stopped mid-epoch by max_steps), resumed, ends with the same weights and log
    as an uninterrupted one: augmentation, dropout, gradient accumulation and validation on. The
    interrupted part prepares its batches in 2 worker processes, the rest and the uninterrupted run
    in the training process: the batches do not depend on where they are made."""
    base = [
        "train.epochs=2",
        "train.steps_per_epoch=3",
        "train.batch_size=2",
        "train.grad_accum=2",
        "train.checkpoint_every=2",
    ]
    full = train(tiny_cfg(*base), out=tmp_path / "full", quiet=True)
    part = train(
        tiny_cfg(*base, "train.max_steps=4", "train.num_workers=2"), out=tmp_path / "part", quiet=True
    )
    assert not part.finished and part.steps == 4 and part.epochs == 1
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["pos"], ckpt["step"]) == (1, 2, 4)  # mid-epoch 2: 2 of 6 batches done
    done = train(tiny_cfg(*base), out=tmp_path / "part", resume=True, quiet=True)
    assert done.finished and done.steps == full.steps == 6
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    assert a.keys() == b.keys()
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in log_rows(tmp_path / "full")]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in log_rows(tmp_path / "part")]
    assert done.best_dice == full.best_dice


REFERENCE_RECIPE = [
    "model.variant=reference",
    "model.train_backbone=true",
    "model.train_text=true",
    "model.conditioning=text",
    "model.adapter_config.temporal_out_init=normal",
    "model.adapter_config.spatial_out_init=normal",
    "model.adapter_config.attention_init=xavier",
    "train.lr_adapter=5e-3",
    "train.lr_decoder=1e-3",
    "train.lr_backbone=1e-4",
    "train.lr_text=1e-4",
    "train.schedule_step=epoch",
    "train.warm_restart_epochs=2",
    "train.min_lr=1e-5",
    "train.min_lr_ratio=0.0",
    "train.negatives=label_free",
    "train.negative_fraction=0.3",
    "train.flip_lr=0.5",
    "train.flip_lateral=skip",
    "train.rotate_deg=5.0",
    "train.scale=0.0",
    "train.intensity=0.0",
]
"""The published recipe's keys on the tiny model (its rates scaled up so that a few steps show)."""


def test_reference_recipe_resumes_exactly_and_follows_the_epoch_schedule(tiny_cfg, tmp_path):
    """The published recipe's keys together (trained text and vision towers, per-epoch schedule with
    an absolute minimum, label-free negatives, the published flip rule and initialisations): a run
    interrupted mid-epoch and resumed ends with the same weights and log as an uninterrupted one, and
    each epoch's rates are PyTorch's warm-restart values."""
    base = [*REFERENCE_RECIPE, "train.epochs=3", "train.steps_per_epoch=2", "train.batch_size=2",
            "train.checkpoint_every=1", "train.val_every=3"]
    full = train(tiny_cfg(*base), out=tmp_path / "full", quiet=True)
    part = train(tiny_cfg(*base, "train.max_steps=3"), out=tmp_path / "part", quiet=True)
    assert not part.finished and part.steps == 3
    ckpt = load_checkpoint(tmp_path / "part" / "checkpoints" / "last.pt")
    assert (ckpt["epoch"], ckpt["pos"], ckpt["step"]) == (1, 1, 3)  # mid-epoch 2
    done = train(tiny_cfg(*base), out=tmp_path / "part", resume=True, quiet=True)
    assert done.finished and done.steps == full.steps == 6
    a, b = weights(tmp_path / "full"), weights(tmp_path / "part")
    worst = max((a[k].float() - b[k].float()).abs().max().item() for k in a)
    assert worst <= 1e-6
    rows = log_rows(tmp_path / "full")
    strip = [{k: v for k, v in r.items() if k != "time_s"} for r in rows]
    assert strip == [{k: v for k, v in r.items() if k != "time_s"} for r in log_rows(tmp_path / "part")]
    # per-epoch rates: epoch 1 at the base, epoch 2 half-way to min_lr, epoch 3 restarted
    for group, base_lr in (("adapter", 5e-3), ("decoder", 1e-3), ("backbone", 1e-4), ("text", 1e-4)):
        got = [float(r[f"lr_{group}"]) for r in rows]
        assert got == pytest.approx([base_lr, 1e-5 + (base_lr - 1e-5) * 0.5, base_lr], rel=1e-9), group
    # both towers trained: their weights left the initial values
    from tgated.models.tgated import TGatedModel

    init = TGatedModel.from_config(tiny_cfg(*base).model).state_dict()
    for prefix in ("backbone.clip.text_model.encoder.", "backbone.clip.vision_model.encoder."):
        keys = [k for k in a if k.startswith(prefix)]
        assert keys and all(not torch.equal(a[k], init[k]) for k in keys), prefix
    assert torch.equal(a["backbone.clip.text_projection.weight"], init["backbone.clip.text_projection.weight"])


def test_trained_text_tower_with_cached_vision_tokens(tiny_cfg, tmp_path):
    """A frozen vision tower's token cache stays exact while the text tower trains: cached and
    uncached runs give the same losses and weights, and the text weights change."""
    common = ["train.augment=false", "train.epochs=1", "train.steps_per_epoch=3", *no_dropout(),
              "model.conditioning=text", "model.train_text=true", "train.lr_text=1e-2", "train.val_every=5"]
    off = train(tiny_cfg(*common, "train.cache_tokens='off'"), out=tmp_path / "off", quiet=True)
    mem = train(tiny_cfg(*common, "train.cache_tokens=auto"), out=tmp_path / "memory", quiet=True)
    loss_off, loss_mem = (float(log_rows(r.run_dir)[0]["loss"]) for r in (off, mem))
    assert loss_mem == pytest.approx(loss_off, abs=1e-5)
    a, b = weights(off.run_dir), weights(mem.run_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    from tgated.models.tgated import TGatedModel

    init = TGatedModel.from_config(tiny_cfg(*common).model).state_dict()
    key = "backbone.clip.text_model.encoder.layers.0.mlp.fc1.weight"
    assert (b[key] - init[key]).abs().max() > 1e-4
    assert float(log_rows(mem.run_dir)[0]["lr_text"]) > 0


def test_run_records_its_environment_and_a_resume_elsewhere_warns(tiny_cfg, tmp_path, caplog):
    """``environment.json`` holds the installed versions and the thread count; a resume under other
    versions or another thread count names them in a warning and keeps the run's own record."""
    from importlib import metadata

    run = tmp_path / "run"
    train(tiny_cfg("train.epochs=1", "train.steps_per_epoch=1"), out=run, quiet=True)
    env = json.loads((run / "environment.json").read_text())
    assert env["packages"]["torch"] == metadata.version("torch")
    assert env["packages"]["transformers"] == metadata.version("transformers")
    assert env["torch_threads"] == torch.get_num_threads() and env["device"] == "cpu" and env["processes"] == 1
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability() and env["cpu"]
    started = {**env, "packages": {**env["packages"], "transformers": "4.0.0"}, "torch_threads": 97}
    (run / "environment.json").write_text(json.dumps(started))
    with caplog.at_level("WARNING", logger="tgated"):
        train(tiny_cfg("train.epochs=2", "train.steps_per_epoch=1"), out=run, resume=True, quiet=True)
    warned = [r.getMessage() for r in caplog.records if "another environment" in r.getMessage()]
    assert len(warned) == 1
    assert f"packages.transformers 4.0.0 -> {env['packages']['transformers']}" in warned[0]
    assert f"torch_threads 97 -> {env['torch_threads']}" in warned[0] and "platform" not in warned[0]
    assert json.loads((run / "environment.json").read_text()) == started
    caplog.clear()
    with caplog.at_level("WARNING", logger="tgated"):
        (run / "environment.json").write_text(json.dumps(env))
        train(tiny_cfg("train.epochs=3", "train.steps_per_epoch=1"), out=run, resume=True, quiet=True)
    assert not [r for r in caplog.records if "another environment" in r.getMessage()]


def test_resume_checks_the_config_and_the_checkpoint(tiny_cfg, tmp_path):
    run = tmp_path / "run"
    train(tiny_cfg("train.epochs=1", "train.steps_per_epoch=1"), out=run, quiet=True)
    with pytest.raises(ValueError, match=r"train.lr_adapter: run has 0.001, given 0.5"):
        train(
            tiny_cfg("train.epochs=1", "train.steps_per_epoch=1", "train.lr_adapter=0.5"),
            out=run,
            resume=True,
        )
    with pytest.raises(ValueError, match="run folder is not empty"):
        train(tiny_cfg("train.epochs=1", "train.steps_per_epoch=1"), out=run)
    # more epochs is a legitimate continuation
    more = train(tiny_cfg("train.epochs=2", "train.steps_per_epoch=1"), out=run, resume=True, quiet=True)
    assert more.epochs == 2 and more.steps == 2
    ckpt = run / "checkpoints" / "last.pt"
    data = bytearray(ckpt.read_bytes())
    ckpt.write_bytes(bytes(data[: len(data) - 100]))
    with pytest.raises(ValueError, match=r"last\.pt: not a readable checkpoint"):
        train(tiny_cfg("train.epochs=3", "train.steps_per_epoch=1"), out=run, resume=True)
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="not a tgated run folder"):
        train(tiny_cfg(), out=tmp_path / "other", resume=True)


@pytest.mark.parametrize(
    ("override", "fragment"),
    [
        ("train.batch_size=0", "train.batch_size=0: expected an integer >= 1"),
        ("train.negative_fraction=1.0", "train.negative_fraction=1.0"),
        ("train.precision=fp16", "needs CUDA"),
        ("train.cache_tokens=memory", "cannot be cached"),
        ("data.root=", "data.root=''"),
        ("train.organ_weights={pancreaz: 3}", "Did you mean 'pancreas'"),
        ("train.num_workers=-1", "train.num_workers=-1: expected an integer >= 0 or auto"),
        ("train.num_workers=many", "expected int | 'auto'"),
        ("train.dice_smooth=0", r"train.dice_smooth=0.0: expected a positive smoothing constant"),
        ("train.min_lr=0.01", r"train.min_lr=0.01: expected at most every learning rate in use, but "
         r"train.lr_decoder=0.001 is lower"),
        ("model.train_text=true", r"model.train_text=true with model.conditioning='learned'"),
    ],
)
def test_bad_training_settings_are_errors(tiny_cfg, tmp_path, override, fragment):
    extra = ["model.train_backbone=true"] if "cache_tokens" in override else []
    with pytest.raises(ValueError, match=fragment):
        train(tiny_cfg(override, *extra), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()


def test_token_cache_gives_the_uncached_losses(tiny_cfg, tmp_path):
    common = ["train.augment=false", "train.epochs=1", "train.steps_per_epoch=4", *no_dropout()]
    off = train(tiny_cfg(*common, "train.cache_tokens='off'"), out=tmp_path / "off", quiet=True)
    mem = train(tiny_cfg(*common, "train.cache_tokens=auto"), out=tmp_path / "memory", quiet=True)
    disk = train(tiny_cfg(*common, "train.cache_tokens=disk"), out=tmp_path / "disk", quiet=True)
    losses = [float(log_rows(r.run_dir)[0]["loss"]) for r in (off, mem, disk)]
    assert losses[1] == pytest.approx(losses[0], abs=1e-5) and losses[2] == pytest.approx(losses[0], abs=1e-5)
    a, b = weights(off.run_dir), weights(mem.run_dir)
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert not any(p.name.startswith(".token-cache") for p in disk.run_dir.iterdir())  # scratch removed


def test_physical_context_and_flip_train(tiny_cfg, tmp_path):
    cfg = tiny_cfg(
        "model.context_mode=physical",
        "model.context_step_mm=4.0",
        "train.epochs=1",
        "train.steps_per_epoch=2",
    )
    (tmp_path / "cfg.yaml").write_text(dump_yaml(cfg))
    result = train(tmp_path / "cfg.yaml", out=tmp_path / "run", quiet=True)
    assert result.finished and (tmp_path / "run" / "model" / "model.safetensors").is_file()


def test_empty_label_maps_are_an_error_before_anything_is_written(tiny_cfg, phantom_root, tmp_path):
    """Label maps without a voxel of the model's organs: one error naming the dataset and the organs,
    and no run folder."""
    import shutil

    import nibabel as nib
    import numpy as np

    root = tmp_path / "empty"
    shutil.copytree(phantom_root, root)
    for f in (root / "labels").glob("*.nii.gz"):
        img = nib.load(f)
        nib.save(nib.Nifti1Image(np.zeros(img.shape, np.uint8), img.affine, img.header), f)
    with pytest.raises(ValueError, match=r"empty: the training cases hold no voxels of the model's organs \(liver"):
        train(tiny_cfg(f"data.root={root}"), out=tmp_path / "run", quiet=True)
    assert not (tmp_path / "run").exists()

    # organs restricted to ones the labels lack: the same error, naming only those organs
    with pytest.raises(ValueError, match=r"hold no voxels of the model's organs \(spleen\)"):
        train(tiny_cfg(f"data.root={root}", "model.organs=[spleen]"), out=tmp_path / "run", quiet=True)


def test_ctrl_c_says_how_to_resume(tmp_path, capsys, monkeypatch):
    """Ctrl-C in tgated train: exit code 130 and the command that continues the run."""
    import tgated.training
    from tgated.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(tgated.training, "train", interrupted)
    assert main(["train", "cfg.yaml", "--out", str(tmp_path / "run"), "--quiet"]) == 130
    err = capsys.readouterr().err
    assert f"continue with tgated train cfg.yaml --out {tmp_path / 'run'} --resume" in err


def test_resume_removes_leftovers_of_a_killed_write(tiny_cfg, tmp_path):
    """A kill during an atomic write leaves ``.NAME.tmp-*`` (a file, or a folder for model/): resuming
    removes them; the complete files stay."""
    run = tmp_path / "run"
    train(tiny_cfg("train.epochs=1", "train.steps_per_epoch=1"), out=run, quiet=True)
    leftovers = [run / "checkpoints" / ".last.pt.tmp-x1", run / ".log.csv.tmp-x2", run / ".model.tmp-x3"]
    leftovers[0].write_bytes(b"half")
    leftovers[1].write_text("half")
    leftovers[2].mkdir()
    (leftovers[2] / "config.json").write_text("{")
    result = train(tiny_cfg("train.epochs=2", "train.steps_per_epoch=1"), out=run, resume=True, quiet=True)
    assert result.epochs == 2
    assert not any(p.exists() for p in leftovers)
    assert not any(is_temporary(p) for p in run.rglob("*"))
