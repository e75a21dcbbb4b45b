"""apg-ppo's proximal likelihood-ratio path (trainers/apg/diffgym_apg/proximal.py): GAE and the clipped
surrogate (diffgym/training/returns.py) against their definitions, what the buffer records, the path on every task, gradient-step
accounting, validation and exact resume with a half-filled buffer."""

from __future__ import annotations

import copy
import math

import pytest
import torch

import diffgym
from diffgym.plugins import resolve_config
from diffgym.training.rollout import unroll

from diffgym.training import OptimizerSpec
from diffgym.training.returns import ReturnScale, clipped_surrogate_loss, gae_advantages
from diffgym_apg.apg import apg_update, train
from diffgym_apg.config import APGConfig, upgrade_config
import diffgym_apg.proximal
from diffgym_apg.proximal import (ProximalBuffer, ProximalConfig, batch_advantages, clipped_epochs,
                                  likelihood_ratio_gradient)

from tests.test_apg import (POINT_MASS, latest_checkpoint, make_learner, pieces, random_segment, read_metrics,
                            small_config, straight_checkpoints)

PROXIMAL = {"algo_params.proximal.n_epochs": 2, "algo_params.proximal.n_steps": 8,
            "algo_params.proximal.batch_size": 8}


def proximal_config(tmp_path, bootstrap: str, name: str = "run", **changes):
    """small_config's runs with the proximal path (trainer apg-ppo): one update every 8 steps per env."""
    config = small_config(tmp_path, POINT_MASS, "gae", name, **{"algo_params.value.bootstrap": bootstrap,
                                                               **PROXIMAL, **changes})
    assert config.algo == "apg-ppo"
    return config


@pytest.mark.parametrize("lam", [0.0, 0.7, 1.0])
def test_gae_matches_the_weighted_sum_of_td_errors(lam):
    rewards, values, terminated, truncated = random_segment(3)
    next_values = torch.randn(values.shape, dtype=values.dtype, generator=torch.Generator().manual_seed(4))
    gamma = 0.9
    advantages = gae_advantages(rewards, values, next_values, terminated, truncated, gamma, lam)
    steps, envs = rewards.shape
    for env in range(envs):
        for start, end in pieces(terminated, truncated, env):
            for t in range(start, end + 1):
                # A_t = sum_k (gamma lam)^k delta_{t+k} over the rest of the piece; no value after a termination
                expected = 0.0
                for k in range(end - t + 1):
                    u = t + k
                    closing = 0.0 if terminated[u, env] else float(next_values[u, env])
                    delta = float(rewards[u, env]) + gamma * closing - float(values[u, env])
                    expected += (gamma * lam) ** k * delta
                assert float(advantages[t, env]) == pytest.approx(expected, rel=1e-9, abs=1e-12)


def test_clipped_surrogate_stops_the_gradient_beyond_the_clip_range():
    old = torch.zeros(4, dtype=torch.float64)
    log_prob = torch.log(torch.tensor([1.0, 1.05, 1.5, 0.5], dtype=torch.float64)).requires_grad_(True)
    advantages = torch.tensor([1.0, 1.0, 1.0, -1.0], dtype=torch.float64)
    loss, fraction = clipped_surrogate_loss(log_prob, old, advantages, clip_range=0.2)
    ratio = log_prob.detach().exp()
    # min(rho A, clip(rho) A): 1.5 with A > 0 and 0.5 with A < 0 are clipped (constant), the others are not
    expected = -torch.tensor([1.0, 1.05, 1.2, -0.8], dtype=torch.float64).mean()
    assert float(loss.detach()) == pytest.approx(float(expected))
    assert float(fraction) == pytest.approx(0.5)
    (grad,) = torch.autograd.grad(loss, log_prob)
    # d(rho A)/d(log pi) = rho A where unclipped, 0 where clipped; the loss is minus the mean
    unclipped = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=torch.float64)
    torch.testing.assert_close(grad, -unclipped * ratio * advantages / 4)


