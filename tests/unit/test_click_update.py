"""A later click corrects the answer where it points (medlsam.interact.click_update): the previous answer keeps
what the click did not touch unless the new answer agrees with it elsewhere."""

from __future__ import annotations

import numpy as np

from medlsam.interact.click_any import AnyPrompts
from medlsam.interact.click_update import added_clicks, common_grid, corrected, depth, trimmed

SHAPE = (40, 40, 20)
WHOLE = tuple(slice(0, n) for n in SHAPE)
SPACING = (1.0, 1.0, 1.0)


def _ball(centre, radius: float) -> np.ndarray:
    grid = np.ogrid[tuple(slice(0, n) for n in SHAPE)]
    return sum((g - c) ** 2 for g, c in zip(grid, centre)) <= radius**2


def _corrected(*args, **kwargs) -> tuple[np.ndarray, str]:
    """``corrected``'s mask on the whole test grid, and how it was made."""
    region, mask, how = corrected(*args, **kwargs)
    full = np.zeros(SHAPE, bool)
    full[region] = mask
    return full, how


def _prompts(fg, bg=()) -> AnyPrompts:
    return AnyPrompts(np.array(fg, int).reshape(-1, 3), np.array(bg, int).reshape(-1, 3))


def test_added_clicks_are_those_appended_and_anything_else_starts_again():
    before = _prompts([[1, 2, 3]], [[4, 5, 6]])
    fg, bg = added_clicks(before, _prompts([[1, 2, 3], [7, 8, 9]], [[4, 5, 6]]))
    assert fg.tolist() == [[7, 8, 9]] and bg.shape == (0, 3)
    assert added_clicks(before, _prompts([[7, 8, 9]], [[4, 5, 6]])) is None  # a click moved
    assert added_clicks(before, _prompts([[1, 2, 3]])) is None  # a click undone
    boxed = AnyPrompts(before.foreground, before.background, np.array([[0, 9], [0, 9], [0, 9]]))
    assert added_clicks(before, boxed) is None  # a box given


def test_a_foreground_click_adds_only_the_missed_part_under_it():
    left, right = _ball((12, 20, 10), 6), _ball((28, 20, 10), 6)
    previous = left
    far_leak = _ball((20, 5, 10), 3)  # the candidate's change far from the click
    candidate = right | (left & ~_ball((12, 20, 10), 3)) | far_leak  # ... and it lost the left core
    prompts = _prompts([[12, 20, 10], [28, 20, 10]])
    mask, how = _corrected((WHOLE, previous), [(WHOLE, candidate)], prompts, (prompts.foreground[1:], []), SPACING)
    assert how == "local"
    assert np.array_equal(mask, left | right)  # the right ball added, the left one kept whole, the leak not taken


def test_what_a_click_changes_stays_near_it():
    previous = _ball((10, 20, 10), 5)  # 515 voxels: equivalent radius 5 mm
    bar = np.zeros(SHAPE, bool)
    bar[17:40, 18:23, 8:13] = True  # the candidate's part under a click at (20, 20, 10) runs to the image's edge
    prompts = _prompts([[10, 20, 10], [20, 20, 10]], [[30, 20, 10]])
    new = (prompts.foreground[1:], [])
    mask, how = _corrected((WHOLE, previous), [(WHOLE, previous | bar)], prompts, new, SPACING, 0.0)
    added = np.argwhere(mask & ~previous)
    assert how == "local" and mask[20, 20, 10] and added[:, 0].max() <= 24  # within 5 mm, short of halfway
    # a background click removes only what lies nearer to it than to every foreground click
    prompts = _prompts([[10, 20, 10]], [[14, 20, 10]])
    mask, _ = _corrected(
        (WHOLE, previous), [(WHOLE, np.zeros(SHAPE, bool))], prompts, ([], prompts.background), SPACING
    )
    assert mask[10, 20, 10] and mask[11, 20, 10] and not mask[13, 20, 10] and not mask[14, 20, 10]


def test_a_background_click_removes_only_the_part_the_candidate_dropped_there():
    body, leak = _ball((15, 20, 10), 7), _ball((30, 20, 10), 4)
    previous = body | leak
    candidate = body & ~_ball((15, 20, 10), 4)  # the leak gone, and a hole at the core elsewhere
    prompts = _prompts([[10, 20, 10]], [[30, 20, 10]])
    mask, how = _corrected((WHOLE, previous), [(WHOLE, candidate)], prompts, ([], prompts.background), SPACING)
    assert how == "local" and np.array_equal(mask, body)


