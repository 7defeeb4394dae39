"""Differentially private head statistics (`head-dp-epsilon`): the noise's calibration, what it
leaves exact, what the server still checks, and a run with a DP strategy and DP heads together."""

import json

import numpy as np
import pytest

from adapters.head_fit import CROSS, GRAM, add_dp_noise, dp_noise_std, dp_shift, stat_name
from core.config import ConfigError, check_heads_privacy, head_fit_rounds, validate
from server_app import head_fit, head_guard
from server_app.app import run
from tests.localgrid import LocalGrid

DP_STRATEGY = {
    "strategy": "flwr:DifferentialPrivacyServerSideFixedClipping",
    "strategy-args": "noise_multiplier=0.1 clipping_norm=1.0",
}


def _epsilon(std: float, bounds, delta: float, fits: int) -> float:
    """The (epsilon, delta) of `fits` Gaussian releases of this std, by zCDP (independent of the code's algebra)."""
    sens2 = sum(4 * (b * b + 1) ** 2 + 4 * (b * b + 1) for b in bounds)
    rho = fits * sens2 / (2 * std**2)
    return rho + 2 * np.sqrt(rho * np.log(1 / delta))


@pytest.mark.parametrize("epsilon,fits", [(1.0, 1), (4.0, 6), (8.0, 6)])
def test_the_noise_spends_exactly_the_runs_epsilon(epsilon, fits):
    bounds = [13.9] * 12
    std = dp_noise_std(bounds, epsilon, 1e-5, fits)
    assert _epsilon(std, bounds, 1e-5, fits) == pytest.approx(epsilon, rel=1e-9)
    assert dp_noise_std(bounds, epsilon, 1e-5, 4 * fits) == pytest.approx(2 * std)  # zCDP: sqrt(fits)
    assert dp_noise_std(bounds[:3], epsilon, 1e-5, fits) < std  # a shallow node's example reaches fewer exits


def test_noise_leaves_the_public_example_count_exact_and_hides_the_rest():
    dim, classes = 9, 4
    sums = {
        stat_name(0, GRAM): np.zeros(dim * (dim + 1) // 2, np.float32),
        stat_name(0, CROSS): np.zeros((dim, classes)),
    }
    sums[stat_name(0, GRAM)][-1] = 250.0
    noisy = add_dp_noise(sums, 3.0, np.random.default_rng(0))
    assert noisy[stat_name(0, GRAM)][-1] == 250.0
    rest = np.concatenate([noisy[stat_name(0, GRAM)][:-1], noisy[stat_name(0, CROSS)].ravel()])
    assert rest.std() == pytest.approx(3.0, rel=0.25) and abs(rest.mean()) < 1.5


def test_the_shift_keeps_a_sum_of_noisy_grams_positive_definite():
    rng = np.random.default_rng(1)
    dim, nodes, std = 60, 20, 5.0
    noise = sum((lambda a: np.triu(a) + np.triu(a, 1).T)(rng.normal(0, std, (dim, dim))) for _ in range(nodes))
    assert np.linalg.eigvalsh(noise).min() < 0
    assert np.linalg.eigvalsh(noise + dp_shift([std] * nodes, dim) * np.eye(dim)).min() > 0


def test_noisy_statistics_pass_the_guard_but_a_wrong_count_does_not():
    dim, n = 5, 40
    rng = np.random.default_rng(2)
    h = rng.normal(size=(n, dim - 1))
    h /= np.linalg.norm(h, axis=1, keepdims=True)
    phi = np.hstack([h, np.ones((n, 1))])
    y = np.eye(3)[rng.integers(0, 3, n)]
    stats = {stat_name(0, GRAM): (phi.T @ phi)[np.triu_indices(dim)], stat_name(0, CROSS): phi.T @ y}
    noisy = add_dp_noise(stats, 4.0, rng)
    with pytest.raises(ValueError):  # the identities no longer hold ...
        head_guard.check_statistics(noisy, 1, n, [1.0])
    head_guard.check_statistics(noisy, 1, n, [1.0], noise_std=4.0)  # ... and are not asked for
    with pytest.raises(ValueError, match="example count"):
        head_guard.check_statistics(noisy, 1, n + 5, [1.0], noise_std=4.0)


def test_the_accounting_counts_every_fit_of_the_run():
    cfg = validate({"num-server-rounds": 12, "head-refit-every": 5})
    assert head_fit_rounds(cfg) == [0, 5, 10, 12]
    assert head_fit_rounds({**cfg, "head-refit-every": 0}) == [0]
    assert head_fit_rounds({**cfg, "heads": "trained"}) == []


def test_a_dp_strategy_goes_with_closed_form_heads_only_when_their_statistics_are_private():
    with pytest.raises(ConfigError, match="head-dp-epsilon"):
        check_heads_privacy(validate(DP_STRATEGY))
    check_heads_privacy(validate({**DP_STRATEGY, "head-dp-epsilon": 4.0}))


def test_a_run_with_a_dp_strategy_and_dp_heads_completes_and_reports_its_epsilon(tmp_path):
    cfg = {
        **DP_STRATEGY,
        "task": "digits",
        "num-server-rounds": 2,
        "head-refit-every": 1,
        "local-epochs": 1,
        "fraction-evaluate": 0.0,
        "personalize-epochs": 0,
        "head-dp-epsilon": 8.0,
        "tiers": "1,2",
        "output-dir": str(tmp_path),
        "run-name": "dp",
    }
    run_dir = run(LocalGrid(3, cfg), cfg)
    fits = json.loads((run_dir / head_fit.FILE).read_text())["fits"]
    assert [f["after-round"] for f in fits] == [0, 1, 2] and all(f["clients"] == 3 for f in fits)
    privacy = fits[-1]["privacy"]
    assert privacy["epsilon"] == 8.0 and privacy["delta"] == 1e-5 and privacy["fits"] == 3
    assert all(s > 0 for s in privacy["noise-std-per-depth"])
    rows = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(np.isfinite(rows[-1]["server"]["accuracy"]))
