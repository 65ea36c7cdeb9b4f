"""Interactive SAM (medlsam.interact.interactive): prompt checks, the file-order coordinate convention and 3D
propagation, with an ideal stand-in segmenter on a phantom and with LiteMedSAM on a real liver."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage

from medlsam.interact.interactive import PromptError, parse_prompts, segment_slice, slice_mask_to_volume
from medlsam.interact.propagation import PropagationOptions, segment_volume
from medlsam.segment.sam.segmenter import Embedding
from medlsam.segment.sam.slices import SliceEmbeddings
from medlsam.utils.metrics import dice


class IdealSegmenter:
    """Segments the bright (bone) component under the first foreground click, or inside the box."""

    def __init__(self, name: str = "ideal"):  # "sam_..." names get clicks as point prompts
        self.name, self.decoder_calls = name, 0

    def encode_batch(self, images):
        return [
            Embedding(
                torch.from_numpy(np.ascontiguousarray(im[..., 0])).float()[None, None],
                im.shape[:2],
                im.shape[:2],
                self.name,
            )
            for im in images
        ]

    def decode(self, embedding, boxes=None, points=None, point_labels=None, multimask=False):
        self.decoder_calls += 1
        bright = embedding.features[0, 0].numpy() > 200
        keep = np.zeros_like(bright)
        if points is not None:
            for (x, y), lab in zip(points[0], point_labels[0]):
                if lab == 1:
                    labels, _ = ndimage.label(bright)
                    if labels[int(y), int(x)]:
                        keep |= labels == labels[int(y), int(x)]
                    break
        if boxes is not None:
            x0, y0, x1, y1 = (int(v) for v in boxes[0])
            inside = np.zeros_like(bright)
            inside[y0 : y1 + 1, x0 : x1 + 1] = True
            keep = keep & inside if points is not None else bright & inside
        return keep[None].astype(np.float32), np.array([0.9 if keep.any() else 0.1], np.float32)


@pytest.fixture
def ball(make_ct):
    ct, label = make_ct()  # ball of radius 4 at voxel (14, 20, 10), shape (40, 36, 30)
    return ct, label.array.astype(bool)


def test_parse_prompts_refuses_bad_clicks_and_boxes():
    shape = (10, 12, 8)
    with pytest.raises(PromptError, match="outside the image"):
        parse_prompts(shape, foreground=[[10, 0, 0]])
    with pytest.raises(PromptError, match="outside the image"):
        parse_prompts(shape, foreground=[[1, 1, 1]], background=[[-1, 0, 0]])
    with pytest.raises(PromptError, match="no prompt"):
        parse_prompts(shape, background=[[1, 1, 1]])
    with pytest.raises(PromptError, match=r"\[i, j, k\]"):
        parse_prompts(shape, foreground=[[1, 2]])
    with pytest.raises(PromptError, match="outside the image"):
        parse_prompts(shape, roi=[20, 30, 0, 5, 0, 5])
    prompts = parse_prompts(shape, foreground=[1, 2, 3], roi=[5, 2, 0, 4, 3, 3])  # corners in any order
    assert prompts.foreground.tolist() == [[1, 2, 3]] and prompts.roi.tolist() == [[2, 5], [0, 4], [3, 3]]


def test_slice_click_uses_file_order_indices(ball):
    ct, truth = ball
    emb = SliceEmbeddings(IdealSegmenter(), ct, axis=2)
    out = segment_slice(emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]]))
    assert out["slice"] == 10 and out["axis"] == 2
    assert np.array_equal(out["mask"], truth[:, :, 10])
    volume = slice_mask_to_volume(out["mask"], ct.shape, 2, 10)
    assert np.array_equal(volume[:, :, 10], truth[:, :, 10]) and volume.sum() == truth[:, :, 10].sum()
    # i and j swapped would miss the ball (as a point prompt): the click really is (i, j, k) of the file
    points = SliceEmbeddings(IdealSegmenter("sam_ideal"), ct, axis=2)
    assert np.array_equal(
        segment_slice(points, parse_prompts(ct.shape, foreground=[[14, 20, 10]]))["mask"], truth[:, :, 10]
    )
    assert not segment_slice(points, parse_prompts(ct.shape, foreground=[[20, 14, 10]]))["mask"].any()
    # a second click on the same slice: no new encoding, one decoder call (from the box chosen before)
    calls = emb.segmenter.decoder_calls
    again = segment_slice(emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]], background=[[2, 2, 10]]))
    assert emb.encoder_calls == 1 and emb.segmenter.decoder_calls == calls + 1
    assert np.array_equal(again["mask"], truth[:, :, 10])
    # along another axis, too
    emb0 = SliceEmbeddings(IdealSegmenter(), ct, axis=0)
    assert np.array_equal(segment_slice(emb0, parse_prompts(ct.shape, foreground=[[14, 20, 10]]))["mask"], truth[14])


def test_roi_box_alone_and_zero_size_roi(ball):
    ct, truth = ball
    emb = SliceEmbeddings(IdealSegmenter(), ct, axis=2)
    out = segment_slice(emb, parse_prompts(ct.shape, roi=[8, 20, 14, 26, 10, 10]))
    assert np.array_equal(out["mask"], truth[:, :, 10])
    with pytest.raises(PromptError, match="zero size"):
        segment_slice(emb, parse_prompts(ct.shape, roi=[14, 14, 14, 26, 10, 10]))


def test_propagation_recovers_the_ball_and_stops_where_it_ends(ball):
    ct, truth = ball
    emb = SliceEmbeddings(IdealSegmenter(), ct, axis=2)
    result = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]]))
    assert np.array_equal(result.mask, truth)
    assert result.slices == [6, 7, 8, 9, 10, 11, 12, 13, 14] and result.seed == 10
    assert all(r.startswith("object ends") for r in result.stop_reasons.values()), result.stop_reasons
    assert emb.encoder_calls == 9  # the ball's 9 slices: the 1-voxel tips end the propagation
    limited = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]]), PropagationOptions(max_slices=1))
    assert limited.slices == [9, 10, 11] and emb.encoder_calls == 9  # all cached
    in_roi = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]], roi=[0, 39, 0, 35, 9, 12]))
    assert in_roi.slices == [9, 10, 11, 12] and in_roi.stop_reasons["up"] == "end of roi"


def test_lite_medsam_click_and_propagation_on_a_real_liver(data_dir):
    from medlsam.io.volume import load_ct, read_volume
    from medlsam.segment.sam import build_segmenter
    from medlsam.utils.metrics import dice

    ct = load_ct(data_dir / "abdomen" / "abdomen_slab_ct.nii.gz")
    liver = read_volume(data_dir / "abdomen" / "abdomen_slab_label.nii.gz").array == 5
    k = 15
    dist = ndimage.distance_transform_edt(liver[:, :, k])
    i, j = np.unravel_index(int(np.argmax(dist)), dist.shape)
    emb = SliceEmbeddings(build_segmenter("lite_medsam"), ct, axis=2)
    ii, jj = np.nonzero(liver[:, :, k])
    roi = [ii.min() - 2, ii.max() + 2, jj.min() - 2, jj.max() + 2, k, k]
    one = segment_slice(emb, parse_prompts(ct.shape, foreground=[[i, j, k]], roi=roi))
    assert dice(one["mask"], liver[:, :, k]) > 0.7  # LiteMedSAM with the true box gives 0.735 on this slice
    click = segment_slice(emb, parse_prompts(ct.shape, foreground=[[i, j, k]]))  # a click alone grows a box
    print("click-only Dice", dice(click["mask"], liver[:, :, k]))
    assert dice(click["mask"], liver[:, :, k]) > 0.5
    result = segment_volume(
        emb, parse_prompts(ct.shape, foreground=[[i, j, k]], roi=roi), PropagationOptions(max_slices=1)
    )
    assert result.slices == [k - 1, k, k + 1], result.stop_reasons
    for s in result.slices:
        assert dice(result.mask[:, :, s], liver[:, :, s]) > 0.65, s
    assert emb.encoder_calls == 3
    # a later foreground click on a missed slice adds that part and keeps the slices done before
    far = k + 4
    dist = ndimage.distance_transform_edt(liver[:, :, far])
    fi, fj = np.unravel_index(int(np.argmax(dist)), dist.shape)
    more = segment_volume(
        emb, parse_prompts(ct.shape, foreground=[[i, j, k], [fi, fj, far]], roi=roi), PropagationOptions(max_slices=1)
    )
    print("Dice on the missed slice", dice(more.mask[:, :, far], liver[:, :, far]))
    assert more.anchors == [k, far] and more.slices == [k - 1, k, k + 1, far - 1, far, far + 1], more.stop_reasons
    assert np.array_equal(more.mask[:, :, : far - 1], result.mask[:, :, : far - 1])
    assert dice(more.mask[:, :, far], liver[:, :, far]) > 0.5
    assert dice(more.mask, liver) > dice(result.mask, liver) + 0.05


def _rod(segments: list[tuple[int, int]], shape=(40, 36, 30)):
    """A CT of a bright rod of radius 4 around (i, j) = (14, 20) along the last axis over the inclusive k
    ``segments``: the stand-in segmenter follows it slice by slice."""
    from medlsam.io.volume import CTVolume

    i, j = np.meshgrid(np.arange(shape[0]), np.arange(shape[1]), indexing="ij")
    disc = (i - 14) ** 2 + (j - 20) ** 2 <= 16
    rod = np.zeros(shape, dtype=bool)
    for k0, k1 in segments:
        rod[:, :, k0 : k1 + 1] = disc[:, :, None]
    hu = np.where(rod, 1000.0, 40.0).astype(np.float32)
    return CTVolume(hu, np.diag([3.0, 3.0, 4.0, 1.0]), "rod"), rod


def test_background_click_removes_the_spurious_slices_and_stops_propagation():
    ct, rod = _rod([(5, 24)])
    truth = rod.copy()
    truth[:, :, 15:] = False  # the object ends at slice 14, the image goes on: propagation overshoots
    emb = SliceEmbeddings(IdealSegmenter(), ct, axis=2)
    one = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]]))
    assert one.slices == list(range(5, 25))
    two = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]], background=[[14, 20, 19]]))
    assert two.slices == list(range(5, 19)) and two.stop_reasons["up"] == "background click on the carried mask"
    assert np.array_equal(two.mask[:, :, :19], one.mask[:, :, :19])  # the slices before the click are kept
    three = segment_volume(
        emb, parse_prompts(ct.shape, foreground=[[14, 20, 10]], background=[[14, 20, 19], [14, 20, 15]])
    )
    assert np.array_equal(three.mask, truth)
    assert dice(one.mask, truth) < dice(two.mask, truth) < dice(three.mask, truth) == 1.0


def test_foreground_click_on_a_missed_slice_adds_it_and_keeps_the_first_result():
    ct, rod = _rod([(4, 10), (14, 20)])  # one object with a gap propagation cannot cross
    emb = SliceEmbeddings(IdealSegmenter(), ct, axis=2)
    one = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 7]]))
    assert one.slices == list(range(4, 11))
    two = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 7], [14, 20, 17]]))
    assert np.array_equal(two.mask, rod) and two.seed == 7 and two.anchors == [7, 17]
    assert two.stop_reasons["up"] == "empty mask" and two.stop_reasons["down from 17"] == "empty mask"
    assert dice(one.mask, rod) < dice(two.mask, rod) == 1.0
    # a click on a slice the propagation reaches widens that slice instead of restarting from it
    calls = emb.segmenter.decoder_calls
    again = segment_volume(emb, parse_prompts(ct.shape, foreground=[[14, 20, 7], [12, 20, 9]]))
    assert again.anchors == [7] and np.array_equal(again.mask, one.mask)
    assert emb.encoder_calls == 18  # slices 3-11 and 13-21 once each: a repeated request costs decoder calls only
    assert emb.segmenter.decoder_calls > calls


def test_click_sets_are_bounded_and_a_voxel_is_never_both_kinds():
    from medlsam.interact.interactive import MAX_CLICKS

    shape = (10, 12, 8)
    with pytest.raises(PromptError, match=f"at most {MAX_CLICKS}"):
        parse_prompts(shape, foreground=[[1, 1, 1]] * (MAX_CLICKS // 2 + 1), background=[[2, 2, 2]] * (MAX_CLICKS // 2))
    assert len(parse_prompts(shape, foreground=[[1, 1, 1]] * MAX_CLICKS).foreground) == MAX_CLICKS
    with pytest.raises(PromptError, match="both as foreground and as background"):
        parse_prompts(shape, foreground=[[1, 2, 3]], background=[[1, 2, 3]])


def test_bounded_propagation_stops_at_its_next_slice():
    """Within ``cancel.bounded`` the 3D propagation stops with Cancelled once the time is over or its requester
    leaves; outside a bound the same request runs to the end."""
    from medlsam.utils import cancel

    ct, rod = _rod([(2, 27)])
    prompts = parse_prompts(ct.shape, foreground=[[14, 20, 10]])
    emb = SliceEmbeddings(IdealSegmenter(), ct, axis=2)
    with cancel.bounded(0.0), pytest.raises(cancel.Cancelled, match="time bound of 0 s"):
        segment_volume(emb, prompts)
    left = {"calls": 0}

    def stopped() -> bool:  # the client leaves once three slices are done
        left["calls"] += 1
        return left["calls"] > 3

    fresh = SliceEmbeddings(IdealSegmenter(), ct, axis=2)
    with cancel.bounded(600, stopped), pytest.raises(cancel.Cancelled, match="no longer waiting"):
        segment_volume(fresh, prompts)
    assert fresh.encoder_calls < 6
    assert np.array_equal(segment_volume(fresh, prompts).mask, rod)  # no bound: the whole rod
