"""The reference workloads of the reliability suites (issue 4), as cheap shell pipelines.

* `linear`: three stages in a row (a folder output, then two file outputs).
* `fanout`: one source, two stages that produce identical content, and a stage joining them
  (identical objects committed twice, by two stages of one run).
* `tree50`: one stage producing a 50-file tree with an empty file and an empty folder.
* `kinds`: a folder through checksum, compress, decompress, passthrough and a disabled stage.
* `bigin`: one stage reading a folder input of `SYNCFS_MIN_FILES` files, whose snapshot is
  synced once (`ingest_sources`).
* `items`: an item run (`ITEMS`, one id with a `/`): a once-per-run stage, then two stages per
  item, the first reading the item's own input; its item records go to the run's item log,
  synced every `itemlog.SYNC_RECORDS` = 5 records (so that group syncs happen mid-run) and by
  no timer (`SYNC_AFTER_S` = None, so that the operations come in a fixed order).
* `snaptree`: one stage concatenating a folder input of three subfolders (37 files), written
  more than the racy window before the run, so that the run records every folder in the stat
  cache (`stat-cache/`) and a rerun or recover after a crash reuses what it recorded; the
  output depends on every byte, so a stat-cache record that lied would change it.

`make(name, folder)` writes the workspace (data and `stagestore.toml`) into `folder` and returns
the loaded pipeline; `run_kwargs(name)` is what `run` needs besides (the items of `items`).
`STAGES[name]` lists the stages, `outputs_expected(name)` the (item, stage) pairs a complete run
has manifests for, and `sentinel(folder)` creates the folder outside the store that nothing may
touch (invariant 10).
"""

from __future__ import annotations

import textwrap
import time
from pathlib import Path

from stagestore.pipeline.model import Pipeline, load_pipeline
from stagestore.store import itemlog
from stagestore.store.statcache import RACY_NS

# Deterministic group commit for the fault suites: no flusher thread, a sync every 5 records.
itemlog.SYNC_AFTER_S = None
itemlog.SYNC_RECORDS = 5

LINEAR = """
[pipeline]
name = "linear"

[stages.make]
cmd = "cp -r {inputs.src} {outputs.out} && echo made"
shell = true
inputs = { src = "data" }
outputs = ["out"]

[stages.count]
upstream = ["make"]
cmd = "ls {upstream.make.out} | wc -l > {outputs.n}"
shell = true
outputs = ["n"]

[stages.report]
upstream = ["count"]
cmd = "echo files=$(cat {upstream.count.n}) > {outputs.text}"
shell = true
outputs = ["text"]
"""

FANOUT = """
[pipeline]
name = "fanout"

[stages.source]
cmd = "cat {inputs.src} > {outputs.text}"
shell = true
inputs = { src = "data/source.txt" }
outputs = ["text"]

[stages.left]
upstream = ["source"]
cmd = "tr a-z A-Z < {upstream.source.text} > {outputs.upper}"
shell = true
outputs = ["upper"]

[stages.right]
upstream = ["source"]
cmd = "tr a-z A-Z < {upstream.source.text} > {outputs.upper}; echo right >&2"
shell = true
outputs = ["upper"]

[stages.join]
upstream = ["left", "right"]
cmd = "cat {upstream.left.upper} {upstream.right.upper} > {outputs.both}"
shell = true
outputs = ["both"]
"""

TREE50 = """
[pipeline]
name = "tree50"

[stages.tree]
cmd = "mkdir -p {outputs.tree}/sub/deeper {outputs.tree}/empty-folder && for i in $(seq 1 48); do echo line $i > {outputs.tree}/sub/f$i.txt; done && echo top > {outputs.tree}/top.txt && : > {outputs.tree}/sub/deeper/empty.txt"
shell = true
outputs = ["tree"]
"""

# Built-in kinds (docs/kinds.md): each runs in its own child process and commits like any stage;
# passthrough and a disabled stage write only a manifest.  No encrypt: its output is not
# deterministic, and invariant 5 compares output hashes with a reference run.
KINDS = """
[pipeline]
name = "kinds"

[stages.make]
cmd = "mkdir -p {outputs.tree}/sub && echo a > {outputs.tree}/a.txt && seq 1 3000 > {outputs.tree}/sub/n.txt"
shell = true
outputs = ["tree"]

[stages.sums]
kind = "checksum"
upstream = ["make"]
input = "{upstream.make.tree}"
outputs = ["sums"]

[stages.pack]
kind = "compress"
upstream = ["make"]
input = "{upstream.make.tree}"
outputs = ["packed"]
parallel = true
workers = 2

[stages.unpack]
kind = "decompress"
upstream = ["pack"]
input = "{upstream.pack.packed}"
outputs = ["tree"]

[stages.look]
kind = "passthrough"
upstream = ["unpack"]
input = "{upstream.unpack.tree}"
outputs = ["tree"]

[stages.off]
kind = "compress"
upstream = ["look"]
input = "{upstream.look.tree}"
outputs = ["packed"]
enabled = false
"""

