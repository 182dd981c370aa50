"""The public API: every name resolves to the function or class, not to a same-named module."""

from __future__ import annotations

import importlib
import pkgutil

import stagestore


def test_every_api_name_is_a_callable_even_after_all_modules_are_imported():
    for module in pkgutil.walk_packages(stagestore.__path__, "stagestore."):
        if module.name != "stagestore.__main__":
            importlib.import_module(module.name)
    for name in stagestore.__all__:
        value = getattr(stagestore, name)
        assert callable(value), f"stagestore.{name} is {value!r}"
    from stagestore import checkout, gc, recover, run, verify

    assert all(callable(f) for f in (checkout, gc, recover, run, verify))
