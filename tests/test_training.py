"""The one training loop: steps, schedule, clipping, history, errors, epoch callbacks, eval mode afterwards."""

from __future__ import annotations

import pytest
import torch

from omniad.training import batch_indices, epoch_batches, epoch_means, train


def _problem():
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    return net, torch.randn(8, 3)


def test_train_steps_the_optimiser_and_schedule_and_leaves_eval_mode_even_when_interrupted():
    net, x = _problem()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.5)

    def loss_of_batch(step, index, model):
        assert net.training and model is net  # one process: no wrapper
        return model(x[index]).pow(2).mean()

    history = train(net, optimizer, [torch.arange(8)] * 4, loss_of_batch, total=4, desc="test", scheduler=scheduler)
    assert len(history) == 4 and history[-1] < history[0]
    assert not net.training
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**4)

    def failing(step, index, model):
        if step == 1:
            raise KeyboardInterrupt
        return net(x[index]).pow(2).mean()

    with pytest.raises(KeyboardInterrupt):
        train(net, optimizer, batch_indices(8, 4, 4, torch.Generator()), failing, total=4, desc="test")
    assert not net.training


def test_a_non_finite_loss_stops_training_before_the_step_is_taken():
    net, x = _problem()
    before = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=0.1)
    with pytest.raises(FloatingPointError, match="test: the loss became nan at step 0"):
        train(net, optimizer, [torch.arange(4)], lambda s, i, m: m(x[i]).sum() * float("nan"), total=1, desc="test")
    for p, q in zip(net.parameters(), before):
        torch.testing.assert_close(p, q)


def test_gradient_clipping_bounds_the_update():
    net, x = _problem()
    start = [p.detach().clone() for p in net.parameters()]
    optimizer = torch.optim.SGD(net.parameters(), lr=1.0)
    train(net, optimizer, [torch.arange(8)], lambda s, i, m: 1e3 * m(x[i]).pow(2).mean(), total=1, desc="t",
          grad_clip=0.1)
    moved = torch.cat([(p - q).flatten() for p, q in zip(net.parameters(), start)])
    assert moved.norm().item() == pytest.approx(0.1, rel=1e-4)  # lr 1 x a gradient clipped to norm 0.1


def test_epoch_callback_sees_the_weighted_epoch_mean_in_eval_mode():
    net, x = _problem()
    optimizer = torch.optim.SGD(net.parameters(), lr=0.0)  # no learning: every epoch has the same losses
    seen = []

    def on_epoch(epoch, mean):
        assert not net.training and not torch.is_grad_enabled()
        seen.append((epoch, mean))

    batches = list(epoch_batches(5, 2, 3, torch.Generator().manual_seed(0)))
    assert [len(b) for b in batches] == [2, 2, 1] * 3
    history = train(net, optimizer, batches, lambda s, i, m: m(x[i]).pow(2).mean(), total=9, desc="t",
                    steps_per_epoch=3, on_epoch=on_epoch)
    means = epoch_means(history, 5, 2)
    assert [e for e, _ in seen] == [0, 1, 2]
    assert [m for _, m in seen] == pytest.approx(means)
    expected = net(x[:5]).pow(2).mean().item()  # each epoch covers the 5 items once, weighted by batch size
    assert means[0] == pytest.approx(expected, rel=1e-5)
    assert net.training is False


def test_batch_indices_are_shuffled_passes_without_repeats():
    batches = list(batch_indices(10, 4, 5, torch.Generator().manual_seed(0)))
    assert len(batches) == 5 and all(len(b) == 4 for b in batches)
    assert len(set(torch.cat(batches[:2]).tolist())) == 8  # no repeats within a pass (the tail of 2 is dropped)
    assert [len(b) for b in batch_indices(3, 8, 2, torch.Generator())] == [3, 3]
