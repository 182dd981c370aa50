"""`checkout`: copy a stage's outputs out of the store as DIR/NAME, never writing outside DIR.

Each output is built under a temp name inside DIR and renamed into place, so DIR/NAME is either
absent or complete.  Output names and every path inside a tree are validated, and containment
is checked on resolved paths, whatever the manifest or tree claims.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from ..errors import CheckoutError, InvalidNameError, StagestoreError
from ..store.layout import contained, validate_name
from ..store.store import Store
from ..store.trees import copy_out, materialize, read_tree


def checkout(store: Store, run_id: str, stage: str, dest: str | os.PathLike[str],
             item: str | None = None) -> list[str]:
    """Materialise each output of (run, stage[, item]) as `dest/NAME`; returns the paths
    written.  A degraded stage's outputs (those of the run it fell back to) are checked out."""
    from ..store import unsynced
    from .status import show_stage

    unsynced.check(store.layout)  # a power loss may have damaged the newest objects
    manifest = show_stage(store, run_id, stage, item)
    if manifest.status == "failed":
        where = f"run {run_id} stage {stage}" + (f" item {item!r}" if item is not None else "")
        raise CheckoutError(f"{where} did not succeed; it has no outputs")
    # Everything that can be refused is refused before DEST is touched: the output names and
    # the paths inside every tree.
    trees = {}
    for name, ref in manifest.outputs.items():
        try:
            validate_name(name, "output name")
            if ref.kind == "tree":
                trees[name] = read_tree(store.objects, ref.hash)
        except InvalidNameError as exc:
            raise CheckoutError(f"refusing to check out {name!r}: {exc}") from None
    root = Path(dest)
    created = not os.path.lexists(root)
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise CheckoutError(f"cannot create {root}: {exc.strerror}") from None
    if not root.is_dir():
        raise CheckoutError(f"{root} is not a folder")
    written: list[Path] = []
    try:
        targets = {}
        for name in manifest.outputs:
            try:
                targets[name] = contained(root, name)
            except InvalidNameError as exc:
                raise CheckoutError(f"refusing to check out {name!r}: {exc}") from None
            if os.path.lexists(targets[name]):
                raise CheckoutError(f"{targets[name]} already exists",
                                    hint="check out into an empty folder, or remove it first")
        for name, ref in manifest.outputs.items():
            _checkout_one(store, ref, trees.get(name), root, name, targets[name])
            written.append(targets[name])
    except BaseException:
        for path in written:  # all outputs or none
            shutil.rmtree(path) if path.is_dir() else path.unlink()
        if created:
            try:
                root.rmdir()
            except OSError:
                pass
        raise
    return [str(path) for path in written]


def _checkout_one(store: Store, ref, tree, root: Path, name: str, target: Path) -> None:  # noqa: ANN001
    staging = root / f".{name}.stagestore-{os.urandom(4).hex()}"
    try:
        if tree is not None:
            materialize(tree, store.objects, staging, link=False)
        else:
            copy_out(store.objects.path(ref.hash), staging, 0o644)
        os.rename(staging, target)
    except InvalidNameError as exc:
        raise CheckoutError(f"refusing to check out {name!r}: {exc}") from None
    except FileNotFoundError:
        raise StagestoreError(f"output {name!r} names an object that is missing from the store",
                              hint="run `stagestore verify`") from None
    finally:
        if os.path.lexists(staging):
            shutil.rmtree(staging) if staging.is_dir() else staging.unlink()