def test_buffer_keeps_the_log_probabilities_of_the_policy_that_acted():
    config = resolve_config("apg-ppo", POINT_MASS, {"num_envs": 4, **PROXIMAL})
    learner, envs, params = make_learner(config)
    with torch.no_grad():
        segment, _, _ = unroll(learner.model, learner.normalizer, envs, 5)
    buffer = ProximalBuffer()
    buffer.add(learner.model, learner.normalizer, segment, torch.tensor([True, True, False, True]), value_scale=2.0)
    with torch.no_grad():
        learner.model.log_std.add_(1.0)  # a later policy step must not change what was stored
    batch = buffer.take()
    assert buffer.steps == 0 and batch["rewards"].shape == (5, 4)
    learner.model.log_std.data.sub_(1.0)
    expected = learner.model.distribution(segment.obs_normalized).log_prob(segment.pre_squash).sum(-1)
    torch.testing.assert_close(batch["old_log_prob"], expected.detach())
    # values of the value network before any fit on these returns, in its units: V(o_t) and V(o_{t+1})
    # (pre-reset); rewards divided by the value scale at collection
    with torch.no_grad():
        torch.testing.assert_close(batch["values"], learner.model.value(segment.obs_normalized))
        torch.testing.assert_close(batch["next_values"], learner.model.value(learner.normalizer(segment.next_obs)))
    torch.testing.assert_close(batch["rewards"], segment.rewards / 2.0)
    assert batch["valid"][:, 2].logical_not().all() and batch["valid"][:, [0, 1, 3]].all()


@pytest.mark.parametrize("estimator", ["none", "analytic"])
@pytest.mark.parametrize("env_id", diffgym.TASK_IDS)
def test_proximal_path_trains_on_every_task(tmp_path, env_id, estimator):
    # 4 envs x K = 4, horizon 8: one proximal update (2 epochs x 4 minibatches of 8) after every 2nd segment
    config = small_config(tmp_path, env_id, "gae", total_env_steps=4 * 4 * 4,
                          **{**PROXIMAL, "algo_params.value.bootstrap": "critic",
                             "algo_params.policy_gradient.estimator": estimator})
    rows = [r for r in read_metrics(train(config, progress=False)) if "segment_length" in r]
    assert ["proximal_loss" in r for r in rows] == [False, True, False, True]
    per_segment = 1 if estimator == "analytic" else 0
    assert [r["policy_steps"] for r in rows] == [per_segment, per_segment + 8] * 2
    assert rows[-1]["grad_steps"] == 2 * (2 * per_segment + 8)
    assert all(math.isfinite(r["proximal_loss"]) and 0.0 <= r["proximal_clip_fraction"] <= 1.0
               for r in rows if "proximal_loss" in r)
    # no analytic step: no gradient norm (metrics.jsonl writes non-finite numbers as strings)
    assert all(r["grad_norm"] == "nan" for r in rows) == (estimator == "none")


def test_value_fit_on_the_gae_returns_counts_its_critic_steps(tmp_path):
    changes = {"total_env_steps": 2 * 4 * 4}
    plain = read_metrics(train(proximal_config(tmp_path, "critic", "plain", **changes), progress=False))
    fitted = read_metrics(train(proximal_config(tmp_path, "gae", "fitted", **changes), progress=False))
    # small_config fits the critic in 1 epoch x 2 minibatches per segment; the joint steps are 8 value steps
    assert [r["critic_grad_steps"] for r in plain if "segment_length" in r] == [2, 4]
    assert [r["critic_grad_steps"] for r in fitted if "segment_length" in r] == [0, 8]
    assert [("proximal_value_loss" in r) for r in fitted if "segment_length" in r] == [False, True]
    assert not any("proximal_value_loss" in r for r in plain)


