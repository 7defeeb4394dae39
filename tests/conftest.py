"""Fixtures shared by the test modules."""

from tests.fakegrid import fake_grid  # noqa: F401  (fixture: a fake Flower Grid running the real ClientApp)
