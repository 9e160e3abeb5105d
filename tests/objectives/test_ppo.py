"""PPO's pieces against hand computations and a dense reference: GAE and the shaped rewards on numbers worked out by
hand, the clipped losses against the formula, the chunked objective (loss and gradients) against full logits, and a
step with zero advantages that moves the value head only."""

import math

import pytest
import torch
import torch.nn.functional as F

from tokentune.adapters.lora import LoraAdapter, LoraConfig
from tokentune.config import ModelConfig, TrainConfig
from tokentune.engine.optim import build_optimizer
from tokentune.errors import TokentuneError
from tokentune.models.loading import load_model
from tokentune.objectives.ppo import PPOLoss, PPOLossConfig, clipped_losses, gae, token_rewards


def test_gae_equals_a_hand_computation():
    # row 0 (3 tokens), gamma 0.9, lam 0.8:
    #   d2 = 1.0 - 0.2 = 0.8                   A2 = 0.8
    #   d1 = -0.2 + 0.9*0.2 - 0.3 = -0.32      A1 = -0.32 + 0.72*0.8 = 0.256
    #   d0 = 0.1 + 0.9*0.3 - 0.5 = -0.13       A0 = -0.13 + 0.72*0.256 = 0.05432
    # row 1 (2 tokens; the third column is padding and must not leak in):
    #   d1 = 0.5 - 0.4 = 0.1                   A1 = 0.1
    #   d0 = 0.3 + 0.9*0.4 - 0.1 = 0.56        A0 = 0.56 + 0.72*0.1 = 0.632
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.3, 0.5, 9.0]])
    values = torch.tensor([[0.5, 0.3, 0.2], [0.1, 0.4, 7.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    torch.testing.assert_close(adv, torch.tensor([[0.05432, 0.256, 0.8], [0.632, 0.1, 0.0]]))
    torch.testing.assert_close(ret, torch.tensor([[0.55432, 0.556, 1.0], [0.732, 0.5, 0.0]]))


def test_gae_with_gamma_and_lambda_one_is_reward_to_go_minus_value():
    rewards, values = torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([[0.5, -1.0, 2.0]])
    adv, ret = gae(rewards, values, torch.ones(1, 3), gamma=1.0, lam=1.0)
    torch.testing.assert_close(ret, torch.tensor([[6.0, 5.0, 3.0]]))
    torch.testing.assert_close(adv, ret - values)


def test_token_rewards_kl_penalty_and_clipped_score_at_the_last_token():
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-1.0, -1.0, 0.0]])
    ref = torch.tensor([[-1.5, -2.0, -0.5], [-0.5, -1.0, 0.0]])
    mask = torch.tensor([[1.0, 1, 1], [1, 1, 0]])
    r = token_rewards(logps, ref, torch.tensor([7.0, -0.25]), mask, kl_ctl=0.3, clip=5.0)
    # row 0: -0.3*(0.5), 0, 0 + clip(7) = 5 ; row 1: -0.3*(-0.5) = 0.15, 0 - 0.25 at its last token, padding 0
    torch.testing.assert_close(r, torch.tensor([[-0.15, 0.0, 5.0], [0.15, -0.25, 0.0]]))


def test_clipped_losses_equal_the_formula():
    ln = math.log
    logps = torch.tensor([ln(1.5), ln(0.5), ln(1.1), ln(1.5)])
    old = torch.zeros(4)
    adv = torch.tensor([1.0, -1.0, 2.0, -1.0])
    values = torch.tensor([1.0, 0.6, 0.0, 0.0])
    old_values = torch.tensor([0.5, 0.5, 0.0, 0.0])
    returns = torch.tensor([0.0, 1.0, 0.0, 0.0])
    policy, value, clipped = clipped_losses(logps, old, adv, values, old_values, returns, cliprange=0.2,
                                            cliprange_value=0.2)
    # ratio 1.5, A=1: max(-1.5, -1.2) = -1.2 | ratio 0.5, A=-1: max(0.5, 0.8) = 0.8
    # ratio 1.1 (inside), A=2: -2.2 | ratio 1.5, A=-1: max(1.5, 1.2) = 1.5 (pessimistic: unclipped)
    torch.testing.assert_close(policy, torch.tensor([-1.2, 0.8, -2.2, 1.5]))
    # V=1 (clipped to 0.7), R=0: 0.5*max(1, 0.49) = 0.5 | V=0.6 inside the range, R=1: 0.5*0.16 = 0.08
    torch.testing.assert_close(value, torch.tensor([0.5, 0.08, 0.0, 0.0]))
    assert clipped.tolist() == [1.0, 1.0, 0.0, 1.0]


