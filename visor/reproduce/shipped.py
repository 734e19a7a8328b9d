"""Shipped checkpoints: what plain ``visor reproduce`` evaluates, and how ``--ship`` writes them.

Layout of the folder (``checkpoints/`` in the repository by default)::

    checkpoints/
      MANIFEST.json            format, commit, command, preset, per-file bytes + sha256, stage records
      base/                    the LLaVA-OneVision baseline (Hugging Face format: config.json,
                               model.safetensors, tokenizer, preprocessor_config.json)
      visor/                   the universal VISOR model with its router (save_pretrained, safetensors)
      visor-tr/                optional: VISOR-TR, that model fine-tuned on reduced tokens (the tr stage)
      recipes/                 the recipes that made them, as run: vision.yaml, base.yaml, focus*.yaml
                               (when the preset continues the baseline), stage1.yaml, stage2.yaml (stage2b.yaml
                               when it continues stage 2), and
                               pipeline.yaml (configs search, labels, router, evaluation); a baseline given
                               with --baseline has baseline.yaml and its ancestors' baseline-init-N.yaml instead
                               of the vision and base recipes, and a universal model given with --universal
                               universal.yaml and universal-init-N.yaml instead of stage1 and stage2

``MANIFEST.json``::

    {"format": "visor-reproduce-checkpoints/1", "created": "...", "commit": "<git sha>[+dirty]",
     "command": "visor reproduce --train --ship", "preset": "full",
     "checkpoints": {"base": {"path": "base", "kind": "llava_onevision", "recipe": "recipes/focus2.yaml"},
                     "visor": {"path": "visor", "kind": "visor", "recipe": "recipes/stage2.yaml",
                               "router": true, "viable_configs": [[], [1], ...]}},
     "recipes": {"vision": "recipes/vision.yaml", ...}, "pipeline": "recipes/pipeline.yaml",
     "stages": {"base": {"key": ..., "commit": ..., "seconds": ...}, ...},
     "files": {"base/model.safetensors": {"bytes": ..., "sha256": ...}, ...}}

A set whose router budget was chosen again (``visor reproduce --choose-budget``, :func:`record_budget`) also has
``"budget": {"budget", "previous", "budget_n", "chosen", "commit", "command"}``.

``load_shipped`` checks all of it (every listed file present with its size and hash, every recipe parsing as
a typed ``Recipe``) before anything is evaluated, and says how to produce the folder when it is missing.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from visor.reproduce.presets import BASELINE_STAGES, GIVEN_BASELINE, GIVEN_UNIVERSAL

FORMAT = "visor-reproduce-checkpoints/1"
MANIFEST = "MANIFEST.json"


class ShippedCheckpointsError(RuntimeError):
    """The shipped checkpoints are missing or do not match their manifest."""


def default_folder() -> Path:
    """``./checkpoints`` if it exists, else the repository's ``checkpoints/`` (next to the package)."""
    here = Path.cwd() / "checkpoints"
    return here if (here / MANIFEST).exists() else Path(__file__).resolve().parents[2] / "checkpoints"


MISSING_HELP = (
    "Produce them with `visor reproduce --train --ship` (trains every stage from scratch on this machine: hours on a "
    "CPU, resumable: rerun the same command after an interruption; run folders go to --work-dir, default "
    "runs/reproduce), or see the whole pipeline run in about two minutes with `visor reproduce --quick` "
    "(tiny models, meaningless numbers)."
)