def test_gae_bootstrap_leaves_the_value_network_to_the_joint_steps(tmp_path):
    """``bootstrap: gae``: the tail comes from the online value network, which only the proximal
    path's joint steps move (no TD or Monte-Carlo fit of its own), and whose gradient reaches the actor."""
    config = proximal_config(tmp_path, "gae")
    learner, envs, params = make_learner(config)
    value = learner.value
    critic_before = [p.detach().clone() for p in value.parameters]
    stats = apg_update(learner, envs, params, config)  # 4 steps: the buffer holds half a horizon
    assert "critic_loss" not in stats and value.grad_steps == 0
    assert all(torch.equal(p, q) for p, q in zip(value.parameters, critic_before))
    assert not value.optimizer.state  # the value function's own Adam is never used
    stats = apg_update(learner, envs, params, config)  # the horizon is full: 2 epochs x 32 / 8 minibatch steps
    assert stats["proximal_grad_steps"] == 8 and value.grad_steps == 8
    assert any(not torch.equal(p, q) for p, q in zip(value.parameters, critic_before))
    # the tail is the online network the joint steps moved, not the (never updated) target network
    obs = envs.obs
    torch.testing.assert_close(value.tail(obs), value(learner.normalizer(obs)))
    assert not torch.allclose(value.tail(obs), value.target(learner.normalizer(obs)).squeeze(-1))
    # the tail is differentiable in the observation it closes, so the analytic step sees dV/ds
    obs = envs.obs.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(value.tail(obs).sum(), obs)
    assert grad.abs().sum() > 0


def test_segment_lr_sets_the_segment_steps_rate_and_leaves_the_shared_spec_to_the_proximal_steps(tmp_path):
    config = proximal_config(tmp_path, "gae", **{"algo_params.policy_gradient.lr": 3e-5})
    learner, _, _ = make_learner(config)
    assert config.optimizer.lr != 3e-5
    assert [g["lr"] for g in learner.optimizer.param_groups] == [3e-5]
    assert [g["lr"] for g in learner.proximal.optimizer.param_groups] == [config.optimizer.lr]
    assert learner.optimizer.param_groups[0]["betas"] == tuple(config.optimizer.betas)


@pytest.mark.parametrize("estimator, gate", [("none", False), ("analytic", False), ("analytic", True)])
def test_resume_with_a_half_filled_buffer_continues_identically(tmp_path, monkeypatch, estimator, gate):
    # 2 envs x K = 30, horizon 90: proximal updates after segments 3 and 6; the checkpoint after segment 4
    # holds one segment in the buffer
    changes = {"num_envs": 2, "eval_every_env_steps": 4 * 60, "total_env_steps": 8 * 60,
               "algo_params.segment.length": 30, "algo_params.policy_gradient.estimator": estimator,
               "algo_params.proximal.n_steps": 90, "algo_params.proximal.batch_size": 32,
               "algo_params.value.normalize_reward": True, "algo_params.proximal.gate_segment_steps": gate}
    if gate:  # the opposite of the path's own gradient: the first comparison closes the gate, so the
        # checkpoint after segment 4 holds a closed gate and a half-summed gradient, both to be resumed
        reference = diffgym_apg.proximal.likelihood_ratio_gradient
        monkeypatch.setattr(diffgym_apg.proximal, "likelihood_ratio_gradient", lambda *args: -reference(*args))
    straight = train(proximal_config(tmp_path, "gae", "straight", **changes), progress=False)
    halfway = straight_checkpoints(straight)[1]
    assert halfway == 4 * 60
    train(proximal_config(tmp_path, "gae", "resumed", **{**changes, "total_env_steps": halfway}), progress=False)
    resumed = train(proximal_config(tmp_path, "gae", "resumed", **changes), progress=False)

    def updates(run_dir):
        return [{k: v for k, v in r.items() if k not in ("wall_time", "eval_wall_time")} for r in read_metrics(run_dir)
                if "segment_length" in r]

    assert updates(resumed) == updates(straight)
    assert sum("proximal_loss" in r for r in updates(straight)) == 2
    if gate:  # the gate closed at the first comparison, before the checkpoint
        assert [r["proximal_segment_steps_next"] for r in updates(straight) if "proximal_loss" in r] == [0.0, 0.0]
        rows = updates(straight)  # segments 4-6 gated: the 6th's steps are the clipped epochs' alone
        assert [r["policy_steps"] for r in rows[3:5]] == [0.0, 0.0]
        assert rows[5]["policy_steps"] == rows[5]["proximal_grad_steps"]
    else:
        assert not any("proximal_segment_agreement" in r for r in updates(straight))  # compared only when gating
    a, b = latest_checkpoint(straight), latest_checkpoint(resumed)
    for key in ("actor_critic", "normalizer", "target_critic"):
        for name in a[key]:
            assert torch.equal(a[key][name], b[key][name]), f"{key}.{name}"


