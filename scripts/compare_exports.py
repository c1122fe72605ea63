"""Do two source trees export the same checkpoints? A check for refactors that must not change behaviour.

    # export every recipe with the tree you started from, then with the changed tree
    python3 scripts/compare_exports.py export /tmp/before-tree /tmp/exports-before --reduce
    python3 scripts/compare_exports.py export .                /tmp/exports-after  --reduce
    python3 scripts/compare_exports.py compare /tmp/exports-before /tmp/exports-after

``export`` runs ``compressor apply RECIPE demo`` for every recipe in ``recipes/`` (or those named) in a
subprocess whose working directory is the tree, so that tree's ``compressor`` is imported, with the
same thread count for every run. ``--reduce`` shortens the recipes that train for minutes
(``REDUCED``: fewer calibration samples, one epoch per training step); the reduced copies are written
beside the exports so both sides run the same ones. ``compare`` checks every tensor of every shard
with ``torch.equal`` (names, dtypes, shapes and values) and ``config.json`` key by key.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import os
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
REDUCED = ("efficientqat-*", "squeezellm-*-e2e", "transmla*", "qllm-*", "swiftkv-*")
REDUCED_SAMPLES = 8
THREADS = "2"


def reduced(recipe: dict) -> dict:
    """The recipe with ``REDUCED_SAMPLES`` calibration samples and one epoch in every step that has epochs."""
    recipe = json.loads(json.dumps(recipe))
    recipe.setdefault("calibration", {})["samples"] = REDUCED_SAMPLES
    for step in recipe["steps"]:
        ((name, params),) = step.items()
        if params is not None and "epochs" in params:
            params["epochs"] = 1
    return recipe


def export(tree: Path, out: Path, names: list[str], reduce: bool) -> None:
    out.mkdir(parents=True, exist_ok=True)
    recipes = sorted((ROOT / "recipes").glob("*.yaml"))
    if names:
        recipes = [r for r in recipes if r.stem in names]
    env = {**os.environ, "PYTHONPATH": str(tree.resolve()), "OMP_NUM_THREADS": THREADS, "MKL_NUM_THREADS": THREADS}
    for recipe in recipes:
        path = recipe
        if reduce and any(fnmatch.fnmatch(recipe.stem, pattern) for pattern in REDUCED):
            path = out / f"{recipe.stem}.reduced.yaml"
            path.write_text(yaml.safe_dump(reduced(yaml.safe_load(recipe.read_text())), sort_keys=False))
        target = (out / recipe.stem).resolve()
        command = [
            sys.executable,
            "-c",
            "from compressor.cli import main; main()",
            "apply",
            str(path.resolve()),
            "demo",
            "-o",
            str(target),
            "--overwrite",
            "--quiet",
            "--device",
            "cpu",
        ]
        print(f"{recipe.stem}: {path.name}", flush=True)
        subprocess.run(command, cwd=tree, env=env, check=True, stdout=subprocess.DEVNULL)


def shard_tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def compare(before: Path, after: Path) -> bool:
    import torch

    same = True
    for old in sorted(p for p in before.iterdir() if p.is_dir()):
        new = after / old.name
        problems = []
        if not new.is_dir():
            problems.append("missing after")
        else:
            a, b = shard_tensors(old), shard_tensors(new)
            problems += [f"only before: {n}" for n in sorted(a.keys() - b.keys())]
            problems += [f"only after: {n}" for n in sorted(b.keys() - a.keys())]
            problems += [
                f"differs: {n}"
                for n in sorted(a.keys() & b.keys())
                if a[n].dtype != b[n].dtype or a[n].shape != b[n].shape or not torch.equal(a[n], b[n])
            ]
            config_a, config_b = (json.loads((d / "config.json").read_text()) for d in (old, new))
            problems += [
                f"config.json: {k}"
                for k in sorted(config_a.keys() | config_b.keys())
                if config_a.get(k) != config_b.get(k)
            ]
            count = len(a)
        print(f"{old.name}: " + ("; ".join(problems[:5]) if problems else f"{count} tensors equal, config.json equal"))
        same &= not problems
    return same


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("export", help="export recipes with the compressor of TREE")
    run.add_argument("tree", type=Path)
    run.add_argument("out", type=Path)
    run.add_argument("recipes", nargs="*", help="recipe names (default: every recipe in recipes/)")
    run.add_argument("--reduce", action="store_true", help=f"shorter calibration for {', '.join(REDUCED)}")
    check = commands.add_parser("compare", help="compare two export folders tensor by tensor")
    check.add_argument("before", type=Path)
    check.add_argument("after", type=Path)
    args = parser.parse_args()
    if args.command == "export":
        export(args.tree, args.out, args.recipes, args.reduce)
        return 0
    return 0 if compare(args.before, args.after) else 1


if __name__ == "__main__":
    sys.exit(main())
