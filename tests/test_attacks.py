"""PGD: constraints, strength, side effects, the recorded path, and agreement with ART."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detector import analyze, pgd

ATTACKS = {"linf": dict(eps=0.1, alpha=0.025), "l2": dict(eps=1.0, alpha=0.25)}


@pytest.fixture(scope="module")
def batch(digits_test):
    return digits_test.batch(slice(0, 120))


@pytest.mark.parametrize("norm", ["linf", "l2"])
@pytest.mark.parametrize("random_start", [False, True])
def test_every_iterate_stays_in_the_ball_and_in_pixel_range(digits_model, batch, norm, random_start):
    x, y = batch
    eps = ATTACKS[norm]["eps"]
    for steps in range(0, 6):  # the attack is deterministic given the seed, so steps=t gives iterate t
        x_t = pgd(digits_model, x, y, norm=norm, steps=steps, random_start=random_start, seed=1,
                  **ATTACKS[norm])
        delta = (x_t - x).flatten(1)
        size = delta.abs().amax(1) if norm == "linf" else delta.norm(dim=1)
        assert float(size.max()) <= eps + 1e-6
        assert float(x_t.min()) >= 0.0 and float(x_t.max()) <= 1.0
    assert steps > 0 and not torch.equal(x_t, x)


def test_success_rises_with_eps_and_reaches_all(digits_model, batch):
    x, y = batch
    rates = []
    for eps in (0.02, 0.1, 0.2, 0.4):
        x_adv = pgd(digits_model, x, y, eps=eps, alpha=eps / 4, steps=10)
        with torch.no_grad():
            rates.append(float((digits_model(x_adv).argmax(1) != y).float().mean()))
    assert rates == sorted(rates), rates
    assert rates[0] < 0.2 and rates[-1] >= 0.99, rates


def test_model_is_left_untouched(digits_model, batch):
    x, y = batch
    before = {k: v.clone() for k, v in digits_model.state_dict().items()}
    digits_model.zero_grad(set_to_none=True)  # training leaves the last step's gradients behind
    digits_model.train()  # BatchNorm statistics would move if the attack ran in train mode
    try:
        pgd(digits_model, x, y, eps=0.2, alpha=0.05, steps=5, record=True)
        assert digits_model.training, "the caller's mode is restored"
    finally:
        digits_model.eval()
    after = digits_model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.grad is None for p in digits_model.parameters())


def test_attack_runs_in_eval_mode(digits_model, batch):
    x, y = batch
    seen = []
    handle = digits_model.register_forward_pre_hook(lambda m, _: seen.append(m.training))
    try:
        digits_model.train()
        pgd(digits_model, x, y, steps=3)
    finally:
        handle.remove()
        digits_model.eval()
    assert seen and not any(seen)


def test_recorded_path_matches_independent_forward_passes(digits_model, batch):
    x, y = batch
    steps = 6
    result = pgd(digits_model, x, y, eps=0.3, alpha=0.075, steps=steps, record=True)
    n, k = x.shape[0], 10
    assert result.sharpness.shape == (n, steps + 1) and result.loss.shape == (n, steps + 1)
    assert result.predictions.shape == (n, steps + 1) and result.psi.shape == (n, steps + 1, k)
    for t in (0, 3, steps):
        x_t = pgd(digits_model, x, y, eps=0.3, alpha=0.075, steps=t)
        ref = analyze(digits_model, x_t)
        assert torch.allclose(result.sharpness[:, t], ref.sharpness, rtol=1e-4, atol=1e-6)
        assert torch.allclose(result.psi[:, t], ref.psi, rtol=1e-4, atol=1e-7)
        assert torch.equal(result.predictions[:, t], ref.predictions)
        assert torch.allclose(result.loss[:, t], F.cross_entropy(ref.logits, y, reduction="none"), atol=1e-4)
    assert torch.equal(result.x_adv, pgd(digits_model, x, y, eps=0.3, alpha=0.075, steps=steps))
    assert torch.equal(result.success, result.predictions[:, -1] != y)
    # The loss climbs along the path on average: it is what the attack maximises.
    assert float(result.loss[:, -1].mean()) > float(result.loss[:, 0].mean())


def test_recording_costs_one_extra_forward_pass(digits_model, batch):
    x, y = batch
    calls = []
    handle = digits_model.register_forward_hook(lambda *_: calls.append(1))
    try:
        pgd(digits_model, x, y, steps=7)
        plain = len(calls)
        calls.clear()
        pgd(digits_model, x, y, steps=7, record=True)
        recorded = len(calls)
    finally:
        handle.remove()
    assert plain == 7 and recorded == 8


def test_random_start_is_seeded(digits_model, batch):
    x, y = batch
    a = pgd(digits_model, x, y, random_start=True, seed=3, steps=2)
    b = pgd(digits_model, x, y, random_start=True, seed=3, steps=2)
    c = pgd(digits_model, x, y, random_start=True, seed=4, steps=2)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_a_recorded_path_starts_at_the_clean_input_under_a_random_start(digits_model, batch):
    """Step 0 is the clean input (what 'rise over clean' divides by), not the random start; the last step
    is the returned adversarial, and there are still steps + 1 of them."""
    x, y = batch
    clean = analyze(digits_model, x)
    path = pgd(digits_model, x, y, random_start=True, seed=3, steps=4, record=True, keep_iterates=True,
               **ATTACKS["linf"])
    assert path.sharpness.shape == (len(x), 5)
    assert torch.equal(path.iterates[:, 0], x)
    torch.testing.assert_close(path.sharpness[:, 0], clean.sharpness, rtol=1e-5, atol=0)
    assert torch.equal(path.iterates[:, -1], path.x_adv)
    assert torch.equal(path.x_adv, pgd(digits_model, x, y, random_start=True, seed=3, steps=4, **ATTACKS["linf"]))


def test_bad_arguments_are_refused(digits_model, batch):
    x, y = batch
    with pytest.raises(ValueError, match="norm"):
        pgd(digits_model, x, y, norm="l1")
    with pytest.raises(ValueError, match="examples"):
        pgd(digits_model, x, y[:3])
    # A NaN or infinite budget would make NaN pixels (NaN < 0 is False: plain comparisons let it by).
    for budget, match in ((dict(eps=float("nan")), "eps must be a finite"), (dict(alpha=float("nan")), "alpha"),
                          (dict(alpha=float("inf")), "alpha"), (dict(steps=2.5), "whole"),
                          (dict(eps=-0.1), "eps >= 0")):
        with pytest.raises(ValueError, match=match):
            pgd(digits_model, x, y, **budget)
    # Pixels outside [0, 1] would be moved off the ε-ball by the attack's own clamp.
    in_range = r"in \[0, 1\], got values in"
    for bad, match in ((x * 2, in_range + r" \[0, 2\]"), (x.masked_fill(x > 0.5, float("nan")), in_range),
                       ((x * 255).to(torch.uint8), "floating-point"), (x.double().sub(1), in_range)):
        with pytest.raises((ValueError, TypeError), match=match):
            pgd(digits_model, bad, y)
    with pytest.raises(TypeError, match="integer class labels"):
        pgd(digits_model, x, y.float())
    with torch.inference_mode(), pytest.raises(RuntimeError, match="outside it"):
        pgd(digits_model, x, y)
    # Any integer labels do: int32 ones are the same attack.
    assert torch.equal(pgd(digits_model, x, y.int(), steps=2), pgd(digits_model, x, y, steps=2))


def test_no_steps_is_the_clean_input_with_or_without_a_random_start(digits_model, batch):
    x, y = batch
    path = pgd(digits_model, x, y, steps=0, random_start=True, seed=0, record=True, keep_iterates=True)
    assert torch.equal(path.x_adv, x) and torch.equal(path.iterates[:, 0], x) and path.sharpness.shape == (len(x), 1)
    assert torch.equal(pgd(digits_model, x, y, steps=0, random_start=True, seed=0), x)


@pytest.mark.parametrize("norm", ["linf", "l2"])
def test_agrees_with_adversarial_robustness_toolbox(digits_model, batch, norm):
    """ART's PyTorch PGD without random init, on the same model and inputs."""
    art_cls = pytest.importorskip("art.estimators.classification").PyTorchClassifier
    art_pgd = pytest.importorskip("art.attacks.evasion").ProjectedGradientDescentPyTorch
    x, y = batch
    params = ATTACKS[norm]
    classifier = art_cls(digits_model, loss=torch.nn.CrossEntropyLoss(), input_shape=tuple(x.shape[1:]),
                         nb_classes=10, clip_values=(0.0, 1.0))
    attack = art_pgd(classifier, norm=np.inf if norm == "linf" else 2, eps=params["eps"],
                     eps_step=params["alpha"], max_iter=10, num_random_init=0, batch_size=len(x),
                     verbose=False)
    theirs = torch.from_numpy(attack.generate(x.numpy(), y=y.numpy()))
    ours = pgd(digits_model, x, y, norm=norm, steps=10, **params)
    with torch.no_grad():
        agree = float((digits_model(theirs).argmax(1) == digits_model(ours).argmax(1)).float().mean())
    max_diff = float((theirs - ours).abs().max())
    # Measured: L∞ bit-identical; L2 max |Δ| 3.7e-6 (the two normalise gradients with different ε).
    assert agree == 1.0
    assert max_diff <= (0.0 if norm == "linf" else 1e-4), max_diff


def test_library_attacks_leave_the_global_random_stream_alone(digits_model, batch):
    """torchattacks' APGD and Square reseed torch's global generators with their own seed; the caller's
    stream must go on as if no attack had run."""
    from detector.attacks import apgd_ce, square

    x, y = batch[0][:8], batch[1][:8]
    for attack, params in ((apgd_ce, dict(eps=0.2, steps=1)), (square, dict(eps=0.2, n_queries=2))):
        torch.manual_seed(1)
        expected = torch.rand(3)
        torch.manual_seed(1)
        attack(digits_model, x, y, **params)
        assert torch.equal(torch.rand(3), expected), attack.__name__
    with pytest.raises(ValueError, match="norm must be 'linf' or 'l2'"):
        apgd_ce(digits_model, x, y, norm="l1")
    with pytest.raises(ValueError, match="eps must be a finite"):
        square(digits_model, x, y, eps=float("nan"))