def test_return_scale_is_the_std_of_every_running_discounted_return():
    gamma, gen = 0.9, torch.Generator().manual_seed(1)
    scale = ReturnScale(num_envs=3, gamma=gamma, epsilon=0.0)
    seen, running = [], torch.zeros(3, dtype=torch.float64)
    for _ in range(3):  # segments of 5 steps; episode ends restart the running return
        rewards = torch.randn(5, 3, generator=gen, dtype=torch.float64)
        done = torch.rand(5, 3, generator=gen) < 0.3
        scale.update(rewards, done)
        for t in range(5):
            running = gamma * running + rewards[t]
            seen.append(running.clone())
            running = torch.where(done[t], 0.0, running)
    expected = torch.stack(seen).flatten().var(unbiased=False).sqrt()
    # the parallel update starts from a prior of variance 1 with weight epsilon (0 here): exact
    assert scale.scale == pytest.approx(float(expected), rel=1e-9)


@pytest.mark.parametrize("bootstrap", ["mc", "critic", "gae"])
def test_normalize_reward_keeps_every_value_in_return_units(tmp_path, bootstrap):
    config = proximal_config(tmp_path, bootstrap, **{"algo_params.value.normalize_reward": True})
    learner, envs, params = make_learner(config)
    value = learner.value
    value.return_scale.stats.var.fill_(16.0 - value.return_scale.stats.spec.epsilon)  # scale 4
    obs = envs.obs
    network = learner.model.value(learner.normalizer(obs))
    with torch.no_grad():
        value.target.load_state_dict(learner.model.critic.state_dict())
    torch.testing.assert_close(value(learner.normalizer(obs)), 4.0 * network)
    torch.testing.assert_close(value.tail(obs), 4.0 * network)
    # and a run with it trains, its scale following the returns
    rows = [r for r in read_metrics(train(config, progress=False)) if "segment_length" in r]
    assert all(math.isfinite(r["proximal_loss"]) for r in rows if "proximal_loss" in r)
    assert any("proximal_loss" in r for r in rows)
    assert all(("proximal_value_loss" in r) == (bootstrap == "gae") for r in rows if "proximal_loss" in r)


def test_the_likelihood_ratio_gradient_is_the_clipped_surrogates_at_the_acting_policy():
    """What the segment steps are compared with: the gradient the clipped epochs' surrogate has before any
    step (ratio 1), over the whole batch with its advantages normalized over the batch."""
    learner, batch = _batch()
    config = ProximalConfig(gae_lambda=0.95, batch_size=8)  # summed over 5 minibatches of the 40 samples
    flat = likelihood_ratio_gradient(learner.model, learner.actor_parameters, batch, config, 0.99)
    advantages, keep, _ = batch_advantages(batch, config, 0.99)
    log_prob = learner.model.log_prob(batch["obs_normalized"][keep], batch["pre_squash"][keep])
    torch.testing.assert_close(log_prob.detach(), batch["old_log_prob"][keep])  # the acting policy's
    loss, _ = clipped_surrogate_loss(log_prob, batch["old_log_prob"][keep],
                                     (advantages - advantages.mean()) / (advantages.std() + 1e-8), 0.2)
    grads = torch.autograd.grad(loss, learner.actor_parameters, allow_unused=True)
    expected = torch.cat([(torch.zeros_like(p) if g is None else g).flatten()
                          for p, g in zip(learner.actor_parameters, grads)])
    torch.testing.assert_close(flat, expected)
    assert flat.abs().sum() > 0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_the_gate_takes_segment_steps_only_while_they_agree_with_the_clipped_path(tmp_path, monkeypatch, sign):
    """``proximal.gate_segment_steps``: at the clipped update the rollout's summed segment gradients are
    compared with the path's; agreement keeps the segment steps, disagreement stops them until a later
    comparison agrees (they are still computed and compared meanwhile)."""
    config = proximal_config(tmp_path, "gae", **{"algo_params.proximal.gate_segment_steps": True})
    learner, envs, params = make_learner(config)
    observed = []
    monkeypatch.setattr(diffgym_apg.proximal, "likelihood_ratio_gradient",
                        lambda *args: observed.append(learner.proximal.segment_gradient.clone()) or sign * observed[-1])
    first = apg_update(learner, envs, params, config)  # 4 of the 8 steps per env: no comparison yet
    assert first["policy_steps"] == 1 and "proximal_segment_agreement" not in first
    summed = learner.proximal.segment_gradient.clone()
    second = apg_update(learner, envs, params, config)  # the buffer is full: compared, then the clipped epochs
    assert second["proximal_segment_agreement"] == pytest.approx(sign)
    assert second["proximal_segment_steps_next"] == (sign > 0)
    assert not torch.equal(observed[0], summed)  # both segments' gradients, summed
    assert learner.proximal.segment_gradient is None  # a new sum for the next rollout
    actor = [p.detach().clone() for p in learner.actor_parameters]
    third = apg_update(learner, envs, params, config)
    moved = any(not torch.equal(p, q) for p, q in zip(learner.actor_parameters, actor))
    assert moved == (sign > 0) and third["policy_steps"] == (1 if sign > 0 else 0)
    assert learner.proximal.segment_gradient is not None  # compared at the next update either way


