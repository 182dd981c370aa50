"""Child-process entry point for `call = "module:function"` stages.

Run as `python -m stagestore.execution.callstage CONTEXT.json` by the executor, so an exception, a crash
or `os._exit` in user code ends this process only, never the runner.  The function receives a
`StageContext`; an exception prints its traceback to stderr and exits with code 1.
"""

from __future__ import annotations

import importlib
import json
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any


class StageContext(SimpleNamespace):
    """What a called stage gets: paths as `pathlib.Path`, params as decoded TOML values.

    Attributes: `run_id`, `stage`, `item` (the item id, or None outside an item run),
    `params` (dict), `inputs` (name -> Path), `upstream`
    (stage -> name -> Path), `outputs` (name -> Path to create), `out_dir` (Path), `workdir`.
    """


def build_context(data: dict[str, Any]) -> StageContext:
    return StageContext(
        run_id=data["run_id"], stage=data["stage"], item=data.get("item"), params=data["params"],
        workdir=Path(data["workdir"]), out_dir=Path(data["out_dir"]),
        inputs={k: Path(v) for k, v in data["inputs"].items()},
        upstream={s: {k: Path(v) for k, v in outs.items()} for s, outs in data["upstream"].items()},
        outputs={k: Path(v) for k, v in data["outputs"].items()},
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    data = json.loads(Path(argv[0]).read_text())
    # The stage's own snapshot of its module comes first, so the code that runs is the code
    # that was hashed; the workspace follows, for anything else it imports.
    sys.path.insert(0, data["workdir"])
    if data.get("code_dir"):
        sys.path.insert(0, data["code_dir"])
    module_name, _, function_name = data["call"].partition(":")
    try:
        module = importlib.import_module(module_name)
        function = getattr(module, function_name)
    except (ImportError, AttributeError) as exc:
        print(f"stagestore: cannot load {data['call']!r}: {exc}", file=sys.stderr)
        return 1
    try:
        function(build_context(data))
    except SystemExit as exc:
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException:  # noqa: BLE001 - user code; report everything
        traceback.print_exc()
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
