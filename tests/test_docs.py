"""Generated files stay current, and the docs cover what the code offers."""

from __future__ import annotations

from pathlib import Path

from stagestore.cli import command_group
from stagestore.cli.reference import render_cli_reference
from stagestore.store.schema import render_schemas

cli = command_group()

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_schemas_match_the_record_types():
    rendered = render_schemas()
    on_disk = {p.name: p.read_bytes() for p in (ROOT / "schemas").glob("*.schema.json")}
    assert set(on_disk) == set(rendered), "run `make schemas`"
    for name, data in rendered.items():
        assert on_disk[name] == data, f"schemas/{name} is stale: run `make schemas`"


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render_cli_reference(), "run `make docs`"


def test_error_reference_is_current():
    from stagestore.cli.errordoc import render_error_reference

    assert (ROOT / "docs" / "errors.md").read_text() == render_error_reference(), \
        "docs/errors.md is stale: run `make docs`"


def test_every_error_class_is_in_the_error_reference():
    """A `StagestoreError` defined outside `errordoc.ERROR_MODULES` would be missing from
    docs/errors.md: import every module and look."""
    import importlib
    import pkgutil

    import stagestore
    from stagestore.cli.errordoc import error_classes
    from stagestore.errors import StagestoreError

    for info in pkgutil.walk_packages(stagestore.__path__, "stagestore."):
        if info.name.endswith(".__main__"):  # runs the CLI when imported
            continue
        try:
            importlib.import_module(info.name)
        except ImportError:  # an optional dependency (dask) that is not installed
            continue
    listed = set(error_classes())
    pending = [StagestoreError]
    while pending:
        cls = pending.pop()
        pending += cls.__subclasses__()
        if cls.__module__.startswith("stagestore."):
            assert cls in listed, f"{cls.__module__}.{cls.__name__}: add it to ERROR_MODULES"
    reference = (ROOT / "docs" / "errors.md").read_text()
    for cls in listed:
        assert f"{cls.__name__}`" in reference, cls


def test_readme_links_the_error_reference():
    assert "(docs/errors.md)" in (ROOT / "README.md").read_text()


def test_every_command_has_help_and_a_section_in_the_reference():
    reference = (ROOT / "docs" / "cli.md").read_text()
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), name
        assert f"## stagestore {name}\n" in reference


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text()[:1500]
    assert "make demo" in head and "make test" in head


def test_every_failure_class_is_documented():
    from stagestore.execution import attempt as executor

    stages_doc = (ROOT / "docs" / "stages.md").read_text()
    classes = [v for k, v in vars(executor).items() if k.isupper() and isinstance(v, str)
               and v.endswith("Failure")]
    assert classes
    for name in classes:
        assert name in stages_doc, name


def test_every_verify_finding_kind_is_documented():
    import re

    source = (ROOT / "stagestore" / "inspection" / "verify.py").read_text()
    kinds = set(re.findall(r'self\.find\(\s*"([a-z_]+)"', source))
    assert {"object_corrupt", "object_missing", "manifest_missing"} <= kinds
    recovery = (ROOT / "docs" / "recovery.md").read_text()
    for kind in kinds:
        assert kind in recovery, kind


# --- the Python API ------------------------------------------------------------------------------

# Every command (and `remote` subcommand), and the library function(s) it calls: the public
# API covers the CLI.  A new command fails `test_every_command_has_an_api_function` until it
# is added here with its function.
COMMAND_API = {
    "run": ["run", "LocalScheduler", "DaskScheduler"],
    "check": ["check", "compatibility_warnings"],
    "plan": ["plan"],
    "status": ["status"],
    "contracts": ["contracts"],
    "runs": ["list_runs"],
    "show": ["show_run", "show_stage"],
    "logs": ["stage_logs"],
    "report": ["failure_report"],
    "stats": ["stage_stats"],
    "diff": ["diff_runs"],
    "checkout": ["checkout"],
    "verify": ["verify", "verify_remote"],
    "recover": ["recover"],
    "doctor": ["doctor"],
    "forget": ["forget"],
    "gc": ["gc", "gc_remote"],
    "schema": ["schemas", "write_schemas"],
    "push": ["push"],
    "pull": ["pull"],
    "remote add": ["add_remote"],
    "remote list": ["list_remotes"],
    "remote remove": ["remove_remote"],
    "remote runs": ["remote_runs"],
}


def _command_names() -> set[str]:
    from stagestore.cli import command_group

    names = set()
    for name, command in command_group().commands.items():
        sub = getattr(command, "commands", None)
        if sub is None:
            names.add(name)
        else:
            names |= {f"{name} {subname}" for subname in sub}
    return names


def test_every_command_has_an_api_function():
    import stagestore

    assert _command_names() == set(COMMAND_API), \
        "a command was added or removed: map it to its library function in COMMAND_API"
    for command, names in COMMAND_API.items():
        for name in names:
            assert name in stagestore.__all__, f"`stagestore {command}`: {name} is not exported"


def test_api_reference_is_current():
    from stagestore.cli.apidoc import render_api_reference

    assert (ROOT / "docs" / "api.md").read_text() == render_api_reference(), \
        "docs/api.md is stale: run `make docs`"


def test_every_api_name_is_documented():
    import stagestore

    reference = (ROOT / "docs" / "api.md").read_text()
    for name in stagestore.__all__:
        assert f"### `{name}`\n" in reference, name
        assert (getattr(stagestore, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_readme_api_example_runs(tmp_path, monkeypatch):
    """The README's complete API example, executed as written in a temp folder."""
    import re

    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Python API\n"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    for word in ("Store.create", "load_pipeline", "run(", "verify(", "diff_runs(", "push(",
                 "pull("):
        assert word in code, word
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("STAGESTORE_STORE", raising=False)
    exec(compile(code, "README.md", "exec"), {"__name__": "readme"})  # noqa: S102
    assert (tmp_path / "laptop-store").is_dir()