def test_the_two_paths_agree_on_point_mass_where_the_gradient_is_smooth(tmp_path):
    """The comparison's sign convention on real gradients: on PointMass1D (no contact) the analytic segment
    gradients and the likelihood ratio estimate the same gradient, so their cosine is clearly positive."""
    config = proximal_config(tmp_path, "gae", **{"algo_params.proximal.gate_segment_steps": True, "num_envs": 256,
                                                 "algo_params.proximal.n_steps": 32, "algo_params.segment.length": 8,
                                                 "algo_params.proximal.batch_size": 256})
    learner, envs, params = make_learner(config)
    for _ in range(3):
        apg_update(learner, envs, params, config)
    stats = apg_update(learner, envs, params, config)  # 4 segments of 8 steps: the first comparison
    assert stats["proximal_segment_agreement"] > 0.5 and stats["proximal_segment_steps_next"] == 1.0


def test_a_gated_update_leaves_the_segment_steps_rate_as_it_was(tmp_path, monkeypatch):
    config = proximal_config(tmp_path, "gae", **{"algo_params.proximal.gate_segment_steps": True,
                                                 "algo_params.policy_gradient.lr_decay": 0.5})
    learner, envs, params = make_learner(config)
    monkeypatch.setattr(diffgym_apg.proximal, "likelihood_ratio_gradient",
                        lambda *args: -learner.proximal.segment_gradient)
    rate = learner.optimizer.param_groups[0]["lr"]
    apg_update(learner, envs, params, config)
    apg_update(learner, envs, params, config)  # two steps taken, then the gate closes
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(rate * 0.25)
    apg_update(learner, envs, params, config)  # gated
    assert learner.optimizer.param_groups[0]["lr"] == pytest.approx(rate * 0.25)


def test_a_config_saved_before_a_field_existed_reads_as_it_ran():
    """Sections' fields added later (and the reuse section) take the values that keep an earlier run as it
    ran, so the run directory's key-by-key comparison lets it resume with its own command."""
    full = resolve_config("apg-ppo", POINT_MASS, {}).to_dict()
    saved = copy.deepcopy(full)
    del saved["algo_params"]["proximal"]["gate_segment_steps"], saved["algo_params"]["policy_gradient"]["lr_decay"]
    del saved["algo_params"]["reuse"]
    assert upgrade_config(saved)["algo_params"] == full["algo_params"]


def test_the_gate_needs_a_segment_step():
    with pytest.raises(ValueError, match="gate_segment_steps gates the segment steps: estimator 'none' takes none"):
        APGConfig.from_params({"policy_gradient": {"estimator": "none"}, "value": {"bootstrap": "gae"},
                               "proximal": {"gate_segment_steps": True}})


