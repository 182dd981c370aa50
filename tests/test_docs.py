"""Generated files stay current, and the docs cover what the code offers."""

from __future__ import annotations

from pathlib import Path

from stagestore.cli.commands import cli
from stagestore.cli.reference import render_cli_reference
from stagestore.schema import render_schemas

ROOT = Path(__file__).resolve().parent.parent


def test_checked_in_schemas_match_the_record_types():
    rendered = render_schemas()
    on_disk = {p.name: p.read_bytes() for p in (ROOT / "schemas").glob("*.schema.json")}
    assert set(on_disk) == set(rendered), "run `make schemas`"
    for name, data in rendered.items():
        assert on_disk[name] == data, f"schemas/{name} is stale: run `make schemas`"


def test_cli_reference_is_current():
    assert (ROOT / "docs" / "cli.md").read_text() == render_cli_reference(), "run `make docs`"


def test_every_command_has_help_and_a_section_in_the_reference():
    reference = (ROOT / "docs" / "cli.md").read_text()
    for name, command in cli.commands.items():
        assert command.help and command.help.strip(), name
        assert f"## stagestore {name}\n" in reference


def test_readme_opens_with_the_two_commands():
    head = (ROOT / "README.md").read_text()[:1500]
    assert "make demo" in head and "make test" in head


def test_every_failure_class_is_documented():
    from stagestore import executor

    stages_doc = (ROOT / "docs" / "stages.md").read_text()
    classes = [v for k, v in vars(executor).items() if k.isupper() and isinstance(v, str)
               and v.endswith("Failure")]
    assert classes
    for name in classes:
        assert name in stages_doc, name


def test_every_verify_finding_kind_is_documented():
    import re

    source = (ROOT / "stagestore" / "verification.py").read_text()
    kinds = set(re.findall(r'self\.find\(\s*"([a-z_]+)"', source))
    assert {"object_corrupt", "object_missing", "manifest_missing"} <= kinds
    recovery = (ROOT / "docs" / "recovery.md").read_text()
    for kind in kinds:
        assert kind in recovery, kind
