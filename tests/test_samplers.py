"""Prompt samplers: VADE (spec section 9) and uniform.

- VADE reproduces the spec's numbers: I(p), the top-B selection, the figure's two-scale decay
  updates, and numpy default_rng(0)'s Thompson draws;
- a model-free simulated bandit (64 prompts with known success rates, most near 0 or 1): VADE
  wastes fewer rollouts on zero-variance groups (all correct / all wrong) than uniform sampling;
- state_dict() is JSON-serialisable and a restored sampler continues identically.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from posttrain.errors import RecipeError
from posttrain.samplers import SAMPLERS, UniformSampler, VADESampler, build_sampler, information_gain, top_b


# ----------------------------------------------------------------------------------------------------
# VADE: spec worked example
# ----------------------------------------------------------------------------------------------------

def test_information_gain_values():
    np.testing.assert_allclose(information_gain([0.13, 0.32, 0.90, 1 / 3]), [0.098397, 0.147968, 0.009, 4 / 27],
                               rtol=1e-5)
    np.testing.assert_allclose(information_gain([0.13, 0.32, 0.90]),
                               [0.13 * 0.87 ** 2, 0.32 * 0.68 ** 2, 0.9 * 0.1 ** 2], rtol=1e-12)
    grid = np.linspace(0, 1, 3001)
    assert abs(grid[np.argmax(information_gain(grid))] - 1 / 3) < 1e-3  # maximal at 1/3, not 1/2


def test_top_b_selects_samples_2_and_1():
    """B = 2, draws (0.13, 0.32, 0.90): samples 2 and 1 (1-based), i.e. indices [1, 0], largest I first."""
    assert top_b(information_gain([0.13, 0.32, 0.90]), 2) == [1, 0]
    assert top_b(np.array([0.5, 0.5, 0.7]), 2) == [2, 0]  # ties: lower index first


def spec_state(seed: int = 0) -> VADESampler:
    sampler = VADESampler(3, seed=seed)
    sampler.alpha[:] = [0.1, 2.7, 9.0]
    sampler.beta[:] = [8.4, 5.3, 0.2]
    return sampler


def test_vade_thompson_draws_default_rng_0():
    np.testing.assert_allclose(spec_state(0).draw(), [0.07340452704385327, 0.2025025705273306, 0.949503685875823],
                               rtol=1e-12)
    np.testing.assert_allclose(spec_state().posterior_mean(), [0.104762, 0.37, 0.892857], rtol=1e-5)
    sampler = spec_state(0)
    assert sampler.select(2) == [1, 0]  # I of the draws: 0.0630, 0.1288, 0.0024


def test_vade_two_scale_decay_figure_numbers():
    """lambda1 = 0.2, lambda2 = 0.999, G = 8: (0.1, 8.4) with 1/8 -> (1.02, 8.68); (2.7, 5.3) with 4/8 ->
    (4.54, 5.06); unselected (9.0, 0.2) -> (8.991, 0.1998)."""
    sampler = spec_state()
    sampler.update([0, 1], [1, 4], group_size=8)
    np.testing.assert_allclose(sampler.alpha, [1.02, 4.54, 8.991], rtol=1e-12)
    np.testing.assert_allclose(sampler.beta, [8.68, 5.06, 0.1998], rtol=1e-12)


def test_vade_initial_state_and_validation():
    sampler = VADESampler(10, seed=1)
    assert sampler.alpha.tolist() == [0.0] * 10 and sampler.beta.tolist() == [0.0] * 10  # Beta(1, 1) prior
    picked = sampler.select(4)
    assert len(set(picked)) == 4 and all(0 <= i < 10 for i in picked)
    with pytest.raises(ValueError, match="batch_size"):
        sampler.select(11)
    with pytest.raises(ValueError, match="successes"):
        sampler.update([0], [9], group_size=8)
    with pytest.raises(ValueError, match="distinct"):
        sampler.update([0, 0], [1, 2], group_size=8)


# ----------------------------------------------------------------------------------------------------
# uniform sampler
# ----------------------------------------------------------------------------------------------------

def test_uniform_is_a_seeded_permutation_per_epoch():
    def epoch(seed):
        sampler = UniformSampler(12, seed=seed)
        return [i for _ in range(3) for i in sampler.select(4)]

    assert sorted(epoch(3)) == list(range(12))
    assert epoch(3) == epoch(3) and epoch(3) != epoch(4)
    straddle = UniformSampler(10, seed=0)
    for _ in range(20):  # 4 does not divide 10: batches straddle epochs but never repeat an index
        batch = straddle.select(4)
        assert len(set(batch)) == 4


def test_uniform_zero_variance_filter_sits_out_one_epoch():
    sampler = UniformSampler(8, seed=0, zero_variance_filter=True)
    first = sampler.select(8)
    sampler.update(first, [0, 8, 3, 3, 3, 3, 3, 3], group_size=8)  # first[0] all wrong, first[1] all right
    second = sampler.select(6)
    assert sorted(second) == sorted(first[2:])
    third = sampler.select(8)  # back in the pool one epoch later
    assert sorted(third) == list(range(8))
    assert sorted(UniformSampler(8, seed=0).select(8)) == list(range(8))


# ----------------------------------------------------------------------------------------------------
# simulated bandit: VADE vs uniform
# ----------------------------------------------------------------------------------------------------

def success_rates() -> np.ndarray:
    """64 prompts: 24 almost never solved, 24 almost always solved, 16 in between."""
    rng = np.random.default_rng(123)
    return np.concatenate([rng.uniform(0.0, 0.03, 24), rng.uniform(0.97, 1.0, 24), rng.uniform(0.2, 0.8, 16)])


def zero_variance_share(sampler, seed: int, steps: int = 80, batch: int = 4, group: int = 8) -> float:
    """Share of sampled groups whose G rewards are all equal (zero GRPO advantage, no learning signal)."""
    rates = success_rates()
    env = np.random.default_rng(1000 + seed)
    zero = total = 0
    for _ in range(steps):
        picked = sampler.select(batch)
        successes = env.binomial(group, rates[picked])
        zero += int(((successes == 0) | (successes == group)).sum())
        total += len(picked)
        sampler.update(picked, successes, group)
    return zero / total


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_vade_samples_fewer_zero_variance_groups_than_uniform(seed):
    vade = zero_variance_share(VADESampler(64, seed=seed), seed)
    uniform = zero_variance_share(UniformSampler(64, seed=seed), seed)
    filtered = zero_variance_share(UniformSampler(64, seed=seed, zero_variance_filter=True), seed)
    print(f"seed {seed}: zero-variance share vade {vade:.3f} uniform {uniform:.3f} uniform+filter {filtered:.3f}")
    assert vade < uniform - 0.15
    assert filtered < uniform


# ----------------------------------------------------------------------------------------------------
# the registry: build_sampler checks names and params like a recipe's sampler section
# ----------------------------------------------------------------------------------------------------

def test_registry_and_build_sampler_checks_names_and_params():
    assert {"uniform", "sequential", "vade"} <= set(SAMPLERS)
    assert SAMPLERS["vade"] is VADESampler and SAMPLERS["uniform"] is UniformSampler
    assert isinstance(build_sampler("vade", 8, seed=3, lambda1=0.5), VADESampler)
    assert build_sampler("vade", 8, lambda1=0.5, lambda2=0.9).lambda1 == 0.5
    assert build_sampler("uniform", 8, zero_variance_filter=True).zero_variance_filter
    with pytest.raises(RecipeError, match="unknown sampler 'vades'.*Did you mean 'vade'"):
        build_sampler("vades", 8)
    with pytest.raises(RecipeError, match="sampler.params"):
        build_sampler("vade", 8, lambda3=0.5)  # an unknown key
    with pytest.raises(RecipeError, match="lambda1 and lambda2"):
        build_sampler("vade", 8, lambda1=1.5)  # out of range: validate()
    with pytest.raises(RecipeError, match="sampler.params"):
        build_sampler("sequential", 8, zero_variance_filter=True)  # a param of another sampler


def test_sequential_takes_the_file_order_and_wraps():
    sampler = build_sampler("sequential", 7)
    assert [sampler.select(3) for _ in range(3)] == [[0, 1, 2], [3, 4, 5], [6, 0, 1]]


# ----------------------------------------------------------------------------------------------------
# state_dict round trip
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name,params", [("vade", {}), ("uniform", {}), ("uniform", {"zero_variance_filter": True}),
                                         ("sequential", {})])
def test_state_dict_round_trip_resumes_identically(name, params):
    rates = success_rates()

    def steps(sampler, env, n):
        picked_all = []
        for _ in range(n):
            picked = sampler.select(5)  # 5 does not divide 64: uniform batches straddle epochs
            successes = env.binomial(8, rates[picked])
            sampler.update(picked, successes, 8)
            picked_all.append(picked)
        return picked_all

    sampler = build_sampler(name, 64, seed=11, **params)
    env = np.random.default_rng(5)
    steps(sampler, env, 17)
    saved = json.dumps(sampler.state_dict())  # plain lists / ints / floats, RNG state included
    env_state = env.bit_generator.state
    expected = steps(sampler, env, 20)

    restored = build_sampler(name, 64, seed=999, **params)  # a different seed: the state must override it
    restored.load_state_dict(json.loads(saved))
    env2 = np.random.default_rng()
    env2.bit_generator.state = env_state
    assert steps(restored, env2, 20) == expected
    if name == "vade":
        assert restored.alpha.tolist() == sampler.alpha.tolist()
    with pytest.raises(ValueError, match="items"):
        build_sampler(name, 65, **params).load_state_dict(json.loads(saved))