def _batch(seed: int = 0, value_scale: float = 1.0):
    config = resolve_config("apg-ppo", POINT_MASS, {"num_envs": 4, **PROXIMAL})
    torch.manual_seed(seed)
    learner, envs, params = make_learner(config)
    buffer = ProximalBuffer()
    with torch.no_grad():
        for _ in range(2):
            segment, state, obs = unroll(learner.model, learner.normalizer, envs, 5)
            buffer.add(learner.model, learner.normalizer, segment, torch.ones(4, dtype=torch.bool), value_scale)
            envs.state, envs.obs = state, obs
    return learner, buffer.take()


def test_the_joint_value_loss_targets_the_gae_returns():
    learner, batch = _batch(value_scale=4.0)
    advantages = gae_advantages(batch["rewards"], batch["values"], batch["next_values"], batch["terminated"],
                                batch["truncated"], 0.99, 0.95)
    targets = advantages + batch["values"]
    with torch.no_grad():
        expected = (learner.model.value(learner.normalizer(batch["start_obs"])) - targets).square().mean()
    optimizer = torch.optim.Adam(learner.actor_parameters + learner.value.parameters, lr=1e-3)
    # one epoch, one minibatch of all 40 samples: the logged value loss is the one before the step
    stats = clipped_epochs(learner.model, learner.normalizer, optimizer, learner.actor_parameters, batch,
                           ProximalConfig(n_epochs=1, batch_size=40, gae_lambda=0.95), gamma=0.99,
                           optimizer_spec=OptimizerSpec(), value_parameters=learner.value.parameters)
    assert stats["proximal_value_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert stats["proximal_grad_steps"] == 1 and stats["proximal_skipped_steps"] == 0


def test_the_value_fit_divides_its_targets_by_the_value_scale(tmp_path):
    config = small_config(tmp_path, POINT_MASS, "critic", **{"algo_params.value.normalize_reward": True,
                                                            "algo_params.value.epochs": 1,
                                                            "algo_params.value.minibatches": 1})
    learner, envs, params = make_learner(config)
    value = learner.value
    value.return_scale.stats.var.fill_(9.0 - value.return_scale.stats.spec.epsilon)  # scale 3
    obs, targets = envs.obs, torch.tensor([3.0, -6.0, 9.0, 0.0])
    with torch.no_grad():
        expected = (learner.model.value(learner.normalizer(obs)) - targets / 3.0).square().mean()
    assert value.regress(obs, targets) == pytest.approx(float(expected), rel=1e-5)


def test_an_env_left_out_passes_nothing_to_the_steps_before_it():
    learner, batch = _batch()
    clean = {k: v.clone() for k, v in batch.items()}
    # env 1 diverges in the second segment (steps 5-9): NaN rewards there, and it is left out
    batch["rewards"][5:, 1] = math.nan
    batch["valid"][5:, 1] = False
    # what its first segment's advantages must be: that segment alone, closed by its next value
    alone = gae_advantages(clean["rewards"][:5], clean["values"][:5], clean["next_values"][:5], clean["terminated"][:5],
                           clean["truncated"][:5] | (torch.arange(5) == 4)[:, None], 0.99, 0.95)
    advantages = gae_advantages(clean["rewards"], clean["values"], clean["next_values"], clean["terminated"],
                                clean["truncated"], 0.99, 0.95)
    advantages[:5, 1] = alone[:, 1]
    keep = batch["valid"]
    targets = (advantages + clean["values"])[keep]
    with torch.no_grad():
        expected = (learner.model.value(learner.normalizer(clean["start_obs"][keep])) - targets).square().mean()
    optimizer = torch.optim.Adam(learner.actor_parameters + learner.value.parameters, lr=1e-3)
    # one minibatch of the 35 kept samples: the logged value loss is the one before the step
    stats = clipped_epochs(learner.model, learner.normalizer, optimizer, learner.actor_parameters, batch,
                           ProximalConfig(n_epochs=1, batch_size=64, gae_lambda=0.95), gamma=0.99,
                           optimizer_spec=OptimizerSpec(), value_parameters=learner.value.parameters)
    assert math.isfinite(stats["proximal_loss"])
    assert stats["proximal_value_loss"] == pytest.approx(float(expected), rel=1e-5)