@dataclass
class Shipped:
    folder: Path
    manifest: dict
    base: Path
    visor: Path
    recipes: dict = field(default_factory=dict)  # stage -> visor.train.recipe.Recipe
    pipeline: dict = field(default_factory=dict)
    visor_tr: Path | None = None  # VISOR-TR (the routed model fine-tuned on reduced tokens), if shipped

    @property
    def model_ids(self) -> dict[str, str]:
        """Content ids of the checkpoints (hash of their files' hashes): evaluation cache keys."""
        files = self.manifest["files"]
        ids = {}
        for kind in self.manifest["checkpoints"]:
            prefix = self.manifest["checkpoints"][kind]["path"].rstrip("/") + "/"
            ids[kind] = hashlib.sha256(json.dumps({k: v["sha256"] for k, v in sorted(files.items()) if k.startswith(prefix)},
                                                  sort_keys=True).encode()).hexdigest()
        return ids


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_shipped(folder: str | Path | None = None, verify: bool = True) -> Shipped:
    """Read and check a shipped-checkpoints folder (module docstring)."""
    from visor.train.recipe import Recipe, build

    folder = Path(folder) if folder else default_folder()
    path = folder / MANIFEST
    if not path.exists():
        raise ShippedCheckpointsError(f"no shipped checkpoints in {folder} ({MANIFEST} not found). {MISSING_HELP}")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ShippedCheckpointsError(f"{path} is not valid JSON ({err})") from err
    if manifest.get("format") != FORMAT:
        raise ShippedCheckpointsError(f"{path}: unknown format {manifest.get('format')!r} (this version reads {FORMAT})")
    for key in ("checkpoints", "files", "recipes", "commit"):
        if key not in manifest:
            raise ShippedCheckpointsError(f"{path}: the manifest has no {key!r}")
    if verify:
        for rel, info in manifest["files"].items():
            file = folder / rel
            if not file.exists():
                raise ShippedCheckpointsError(f"{folder}: {rel} is listed in the manifest but missing")
            if file.stat().st_size != info["bytes"]:
                raise ShippedCheckpointsError(f"{folder}: {rel} has {file.stat().st_size} bytes, the manifest says {info['bytes']}")
            if sha256_file(file) != info["sha256"]:
                raise ShippedCheckpointsError(f"{folder}: {rel} does not match its sha256 in the manifest (modified?)")
    recipes = {}
    for stage, rel in manifest["recipes"].items():
        data = yaml.safe_load((folder / rel).read_text())
        try:
            recipes[stage] = build(Recipe, data, where=rel)
        except (TypeError, ValueError) as err:
            raise ShippedCheckpointsError(f"{folder / rel}: the recorded recipe does not parse: {err}") from err
    pipeline = yaml.safe_load((folder / manifest["pipeline"]).read_text()) if manifest.get("pipeline") else {}
    checkpoints = manifest["checkpoints"]
    for kind in ("base", "visor"):
        if kind not in checkpoints or not (folder / checkpoints[kind]["path"] / "config.json").exists():
            raise ShippedCheckpointsError(f"{folder}: the {kind} checkpoint is missing from the manifest or the folder")
    visor_tr = checkpoints.get("visor_tr")
    if visor_tr is not None and not (folder / visor_tr["path"] / "config.json").exists():
        raise ShippedCheckpointsError(f"{folder}: the visor_tr checkpoint in the manifest is missing from the folder")
    return Shipped(folder, manifest, folder / checkpoints["base"]["path"], folder / checkpoints["visor"]["path"],
                   recipes, pipeline or {}, folder / visor_tr["path"] if visor_tr else None)