# A folder input big enough for the snapshot's batched sync (`ObjectStore.ingest_files`: copies
# without per-file fsync, one syncfs, then the renames).
BIGIN = """
[pipeline]
name = "bigin"

[stages.list]
cmd = "ls {inputs.src} > {outputs.names}"
shell = true
inputs = { src = "data" }
outputs = ["names"]
"""

ITEMS_TOML = """
[pipeline]
name = "items"

[stages.prep]
cmd = "cat {inputs.src} > {outputs.text}"
shell = true
inputs = { src = "data/common.txt" }
outputs = ["text"]

[stages.fetch]
upstream = ["prep"]
cmd = "cat {inputs.src} {upstream.prep.text} > {outputs.raw}"
shell = true
inputs = { src = "data/{item}.txt" }
outputs = ["raw"]

[stages.build]
upstream = ["fetch"]
cmd = "tr a-z A-Z < {upstream.fetch.raw} > {outputs.out}"
shell = true
outputs = ["out"]
"""

ITEMS = ["a", "b/c", "d"]

SNAPTREE = """
[pipeline]
name = "snaptree"

[stages.cat]
cmd = "cd {inputs.src} && find . -type f | LC_ALL=C sort | xargs cat > {outputs.all}"
shell = true
inputs = { src = "data" }
outputs = ["all"]
"""

TOML = {"linear": LINEAR, "fanout": FANOUT, "tree50": TREE50, "kinds": KINDS, "bigin": BIGIN,
        "items": ITEMS_TOML, "snaptree": SNAPTREE}
STAGES = {
    "linear": ("make", "count", "report"),
    "fanout": ("source", "left", "right", "join"),
    "tree50": ("tree",),
    "kinds": ("make", "sums", "pack", "unpack", "look", "off"),
    "bigin": ("list",),
    "items": ("prep", "fetch", "build"),
    "snaptree": ("cat",),
}


def run_kwargs(name: str) -> dict:
    return {"items": list(ITEMS)} if name == "items" else {}


def outputs_expected(name: str) -> set[tuple[str | None, str]]:
    if name == "items":
        return {(None, "prep")} | {(item, stage) for item in ITEMS for stage in ("fetch", "build")}
    return {(None, stage) for stage in STAGES[name]}


def make(name: str, folder: Path) -> Pipeline:
    folder.mkdir(parents=True, exist_ok=True)
    if name == "linear":
        for i in range(2):
            _write(folder / "data" / f"f{i}.txt", f"file {i}\n")
    elif name == "fanout":
        _write(folder / "data" / "source.txt", "hello fan-out\n")
    elif name == "items":
        _write(folder / "data" / "common.txt", "common\n")
        for item in ITEMS:
            _write(folder / "data" / f"{item}.txt", f"item {item}\n")
    elif name == "bigin":
        from stagestore.store.objects import SYNCFS_MIN_FILES

        for i in range(SYNCFS_MIN_FILES):
            _write(folder / "data" / f"d{i:02}.txt", f"datum {i}\n")
    elif name == "snaptree":
        _write(folder / "data" / "top.txt", "top\n")
        for sub in ("a", "b", "c"):
            for i in range(12):
                _write(folder / "data" / sub / f"{i:02}.txt", f"{sub} {i}\n")
    # Past the stat cache's racy window before anything runs: whether a run writes stat-cache
    # records must not depend on how long after this it starts, or K (the durable operations of
    # a run) would grow while a sweep goes on, and the sweep would miss the points past it.
    time.sleep(RACY_NS / 1e9 + 0.1)
    _write(folder / "stagestore.toml", textwrap.dedent(TOML[name]))
    return load_pipeline(folder / "stagestore.toml")


def sentinel(folder: Path) -> Path:
    """A folder beside the workspace holding a file, a read-only file, a symlink and a subfolder."""
    root = folder / "sentinel"
    (root / "sub").mkdir(parents=True, exist_ok=True)
    _write(root / "note.txt", "do not touch\n")
    _write(root / "sub" / "ro.txt", "read-only\n")
    (root / "sub" / "ro.txt").chmod(0o444)
    link = root / "link"
    if not link.is_symlink():
        link.symlink_to("note.txt")
    return root


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
