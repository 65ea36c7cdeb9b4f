"""Organs that are not in the scan: the plausibility cues of present and absent organs, and the decision's outcome.

Two template banks, each applied to scans that hold its organs and to scans that do not:

- the protocol's head-and-neck bank (the first 5 OpenKBP train scans with all seven organs) on OpenKBP scans that
  are not templates (train: tuning; validation: the check; an organ counts as present where it was contoured), on
  the real chest series ``dicom_rt/thorax_rt`` (its top, z > 150 mm, holds the mandible's body and the larynx: those
  may be found there and nowhere else, as the parotids' lower poles, unsure; the brainstem is absent; the cord and
  oesophagus are present), on the abdominal CT ``abdomen/abdomen_full_ct`` (liver dome to pelvis: every
  head-and-neck organ absent but the cord and oesophagus, unsure) and on OpenKBP validation scans cut to a part of
  the body: below the larynx, mandible and parotids, and above the mandible and parotids, 8 slices (20-24 mm) away
  from them (an organ whose contoured voxels all lie outside the cut is absent);
- a thorax bank (``medlsam templates build --rtstruct`` of ``thorax_rt``: Lung_R, Lung_L, Heart, SpinalCord, Liver;
  one template) on the same OpenKBP scans (heart and liver absent; the cord, and a lung where the scan holds at
  least 10 cc of it below the neck organs (air inside the body away from the midline), partial: the organ is there
  but not the thorax around it that its template holds; a lung under 1 cc absent) and on the abdominal CT (liver
  present, lung bases partial, heart absent).

Every organ is localised with the decision off (``LocalizeOptions(plausibility=False, min_match_score=-1)``), its
cues (``medlsam.atlas.plausibility.organ_cues``) recorded, and the decision
(``medlsam.atlas.plausibility.implausible`` with the
default options) applied to them; an organ whose MedLAM estimate falls outside the scan is refused before
matching, as in the localiser. Then ``medlsam segment``'s default pipeline (default options: the decision on) on
the scans without the head: the voxels it draws per organ. Writes benchmarks/results/plausibility.md, .json, .png.

    python benchmarks/plausibility.py [--train 30] [--validation 33] [--threads 1] [--cache DIR]

Per-scan cues are kept in --cache (default: runs/benchmarks/plausibility, git-ignored) and reused: delete it after a
change to the localiser.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from plausibility_report import TOP_MM, write_report  # noqa: E402
from plausibility_scans import gather_all  # noqa: E402

from common import RESULTS, RUNS, OpenKBP, template_bank  # noqa: E402
from medlsam.atlas.bank_builder import build_bank  # noqa: E402
from medlsam.atlas.localize import LocalizeOptions, Localizer  # noqa: E402
from medlsam.atlas.plausibility import OrganCues, implausible, template_agreement  # noqa: E402
from medlsam.atlas.templates import load_bank  # noqa: E402
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.medlam.network import load_medlam  # noqa: E402
from medlsam.paths import data_dir, default_medlam_path  # noqa: E402
from medlsam.rt.importer import rtstruct_templates  # noqa: E402
from medlsam.segment.pipeline import MedLSAMPipeline  # noqa: E402
from medlsam.segment.sam import build_segmenter  # noqa: E402


def thorax_bank_and_truth(model, cache: Path):
    """The thorax bank of thorax_rt's structure set (cached) and that series' spinal cord mask."""
    images, labels, names, _ = rtstruct_templates([data_dir() / "dicom_rt" / "thorax_rt"])
    path = cache / "thorax_bank.pt"
    bank = load_bank(path, model) if path.is_file() else None
    if bank is None:
        bank = build_bank(model, images, labels, names)
        bank.save(path)
    value = next(v for v, n in names.items() if n == "SpinalCord")
    return bank, {"SpinalCord": labels[0].array == value}


def decide(row: dict, options: LocalizeOptions, agreement: dict) -> str:
    """The localiser's not-found reason for a gathered row under ``options`` ('' when found); ``agreement``: per
    bank and organ, ``template_agreement`` of its templates."""
    if not row["found"]:
        return row["reason"]  # refused before the decision (outside the scan)
    cues = OrganCues(**{**row["cues"], "agreement": agreement[row["bank"]][row["organ"]]})
    if cues.ncc < options.min_match_score:
        return f"template match {cues.ncc:.2f} below {options.min_match_score}"
    return (options.plausibility and implausible(cues, options)) or ""


def drawn_voxels(model, banks: dict, thorax_truth: dict, validation: int) -> list[dict]:
    """``medlsam segment``'s default pipeline (default options) on scans without the head (the head-and-neck bank)
    and on OpenKBP scans (the thorax bank): cc drawn per organ, and for thorax_rt's mandible and larynx the cc
    drawn below its top (z <= TOP_MM)."""
    segmenter = build_segmenter("lite_medsam")
    root, data = data_dir(), OpenKBP()
    runs = [
        ("thorax_rt", "hn", lambda: read_volume(root / "dicom_rt" / "thorax_rt")),
        ("abdomen_full_ct", "hn", lambda: load_ct(root / "abdomen" / "abdomen_full_ct.nii.gz")),
    ]
    runs += [
        (c["id"], "thorax", lambda c=c: load_ct(data.image(c["id"]))) for c in data.split("validation")[:validation]
    ]
    out = []
    for scan, bank, volume_fn in runs:
        volume = volume_fn()
        tic = time.perf_counter()
        result = MedLSAMPipeline(Localizer(model, banks[bank]), segmenter).segment(volume)
        cc = float(np.prod(volume.spacing)) / 1000.0
        z = None
        if scan == "thorax_rt":
            k = np.arange(volume.shape[2])
            z = volume.index_to_world(np.stack([np.zeros_like(k), np.zeros_like(k), k], 1).astype(float))[:, 2]
        for name, box in result.boxes.items():
            mask = result.label == box["label"]
            row = {
                "scan": scan,
                "bank": bank,
                "organ": name,
                "cc": float(mask.sum() * cc),
                "reason": box.get("reason", ""),
            }
            if z is not None:
                row["cc_below_top"] = float(mask[:, :, z <= TOP_MM].sum() * cc)
            out.append(row)
        print(f"segment {scan} ({bank}): {time.perf_counter() - tic:.1f} s", flush=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=30, help="OpenKBP train scans that are not templates (tuning)")
    parser.add_argument("--validation", type=int, default=33, help="OpenKBP validation scans")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=RUNS / "plausibility", help="per-scan results kept between runs")
    parser.add_argument("--gather-only", action="store_true", help="localise and keep the cues, no report")
    parser.add_argument("--out", type=Path, default=RESULTS / "plausibility", help="report path without suffix")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    args.cache.mkdir(parents=True, exist_ok=True)
    model_path = default_medlam_path()
    model = load_medlam(model_path)
    data = OpenKBP()
    banks = {"hn": template_bank(data, model, data.templates(5), args.cache / "hn_bank.pt")}
    banks["thorax"], thorax_truth = thorax_bank_and_truth(model, args.cache)
    rows = gather_all(args, model, banks, args.cache, thorax_truth)
    (args.cache / "rows.json").write_text(json.dumps(rows))
    if args.gather_only:
        return
    options = LocalizeOptions()
    agreement = {
        key: {n: template_agreement(o.neighbourhoods) for n, o in b.organs.items()} for key, b in banks.items()
    }
    for row in rows:
        row["decision"] = decide(row, options, agreement)
    drawn = drawn_voxels(model, banks, thorax_truth, min(args.validation, 3))
    write_report(rows, drawn, options, agreement, args, model_path)


if __name__ == "__main__":
    main()