def ship(folder: str | Path, base: Path, visor: Path, recipes: dict[str, dict], pipeline: dict, *, preset: str,
         commit: str, stages: dict | None = None, command: str | None = None, dtype: str = "fp32",
         visor_tr: Path | None = None) -> Path:
    """Copy the final checkpoints (``visor_tr``: also the VISOR-TR model, as ``visor-tr/``), their recipes and a
    manifest into ``folder`` (replaced atomically).

    ``dtype="bf16"`` stores the floating-point weights in bfloat16 (half the bytes; evaluation runs under
    bf16 autocast anyway, and loading casts them back to fp32)."""
    if dtype not in ("fp32", "bf16"):
        raise ValueError(f"dtype must be 'fp32' or 'bf16', got {dtype!r}")
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = folder.with_name(f".{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    sources = [("base", base), ("visor", visor)] + ([("visor-tr", visor_tr)] if visor_tr is not None else [])
    for name, source in sources:
        copy_model(source, tmp / name, dtype)
    (tmp / "recipes").mkdir()
    recipe_paths = {}
    for stage, recipe in recipes.items():
        rel = f"recipes/{stage}.yaml"
        (tmp / rel).write_text(yaml.safe_dump(recipe, sort_keys=False))
        recipe_paths[stage] = rel
    (tmp / "recipes" / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    files = {}
    for path in sorted(p for p in tmp.rglob("*") if p.is_file()):
        rel = path.relative_to(tmp).as_posix()
        files[rel] = _file_entry(path)
    visor_config = json.loads((tmp / "visor" / "config.json").read_text())
    manifest = {
        "format": FORMAT, "created": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit,
        "command": command or "visor " + " ".join(sys.argv[1:]), "preset": preset, "dtype": dtype,
        "checkpoints": {
            "base": {"path": "base", "kind": "llava_onevision",
                     "recipe": next(recipe_paths[name] for name in (GIVEN_BASELINE, *reversed(BASELINE_STAGES))
                                   if name in recipe_paths)},  # the run that made it
            "visor": {"path": "visor", "kind": "visor",
                      "recipe": next((recipe_paths[name] for name in (GIVEN_UNIVERSAL, "stage2b", "stage2")
                                      if name in recipe_paths), None),
                      "router": bool(visor_config.get("router")), "viable_configs": visor_config.get("viable_configs")},
        },
        "recipes": recipe_paths, "pipeline": "recipes/pipeline.yaml", "stages": stages or {}, "files": files,
    }
    if visor_tr is not None:
        manifest["checkpoints"]["visor_tr"] = {"path": "visor-tr", "kind": "visor", "recipe": recipe_paths.get("tr"),
                                               "router": True, "reducers": recipes.get("tr", {}).get("reducers")}
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
    if folder.exists():
        old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
        folder.rename(old)
        tmp.rename(folder)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(folder)
    return folder


def add_visor_tr(folder: str | Path, run_final: str | Path, *, commit: str, command: str | None = None) -> Path:
    """Add a VISOR-TR model to a shipped set that has none: ``run_final``, a run of a ``reducers`` stage-2 recipe
    (``visor train recipes/visor-tr-tiny.yaml``) whose ``init`` is this set's universal model (checked by its
    weights' sha256 against the manifest), as ``visor-tr/`` with its recipe, in the set's dtype. The manifest
    (written last, atomically) gains the files, ``recipes.tr`` and ``checkpoints.visor_tr`` with this command.
    Returns the new model's folder."""
    folder, run_final = Path(folder), Path(run_final)
    shipped = load_shipped(folder)  # verified: the set is intact before it is extended
    manifest = shipped.manifest
    if shipped.visor_tr is not None:
        raise ShippedCheckpointsError(f"{folder} already has a VISOR-TR model ({shipped.visor_tr})")
    recipe_file = run_final / "recipe.json"
    if not (run_final / "config.json").is_file() or not recipe_file.is_file():
        raise ShippedCheckpointsError(f"{run_final} is not a finished training run's model (config.json and "
                                      "recipe.json expected: a run's final/ folder)")
    recipe = json.loads(recipe_file.read_text())
    if recipe.get("kind") != "visor-stage2" or not recipe.get("reducers"):
        raise ShippedCheckpointsError(f"{recipe_file}: not a VISOR-TR run (a visor-stage2 recipe with reducers)")
    init_weights = Path(recipe.get("init") or "") / "model.safetensors"
    shipped_weights = manifest["files"].get(f"{manifest['checkpoints']['visor']['path']}/model.safetensors", {})
    if not init_weights.is_file() or sha256_file(init_weights) != shipped_weights.get("sha256"):
        raise ShippedCheckpointsError(f"{run_final} was not fine-tuned from {shipped.visor}: its init "
                                      f"({recipe.get('init')!r}) is not this set's universal model")
    target = folder / "visor-tr"
    tmp = folder / f".visor-tr.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    copy_model(run_final, tmp, manifest.get("dtype", "fp32"))
    shutil.rmtree(target, ignore_errors=True)
    tmp.rename(target)
    (folder / "recipes" / "tr.yaml").write_text(yaml.safe_dump(recipe, sort_keys=False))
    for path in sorted([p for p in target.rglob("*") if p.is_file()] + [folder / "recipes" / "tr.yaml"]):
        rel = path.relative_to(folder).as_posix()
        manifest["files"][rel] = _file_entry(path)
    manifest["recipes"]["tr"] = "recipes/tr.yaml"
    manifest["checkpoints"]["visor_tr"] = {
        "path": "visor-tr", "kind": "visor", "recipe": "recipes/tr.yaml", "router": True,
        "reducers": recipe["reducers"], "added": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit,
        "command": command or "visor " + " ".join(sys.argv[1:])}
    _write_atomically(folder / MANIFEST, json.dumps(manifest, indent=2))
    return target


def record_budget(folder: str | Path, choice: dict, budget_n: int, *, commit: str, command: str | None = None) -> dict:
    """Record a router budget chosen again for a shipped set (``visor reproduce --choose-budget``): its
    ``recipes/pipeline.yaml`` gets the new ``route_budget``, ``route_budget_choice`` and ``budget_n`` (what plain
    ``visor reproduce`` runs the routed rows at), and the manifest its new hash and a ``budget`` record (when, which
    commit and command, the budget it replaced). Both files are replaced atomically, the manifest last. Returns
    the record."""
    folder = Path(folder)
    shipped = load_shipped(folder)  # verified: the set is intact before it is changed
    manifest = shipped.manifest
    pipeline = dict(shipped.pipeline)
    record = {"budget": float(choice["budget"]), "previous": pipeline.get("route_budget"), "budget_n": int(budget_n),
              "chosen": time.strftime("%Y-%m-%dT%H:%M:%S"), "commit": commit,
              "command": command or "visor " + " ".join(sys.argv[1:])}
    pipeline.update(route_budget=record["budget"], route_budget_choice=choice, budget_n=record["budget_n"])
    rel = manifest.get("pipeline") or "recipes/pipeline.yaml"
    manifest["pipeline"] = rel
    _write_atomically(folder / rel, yaml.safe_dump(pipeline, sort_keys=False))
    manifest["files"][rel] = _file_entry(folder / rel)
    manifest["budget"] = record
    _write_atomically(folder / MANIFEST, json.dumps(manifest, indent=2))
    return record


def copy_model(source: Path, dest: Path, dtype: str) -> None:
    """Copy a model folder (a run's ``final`` or one step checkpoint) without the run's step checkpoints, optimiser
    state and plots; ``dtype="bf16"`` casts the floating-point weights to bf16 (half the bytes, for committing)."""
    shutil.copytree(source, dest, ignore=shutil.ignore_patterns("checkpoints", "*.pt", "*.png"))
    if dtype == "bf16":
        _to_bf16(dest)


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` with ``text`` through a temporary file and a rename: a crash leaves the old file or the new."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _file_entry(path: Path) -> dict:
    """A manifest ``files`` entry: what ``load_shipped`` verifies."""
    return {"bytes": path.stat().st_size, "sha256": sha256_file(path)}


def _to_bf16(folder: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    for path in folder.glob("*.safetensors"):
        tensors = load_file(str(path))
        save_file({k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in tensors.items()}, str(path),
                  metadata={"format": "pt"})
