"""The rows benchmarks/segmentation.py can run (``--rows``): each row's prompts, options, segmenter, and the
localisation and bank it needs."""

from __future__ import annotations

POOL_ATLASES = 5  # the prior_atlas row: each organ's prior from this many of the --pool templates
# key -> (row name, prompts: MedLAM's localisation or ground truth, SegmentOptions fields over the defaults,
# segmenter: the shipped LiteMedSAM or the one adapted to the templates, --adapted WEIGHTS)
ROWS = {
    "default": ("MedLSAM default (adapted weights with --adapted, else shipped)", "medlam", {}, "default"),
    "prior": ("template prior alone (no SAM)", "medlam", {"prior_weight": 1.0}, "shipped"),
    "prior_weighted": (
        "template prior alone, placements weighed by their match (sharpness 10)",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "prior_uncalibrated": (
        "template prior alone, uncalibrated (every organ cut at 0.5)",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "default_uncalibrated": ("MedLSAM default, uncalibrated prior", "medlam", {}, "default"),
    "prior_atlas": (
        f"template prior alone, atlas selection: the {POOL_ATLASES} best-matching pool templates per organ",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "prior_pool": ("template prior alone, every pool template", "medlam", {"prior_weight": 1.0}, "shipped"),
    "prior_slabs": (
        "template prior alone, slab matching only (no registration)",
        "medlam",
        {"prior_weight": 1.0},
        "shipped",
    ),
    "shipped": ("shipped LiteMedSAM + prior (w 0.8)", "medlam", {"prior_weight": 0.8}, "shipped"),
    "samprior": ("SAM on prior boxes, no blend", "medlam", {"prior_weight": 0.0}, "shipped"),
    "maskprompt": (
        "shipped LiteMedSAM, box + prior mask prompt, + prior (w 0.8)",
        "medlam",
        {"prior_weight": 0.8, "mask_prompt": True},
        "shipped",
    ),
    "adapted": (
        "adapted LiteMedSAM, box + prior mask prompt, + prior (w 0.5)",
        "medlam",
        {"prior_weight": 0.5},
        "adapted",
    ),
    "adapted_sam": (
        "adapted LiteMedSAM, box + prior mask prompt, no blend",
        "medlam",
        {"prior_weight": 0.0},
        "adapted",
    ),
    "adapted_box": (
        "adapted LiteMedSAM, box only, + prior (w 0.5)",
        "medlam",
        {"prior_weight": 0.5, "mask_prompt": False},
        "adapted",
    ),
    "wpl": ("MedLAM boxes, WPL", "medlam", {"mode": "wpl", "prior_weight": 0.0, "slice_spacing_mm": 0.0}, "shipped"),
    "spl": ("MedLAM boxes, SPL", "medlam", {"mode": "spl", "prior_weight": 0.0, "slice_spacing_mm": 0.0}, "shipped"),
    "gt3d": (
        "ground-truth 3D box (WPL)",
        "truth3d",
        {"mode": "wpl", "prior_weight": 0.0, "slice_spacing_mm": 0.0},
        "shipped",
    ),
    "gtslice": (
        "shipped LiteMedSAM, ground-truth box of every slice",
        "truthslice",
        {"mode": "spl", "prior_weight": 0.0, "slice_spacing_mm": 0.0, "mask_prompt": False},
        "shipped",
    ),
    "gtslice_adapted": (
        "adapted LiteMedSAM, ground-truth box of every slice",
        "truthslice",
        {"mode": "spl", "prior_weight": 0.0, "slice_spacing_mm": 0.0, "mask_prompt": False},
        "adapted",
    ),
}
# rows whose localisation differs from the default (LocalizeOptions fields over the defaults)
LOCALIZE = {
    "prior_weighted": {"prior_match_sharpness": 10.0},
    "prior_slabs": {"prior_registration": False},
    "prior_atlas": {"prior_atlases": POOL_ATLASES},
    "prior_pool": {"prior_atlases": 0},
}
# rows whose bank holds the --pool templates (the protocol's 5 among them), calibrated with the row's localisation
POOL_ROWS = {"prior_atlas", "prior_pool"}
# rows whose bank has every organ's prior cut at 0.5 (as before medlsam.atlas.calibration)
UNCALIBRATED = {"prior_uncalibrated", "default_uncalibrated"}
