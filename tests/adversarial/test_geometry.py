"""The epsilon ball's geometry against per-sample loops written out by hand."""

from __future__ import annotations

import pytest
import torch

from llmkit.adversarial.geometry import (
    apply_masks,
    ascent_step,
    clamp_to_range,
    project,
    random_start,
    sample_norms,
)


def two_sites(seed: int = 0) -> list[torch.Tensor]:
    """A perturbation of two sites sharing the batch axis: ``[3, 4, 5]`` and ``[3, 2, 5]``."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(3, 4, 5, generator=generator), torch.randn(3, 2, 5, generator=generator)]


def norm_of_sample(tensors: list[torch.Tensor], b: int) -> float:
    return float(torch.cat([t[b].flatten() for t in tensors]).norm())


def test_sample_norms_is_each_sample_over_all_sites():
    tensors = two_sites()
    expected = torch.tensor([norm_of_sample(tensors, b) for b in range(3)])
    torch.testing.assert_close(sample_norms(tensors), expected)


def test_l2_projection_rescales_only_samples_outside_the_ball():
    tensors = two_sites()
    tensors = [t * torch.tensor([1.0, 0.01, 3.0]).view(3, 1, 1) for t in tensors]  # one sample inside
    projected = project(tensors, epsilon=1.0, norm="l2")
    for b in range(3):
        norm = norm_of_sample(tensors, b)
        scale = min(1.0, 1.0 / norm)
        for before, after in zip(tensors, projected, strict=True):
            torch.testing.assert_close(after[b], before[b] * scale)
    assert max(norm_of_sample(projected, b) for b in range(3)) <= 1.0 + 1e-6


def test_linf_projection_clips_each_entry():
    tensors = two_sites()
    for before, after in zip(tensors, project(tensors, epsilon=0.5, norm="linf"), strict=True):
        torch.testing.assert_close(after, torch.minimum(torch.maximum(before, torch.tensor(-0.5)), torch.tensor(0.5)))


def test_l2_ascent_step_by_hand_with_a_mask_and_a_missing_gradient():
    deltas, grads = [torch.zeros(3, 4, 5), torch.zeros(3, 2, 5)], two_sites(1)
    mask = torch.ones(3, 4, 1)
    mask[:, -1] = 0  # the last position is padding
    moved = ascent_step(deltas, grads, size=0.3, epsilon=1.0, norm="l2", masks=[mask, None])
    for b in range(3):
        g = [grads[0][b] * mask[b], grads[1][b]]
        norm = float(torch.cat([x.flatten() for x in g]).norm())
        for after, direction in zip(moved, g, strict=True):
            torch.testing.assert_close(after[b], 0.3 * direction / norm)
    assert bool((moved[0][:, -1] == 0).all())
    # A site with no gradient does not move; the other takes the whole step.
    alone = ascent_step(deltas, [grads[0], None], size=0.3, epsilon=1.0, norm="l2")
    assert bool((alone[1] == 0).all())
    torch.testing.assert_close(sample_norms(alone), torch.full((3,), 0.3))


def test_l2_ascent_step_is_projected():
    deltas = [torch.full((1, 2), 0.6)]
    moved = ascent_step(deltas, [torch.tensor([[1.0, 1.0]])], size=1.0, epsilon=1.0, norm="l2")
    torch.testing.assert_close(moved[0], torch.full((1, 2), 2**-0.5))


def test_linf_ascent_step_is_signs_then_clipping():
    deltas, grads = two_sites(2), two_sites(3)
    moved = ascent_step(deltas, grads, size=0.25, epsilon=0.5, norm="linf")
    for d, g, after in zip(deltas, grads, moved, strict=True):
        torch.testing.assert_close(after, (d + 0.25 * torch.sign(g)).clamp(-0.5, 0.5))
    assert not any(m.requires_grad for m in moved)


@pytest.mark.parametrize("norm", ["l2", "linf"])
def test_random_start_lies_in_the_ball_and_is_zero_where_masked(norm):
    like = [torch.zeros(64, 4, 5), torch.zeros(64, 2, 5)]
    mask = torch.ones(64, 4, 1)
    mask[:, 0] = 0
    generator = torch.Generator().manual_seed(0)
    start = random_start(like, epsilon=0.5, norm=norm, masks=[mask, None], generator=generator)
    assert [s.shape for s in start] == [s.shape for s in like]
    assert bool((start[0][:, 0] == 0).all())
    if norm == "linf":
        assert max(float(s.abs().max()) for s in start) <= 0.5
        assert min(float(s.abs().max()) for s in start) > 0.4  # spread over the cube
    else:
        radii = sample_norms(start)
        assert float(radii.max()) <= 0.5 + 1e-6
        # Radius uniform in [0, eps]: mean eps / 2 (64 samples: within a few standard errors).
        assert abs(float(radii.mean()) - 0.25) < 0.06
    again = random_start(like, epsilon=0.5, norm=norm, masks=[mask, None], generator=torch.Generator().manual_seed(0))
    for a, b in zip(start, again, strict=True):
        torch.testing.assert_close(a, b)


def test_masks_and_input_range():
    masked = apply_masks([torch.ones(2, 3, 1), torch.ones(2, 1)], [torch.tensor([[[1.0], [0.0], [1.0]]] * 2), None])
    assert masked[0].flatten().tolist() == [1.0, 0.0, 1.0] * 2 and masked[1].flatten().tolist() == [1.0, 1.0]
    bases, deltas = [torch.tensor([[0.0, 0.5, 1.0]])], [torch.tensor([[-0.2, 0.7, 0.1]])]
    kept = clamp_to_range(bases, deltas, 0.0, 1.0)
    torch.testing.assert_close(kept[0], torch.tensor([[0.0, 0.5, 0.0]]))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: project([torch.zeros(2, 3)], epsilon=1.0, norm="l1"), r"unknown norm 'l1'; choose one of"),
        (lambda: ascent_step([torch.zeros(2)], [None], size=1.0, epsilon=1.0, norm="L2"), r"unknown norm 'L2'"),
        (lambda: random_start([torch.zeros(2)], epsilon=1.0, norm="inf"), r"unknown norm 'inf'"),
        (lambda: sample_norms([torch.zeros(2, 3), torch.zeros(3, 3)]),
         r"sharing a first \(batch\) axis, got shapes \[\(2, 3\), \(3, 3\)\]"),
        (lambda: sample_norms([torch.zeros(2, 3), torch.tensor(1.0)]), r"got shapes \[\(2, 3\), \(\)\]"),
    ],
)
def test_bad_geometry(call, match):
    with pytest.raises(ValueError, match=match):
        call()