def policy(perturb: float = 0.2, **loss_options):
    loaded = load_model(ModelConfig(name="builtin:tiny-llama", attn_implementation="sdpa"))
    adapter = LoraAdapter(LoraConfig(r=4, alpha=8))
    torch.manual_seed(0)
    adapter.attach(loaded.model, loaded.view)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for group in adapter.param_groups():
            for _, p in group.params:
                p.add_(torch.randn(p.shape, generator=g) * perturb)
    loss = PPOLoss(PPOLossConfig(**loss_options))
    loss.attach(loaded.model, loaded.view)
    return loaded, adapter, loss


def rollout_batch(vocab: int, seed: int = 0) -> dict:
    """Two rows (prompt 3 tokens, replies of 5 and 3 tokens, then padding) with random rollout fields."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, vocab, (2, 8), generator=g)
    labels = ids.clone()
    labels[:, :3] = -100
    labels[1, 6:] = -100
    batch = {"input_ids": ids, "labels": labels, "loss_weights": (labels != -100).float(),
             "position_ids": torch.arange(8).expand(2, -1), "attention_mask": torch.ones_like(ids)}
    for key, scale in (("old_logprobs", 1.0), ("old_values", 0.3), ("advantages", 1.0), ("returns", 1.0)):
        batch[key] = (torch.randn(2, 8, generator=g) * scale - (5.0 if key == "old_logprobs" else 0)) \
            * (labels != -100)
    return batch


def dense_reference(model, loss, batch, eps=0.2, eps_v=0.2, vf_coef=1.0):
    out = model(input_ids=batch["input_ids"], output_hidden_states=True)
    logp = F.log_softmax(out.logits[:, :-1].float(), -1)
    values = loss.head(out.hidden_states[-1][:, :-1])
    total = 0.0
    labels = batch["labels"]
    for b in range(labels.shape[0]):
        for t in range(1, labels.shape[1]):
            if labels[b, t] == -100:
                continue
            lp = logp[b, t - 1, labels[b, t]]
            ratio = torch.exp(lp - batch["old_logprobs"][b, t])
            a = batch["advantages"][b, t]
            pg = torch.maximum(-a * ratio, -a * torch.clamp(ratio, 1 - eps, 1 + eps))
            v, v_old, ret = values[b, t - 1], batch["old_values"][b, t], batch["returns"][b, t]
            v_clip = torch.clamp(v, v_old - eps_v, v_old + eps_v)
            total = total + pg + vf_coef * 0.5 * torch.maximum((v - ret) ** 2, (v_clip - ret) ** 2)
    return total


@pytest.mark.parametrize("value_hidden", [0, 8])
def test_chunked_objective_equals_the_dense_formula(value_hidden):
    loaded, adapter, loss = policy(value_hidden=value_hidden, vf_coef=0.5)
    with torch.no_grad():  # a non-zero value head, so the value loss has gradients on every layer
        for p in loss.head.parameters():
            p.normal_(0, 0.1)
    batch = rollout_batch(loaded.model.config.vocab_size)
    out = loss(loaded.model, loaded.view, batch, chunk_size=3)
    assert float(out.weight_sum) == 8 and float(loss.weight_total(batch)) == 8
    out.loss_sum.backward()
    trained = [p for g in adapter.param_groups() + loss.param_groups() for _, p in g.params]
    ours = [p.grad.clone() for p in trained]
    loaded.model.zero_grad()
    ref = dense_reference(loaded.model, loss, batch, vf_coef=0.5)
    ref.backward()
    torch.testing.assert_close(out.loss_sum, ref, atol=1e-4, rtol=1e-4)
    for mine, p in zip(ours, trained):
        torch.testing.assert_close(mine, p.grad, atol=1e-5, rtol=1e-3)


def test_value_loss_trains_the_head_only():
    loaded, adapter, loss = policy()
    batch = rollout_batch(loaded.model.config.vocab_size)
    batch["advantages"].zero_()
    loss(loaded.model, loaded.view, batch).loss_sum.backward()
    assert all(p.grad is None or not p.grad.any() for g in adapter.param_groups() for _, p in g.params)
    assert loss.head.net[-1].weight.grad.abs().sum() > 0


def _step(loaded, adapter, loss, batch):
    cfg = TrainConfig(lr=1e-2, weight_decay=0.0)
    opt = build_optimizer(adapter.param_groups() + loss.param_groups(), cfg, torch.device("cpu"))
    before_policy = {k: v.clone() for k, v in adapter.state_dict().items()}
    before_head = {k: v.clone() for k, v in loss.state_dict().items()}
    out = loss(loaded.model, loaded.view, batch)
    (out.loss_sum / out.weight_sum).backward()
    opt.step()
    policy_same = all(torch.equal(before_policy[k], v) for k, v in adapter.state_dict().items())
    head_same = all(torch.equal(before_head[k], v) for k, v in loss.state_dict().items())
    return policy_same, head_same


def test_zero_advantages_and_zero_kl_step_moves_only_the_value_head():
    """Spec check: a PPO step with zero advantages (and rollout log-probs equal to the policy's, i.e. no KL)
    leaves every policy parameter bit-identical; the value head still learns the returns."""
    loaded, adapter, loss = policy(critic_lr=1e-2)
    batch = rollout_batch(loaded.model.config.vocab_size)
    logps, _ = loss.score(loaded.view, batch, chunk_size=4)
    batch["old_logprobs"] = torch.zeros_like(batch["old_logprobs"])
    batch["old_logprobs"][:, 1:][batch["labels"][:, 1:] != -100] = logps
    batch["advantages"].zero_()
    policy_same, head_same = _step(loaded, adapter, loss, batch)
    assert policy_same and not head_same
    # control: the same step with non-zero advantages moves the policy
    loaded, adapter, loss = policy(critic_lr=1e-2)
    policy_same, _ = _step(loaded, adapter, loss, rollout_batch(loaded.model.config.vocab_size))
    assert not policy_same


def test_ratio_is_one_on_the_rollout_policy():
    loaded, adapter, loss = policy()
    batch = rollout_batch(loaded.model.config.vocab_size)
    logps, values = loss.score(loaded.view, batch, chunk_size=4)
    assert values.shape == logps.shape == (8,) and not values.any()  # the zero-initialised head
    batch["old_logprobs"][:, 1:][batch["labels"][:, 1:] != -100] = logps
    out = loss(loaded.model, loaded.view, batch)
    assert out.metrics["approx_kl"] == pytest.approx(0.0, abs=1e-5) and out.metrics["clipped"] == 0


def test_value_head_state_round_trip_and_errors(tmp_path):
    loaded, _, loss = policy(value_hidden=4)
    with torch.no_grad():
        for p in loss.head.parameters():
            p.normal_()
    loss.save(tmp_path)
    other = policy(value_hidden=4)[2]
    other.load(tmp_path)
    assert all(torch.equal(a, b) for a, b in zip(loss.state_dict().values(), other.state_dict().values()))
    assert loaded.model.tokentune_ppo_value is loss.head
    batch = rollout_batch(loaded.model.config.vocab_size)
    del batch["returns"]
    with pytest.raises(TokentuneError, match="rollout fields"):
        loss(loaded.model, loaded.view, batch)
    with pytest.raises(TokentuneError, match="not attached"):
        PPOLoss().param_groups()
