"""Safe loading and safe writing: no code from model folders, no pickles, names from data cannot
leave the output folder, and every file the package writes goes through an atomic writer.

The source scans read the package's syntax tree, so a new ``torch.load`` / ``from_pretrained`` /
file write anywhere under ``src/tgated`` is checked as soon as it is added.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest

from tests.models.conftest import tiny_model_config
from tgated.config import BackboneConfig
from tgated.io.files import remove_stale_temporaries, safe_join, safe_name
from tgated.models.tgated import TGatedModel

SRC = Path(__file__).resolve().parents[2] / "src" / "tgated"
OUR_LOADERS = {"TGatedModel", "DynUNetModel", "cls"}  # our own from_pretrained: safetensors + checksum, no code


def _modules() -> list[tuple[str, ast.Module]]:
    return [
        (str(p.relative_to(SRC)), ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(SRC.rglob("*.py"))
    ]


def _calls(tree: ast.AST):
    """(call, name, receiver) for every call: ``name`` is the called attribute or function, ``receiver``
    the name left of the dot ("" for a plain function, "?" for an expression such as ``f().g()``)."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute):
                recv = f.value
                base = (
                    recv.id
                    if isinstance(recv, ast.Name)
                    else recv.attr
                    if isinstance(recv, ast.Attribute)
                    else "?"
                )
                yield node, f.attr, base
            elif isinstance(f, ast.Name):
                yield node, f.id, ""


def _kw(call: ast.Call, name: str):
    for k in call.keywords:
        if k.arg == name:
            return k.value.value if isinstance(k.value, ast.Constant) else "<expr>"
    return "<absent>"


def test_weights_never_come_from_pickles_or_remote_code():
    problems = []
    for rel, tree in _modules():
        for call, name, base in _calls(tree):
            where = f"{rel}:{call.lineno}"
            if name == "load" and base == "torch" and _kw(call, "weights_only") is not True:
                problems.append(f"{where}: torch.load without weights_only=True")
            if (
                name == "from_pretrained"
                and base not in OUR_LOADERS
                and _kw(call, "trust_remote_code") is not False
            ):
                problems.append(f"{where}: {base}.from_pretrained without trust_remote_code=False")
            if _kw(call, "trust_remote_code") is True:
                problems.append(f"{where}: trust_remote_code=True")
            if (
                name == "load"
                and base in ("np", "numpy")
                and _kw(call, "allow_pickle") not in ("<absent>", False)
            ):
                problems.append(f"{where}: np.load with allow_pickle")
            if name == "load" and base == "yaml":
                problems.append(f"{where}: yaml.load (use yaml.safe_load)")
            if name in ("eval", "exec") and not base:
                problems.append(f"{where}: {name}()")
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + (
                    [node.module] if isinstance(node, ast.ImportFrom) else []
                )
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                    problems.append(f"{rel}:{node.lineno}: imports a pickle library")
    assert not problems, "\n".join(problems)


# Writes outside an atomic writer, each with the reason it is safe.
ALLOWED_WRITES = {
    ("inference/provenance.py", "open"): "the provenance lock file: opened for locking, never holds data",
    ("data/examples.py", "open"): "the download goes into a temporary folder that is renamed into place",
    (
        "data/examples.py",
        "write_text",
    ): "the completion marker, written after the folder is renamed into place",
}
WRITERS = {
    "write_text",
    "write_bytes",
    "save",
    "savez",
    "savez_compressed",
    "savefig",
    "save_file",
    "to_csv",
    "WriteImage",
}


def _inside_atomic_block(parents: dict, node: ast.AST) -> bool:
    while node in parents:
        node = parents[node]
        if isinstance(node, ast.With):
            for item in node.items:
                ctx = item.context_expr
                if (
                    isinstance(ctx, ast.Call)
                    and getattr(ctx.func, "id", getattr(ctx.func, "attr", "")) == "atomic_path"
                ):
                    return True
                if isinstance(ctx, ast.Call) and getattr(ctx.func, "attr", "") == "TemporaryDirectory":
                    return True
    return False


def test_every_file_write_is_atomic():
    problems = []
    for rel, tree in _modules():
        if rel == "io/files.py":  # the atomic writers themselves
            continue
        parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}
        for call, name, base in _calls(tree):
            if name == "open" and not base:
                mode = (
                    call.args[1].value
                    if len(call.args) > 1 and isinstance(call.args[1], ast.Constant)
                    else _kw(call, "mode")
                )
                mode = "r" if mode == "<absent>" else mode
                writes = not isinstance(mode, str) or any(c in mode for c in "wax+")
            else:
                writes = name in WRITERS and not (name == "save" and base not in ("torch", "nib", "np"))
            if writes and not _inside_atomic_block(parents, call) and (rel, name) not in ALLOWED_WRITES:
                problems.append(
                    f"{rel}:{call.lineno}: {base + '.' if base else ''}{name}() outside atomic_path"
                )
    assert not problems, "\n".join(problems)


