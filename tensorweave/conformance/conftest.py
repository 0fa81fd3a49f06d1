"""Fixtures of the kit's suites: ``kit``, resolved by the plugin from the ``--tw-*`` options. Without
``--tw-backend`` every kit test is skipped with a note saying how to run it."""

from __future__ import annotations

import pytest

from .plugin import KIT, Kit, kit_items


@pytest.fixture(scope="session")
def kit(request: pytest.FixtureRequest) -> Kit:
    return request.config.stash[KIT]


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if KIT not in config.stash:
        off = pytest.mark.skip(reason="the conformance kit runs with --tw-backend NAME (see tensorweave.conformance)")
        for item in kit_items(items):
            item.add_marker(off)
