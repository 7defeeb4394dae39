"""Fixtures shared by the test modules."""

import logging

import pytest  # noqa: E402

from tests.fakegrid import fake_grid  # noqa: F401  (fixture: a fake Flower Grid running the real ClientApp)


@pytest.fixture(autouse=True, scope="session")
def _private_node_cache(tmp_path_factory):
    """Clients keep a disk cache under $XDG_CACHE_HOME by default: the tests
    (and the Flower processes they start) use a private one, not the user's."""
    mp = pytest.MonkeyPatch()
    mp.setenv("XDG_CACHE_HOME", str(tmp_path_factory.mktemp("xdg-cache")))
    yield
    mp.undo()


@pytest.fixture
def flwr_log():
    """The messages Flower's logger (the one the ServerApp logs to) emits during a test."""
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    handler = Keep()
    logging.getLogger("flwr").addHandler(handler)
    yield records
    logging.getLogger("flwr").removeHandler(handler)