# ---------------------------------------------------------------------------------------------
# model folders that ask for code
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def saved(tmp_path):
    return TGatedModel.from_config(tiny_model_config()).save_pretrained(tmp_path / "model")


def _plant_code(folder: Path, json_name: str, marker: Path) -> None:
    cfg_path = folder / json_name
    cfg = json.loads(cfg_path.read_text())
    cfg["auto_map"] = {
        "AutoTokenizer": ["evil.EvilTokenizer", "evil.EvilTokenizer"],
        "AutoConfig": "evil.Cfg",
    }
    cfg["tokenizer_class"] = "EvilTokenizer"
    cfg_path.write_text(json.dumps(cfg))
    (folder / "evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")


def test_saved_model_whose_tokenizer_asks_for_code_is_refused(saved, tmp_path):
    marker = tmp_path / "code_ran"
    _plant_code(saved / "tokenizer", "tokenizer_config.json", marker)
    with pytest.raises(
        ValueError, match=r"tokenizer_config.json: declares custom code \(auto_map.*never runs code"
    ):
        TGatedModel.from_pretrained(saved)
    assert not marker.exists()


def test_backbone_checkpoint_that_asks_for_code_is_refused(tmp_path):
    base = TGatedModel.from_config(tiny_model_config())
    clip_dir = tmp_path / "clipseg"
    base.backbone.save_pretrained(clip_dir)
    base.tokenizer.save_pretrained(clip_dir)
    marker = tmp_path / "code_ran"
    _plant_code(clip_dir, "config.json", marker)
    cfg = tiny_model_config()
    cfg.backbone = BackboneConfig(source=str(clip_dir))
    with pytest.raises(ValueError, match=r"clipseg/config.json: declares custom code"):
        TGatedModel.from_config(cfg)
    assert not marker.exists()


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        (
            "weights",
            "../elsewhere/model.safetensors",
            "weights file '../elsewhere/model.safetensors' contains a path separator",
        ),
        ("weights", "/etc/passwd", "weights file '/etc/passwd' contains a path separator"),
        ("tokenizer", "..", "tokenizer folder '..' is a relative folder reference"),
    ],
)
def test_file_names_in_a_saved_config_stay_in_the_model_folder(saved, key, value, fragment):
    meta = json.loads((saved / "config.json").read_text())
    meta[key] = value
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"config.json: {fragment}"):
        TGatedModel.from_pretrained(saved)


# ---------------------------------------------------------------------------------------------
# names from data
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["case_001", "FLARE22_Tr_0001", "amos_0507", "s0001", "a.b-c", "ünïcode"])
def test_plain_names_are_accepted(tmp_path, name):
    assert safe_join(tmp_path, f"{name}.nii.gz") == tmp_path / f"{name}.nii.gz"


@pytest.mark.parametrize(
    ("name", "problem"),
    [
        ("", "is empty"),
        (".", "is a relative folder reference"),
        ("..", "is a relative folder reference"),
        ("../x.nii.gz", "contains a path separator"),
        ("a/b", "contains a path separator"),
        ("a\\b", "contains a path separator"),
        ("/abs.nii.gz", "contains a path separator"),
        (".hidden.nii.gz", "starts with a dot"),
        ("nul\x00byte", "contains control characters"),
    ],
)
def test_names_that_could_leave_the_folder_are_refused(name, problem):
    with pytest.raises(ValueError, match=rf"^src.json: case id .* {problem}.*; expected a plain file name"):
        safe_name(name, what="case id", source="src.json")


def test_stale_temporaries_of_named_targets_only(tmp_path):
    names = ["a.nii.gz", "b[1].nii.gz", "c.nii.gz"]
    for n in names:
        (tmp_path / n).write_bytes(b"complete")
        (tmp_path / f".{n}.tmp-x1y2.nii.gz").write_bytes(b"half")
    (tmp_path / ".provenance.lock").write_bytes(b"")
    removed = remove_stale_temporaries(tmp_path, ["a.nii.gz", "b[1].nii.gz"])
    assert [p.name for p in removed] == [".a.nii.gz.tmp-x1y2.nii.gz", ".b[1].nii.gz.tmp-x1y2.nii.gz"]
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [".c.nii.gz.tmp-x1y2.nii.gz", ".provenance.lock", "a.nii.gz", "b[1].nii.gz", "c.nii.gz"]


def test_stale_temporary_folders_are_removed_too(tmp_path):
    """replace_dir writes a folder through ``.NAME.tmp-*``: a kill leaves a folder behind."""
    (tmp_path / "model").mkdir()
    half = tmp_path / ".model.tmp-abc"
    half.mkdir()
    (half / "model.safetensors").write_bytes(b"half")
    removed = remove_stale_temporaries(tmp_path, ["model"])
    assert removed == [half] and sorted(p.name for p in tmp_path.iterdir()) == ["model"]
