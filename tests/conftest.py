"""Settings every test runs under: the ``int8`` backend's fixed routes (a test that measures
routes asks for it) and a route cache of the test session's own, so no test writes to the user's
cache, also through ``metagrad train`` in a subprocess."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from metagrad.backward.int8.routes import CACHE_DIR_ENV, ROUTES_ENV


@pytest.fixture(autouse=True, scope="session")
def _fixed_int8_routes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    patch = pytest.MonkeyPatch()
    patch.setenv(ROUTES_ENV, "fixed")
    patch.setenv(CACHE_DIR_ENV, str(tmp_path_factory.mktemp("route-cache")))
    yield
    patch.undo()