def test_a_background_click_removes_about_as_much_as_it_lies_deep_in_the_answer():
    previous = _ball((20, 20, 10), 9)
    candidate = _ball((20, 20, 10), 5)  # a candidate that drops the whole outer shell
    prompts = _prompts([[20, 20, 10]], [[28, 20, 10]])  # a background click 1.4 mm inside the previous edge
    mask, how = _corrected((WHOLE, previous), [(WHOLE, candidate)], prompts, ([], prompts.background), SPACING)
    removed = np.argwhere(previous & ~mask)
    assert how == "local" and not mask[28, 20, 10] and len(removed)
    assert np.abs(removed - [28, 20, 10]).max() <= 2  # within twice its depth (2.8 mm), not the whole shell
    assert (previous & ~mask).sum() < 0.1 * (previous & ~candidate).sum()


def test_depth_is_the_distance_out_of_the_mask():
    ball = _ball((20, 20, 10), 5)
    assert abs(depth(ball, np.array([20, 20, 10]), SPACING) - np.sqrt(26.0)) < 1e-9  # to (25, 21, 10)
    assert depth(ball, np.array([0, 0, 0]), SPACING) == 0.0  # outside already
    slab = np.ones(SHAPE, bool)
    assert depth(slab, np.array([1, 20, 10]), SPACING) == 2.0  # the grid's edge is outside
    slab[:, :, 12:] = False
    assert depth(slab, np.array([20, 20, 10]), (1.0, 1.0, 3.0)) == 6.0  # 2 slices of 3 mm away


def test_a_candidate_that_agrees_elsewhere_is_taken_whole_and_the_next_one_is_tried_for_a_click():
    previous = _ball((15, 20, 10), 7)
    smoothed = previous | _ball((15, 27, 10), 1.5)  # a small change away from the click
    added = _ball((30, 20, 10), 4)
    prompts = _prompts([[15, 20, 10], [30, 20, 10]])
    new = (prompts.foreground[1:], [])
    mask, how = _corrected((WHOLE, previous), [(WHOLE, smoothed | added)], prompts, new, SPACING)
    assert how == "whole" and np.array_equal(mask, smoothed | added)
    mask, how = _corrected((WHOLE, previous), [(WHOLE, smoothed | added)], prompts, new, SPACING, change_elsewhere=0.0)
    assert how == "local" and np.array_equal(mask, previous | added)
    # the first candidate misses the click: the second one's part there is added
    mask, how = _corrected((WHOLE, previous), [(WHOLE, previous), (WHOLE, added)], prompts, new, SPACING)
    assert how == "local" and np.array_equal(mask, previous | added)
    # no candidate holds it: only the clicked voxel
    mask, _ = _corrected((WHOLE, previous), [(WHOLE, previous)], prompts, new, SPACING)
    assert mask.sum() == previous.sum() + 1 and mask[30, 20, 10]


def test_masks_on_different_regions_meet_on_one_grid():
    a = (slice(2, 4), slice(0, 3), slice(5, 6)), np.ones((2, 3, 1), bool)
    b = (slice(3, 6), slice(1, 2), slice(4, 5)), np.ones((3, 1, 1), bool)
    region, (ma, mb) = common_grid([a, b])
    assert region == (slice(2, 6), slice(0, 3), slice(4, 6))
    assert ma.sum() == 6 and mb.sum() == 3 and ma[0, 0, 1] and mb[3, 1, 0]


def test_masks_are_trimmed_to_their_extent_before_they_meet():
    mask = np.zeros((10, 10, 4), bool)
    mask[2:5, 3:4, 1:3] = True
    region, part = trimmed(((slice(5, 15), slice(0, 10), slice(20, 24)), mask))
    assert region == (slice(7, 10), slice(3, 4), slice(21, 23)) and part.all()
    region, part = trimmed(((slice(5, 15), slice(0, 10), slice(20, 24)), np.zeros((10, 10, 4), bool)))
    assert region == (slice(5, 6), slice(0, 1), slice(20, 21)) and not part.any()
