"""Train the click refiner (``medlsam.interact.refiner``) with simulated clicks on OpenKBP train scans that are not
templates.

    python benchmarks/editing.py --split train --cache-only   # the train scans' starts (about 4 min)
    python scripts/train_click_refiner.py                      # 45 minutes, writes lib/medlsam/weights/click_refiner.pt

Each scan's starting point (the 5 protocol templates' prior auto-segmentation and organ posteriors) comes from the
editing benchmark's cache (``benchmarks/editing.py --split train --cache-only``). Every organ of every scan is
resampled once onto a region of the network's grid; each training example then draws (DeepEdit-style):

- a start: the auto-segmentation (half), the posterior above 0.5 (a quarter: what ``edit`` starts from for an
  organ with no current mask), or nothing and no posterior (a quarter: an organ the templates do not know; the first
  click then at the organ's centre);
- 1-10 clicks, each at an interior voxel of an error of the mask so far (mostly the largest error's deepest
  voxel, as the benchmark's simulator), after each click the clicked error partly fixed (within a random
  10 mm / 20 mm / 40 mm / whole-component reach) to stand for the refiner's own answer;
- a training crop holding the last click, in-plane flips and transposes, a small HU scale/shift.

Loss: binary cross-entropy + soft Dice against the clinician's mask. The first ``--holdout`` non-template train
scans are left out (model selection: ``benchmarks/editing.py --split train --cases 8 --method refiner``).
Checkpoints every ``--save-every`` steps (atomic); ``--resume`` continues from the last one.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "lib"))
sys.path.insert(0, str(ROOT / "benchmarks"))

from common import ORGANS, OpenKBP  # noqa: E402
from medlsam.atlas.prior import FilePrior  # noqa: E402
from medlsam.interact.refiner import (  # noqa: E402
    BONE_WINDOW,
    CROP_SPACING_MM,
    SOFT_WINDOW,
    ClickRefinerNet,
    Crop,
    click_balls,
    save_click_refiner,
)
from medlsam.io.volume import load_ct, read_volume  # noqa: E402
from medlsam.paths import SHIPPED_CLICK_REFINER  # noqa: E402
from medlsam.utils.metrics import cranio_caudal_axis  # noqa: E402

REGION = (64, 64, 96)  # the organ's region on the network grid, from which training crops are cut
TRAIN_CROP = (32, 32, 48)


def organ_regions(data: OpenKBP, case_id: str, cache: Path) -> list[dict]:
    """Each contoured organ of the scan on its region of the network grid: HU, posterior, start, truth."""
    stored = np.load(cache / f"{case_id}.npz")
    volume = load_ct(data.image(case_id))
    hu = volume.array
    truth_label = read_volume(data.label(case_id)).array
    axis = cranio_caudal_axis(volume.affine)
    case = next(c for c in data.cases if c["id"] == case_id)
    out = []
    for organ in ORGANS:
        value = data.values[organ]
        truth = truth_label == value
        if organ not in case["contoured"] or not truth.any():
            continue
        prior = None
        if f"{organ}__p" in stored:
            prior = FilePrior(stored[f"{organ}__low"], stored[f"{organ}__high"], stored[f"{organ}__p"])
        start = stored["label"] == value
        boxes = [np.argwhere(truth)]
        if start.any():
            boxes.append(np.argwhere(start))
        points = np.concatenate([np.vstack([b.min(axis=0), b.max(axis=0)]) for b in boxes])
        crop = Crop.around(volume.spacing, axis, points, size=REGION)
        posterior = (
            crop.sample(prior.probabilities, offset=prior.low) if prior is not None else np.zeros(REGION, np.float32)
        )
        out.append(
            {
                "case": case_id,
                "organ": organ,
                "hu": crop.sample(hu, fill=-1024.0).astype(np.float16),
                "posterior": posterior.astype(np.float16),
                "start": crop.sample(start) > 0.5,
                "truth": crop.sample(truth) > 0.5,
            }
        )
    return out


def centre_click(truth: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Near the organ's centre: a slice near its middle (cranio-caudal axis last), a voxel deep in that slice."""
    ks = np.nonzero(truth.any(axis=(0, 1)))[0]
    k = int(ks[min(len(ks) - 1, max(0, int(len(ks) * rng.uniform(0.35, 0.65))))])
    plane = truth[:, :, k]
    dist = ndimage.distance_transform_edt(np.pad(plane, 1))[1:-1, 1:-1]
    candidates = np.argwhere(dist >= 0.7 * dist.max())
    r, c = candidates[rng.integers(len(candidates))]
    return np.array([r, c, k])


def error_click(pred: np.ndarray, truth: np.ndarray, rng: np.random.Generator):
    """(voxel, missed, component) at an error of ``pred``: mostly the largest error's deepest voxel."""
    comps = []
    for missed, error in ((True, truth & ~pred), (False, pred & ~truth)):
        labels, n = ndimage.label(error)
        if n:
            sizes = ndimage.sum(error, labels, range(1, n + 1))
            comps += [(s, missed, labels, i + 1) for i, s in enumerate(sizes)]
    if not comps:
        return None
    sizes = np.array([c[0] for c in comps], np.float64)
    pick = int(np.argmax(sizes)) if rng.random() < 0.8 else int(rng.choice(len(comps), p=sizes / sizes.sum()))
    _, missed, labels, index = comps[pick]
    comp = labels == index
    dist = ndimage.distance_transform_edt(np.pad(comp, 1))[1:-1, 1:-1, 1:-1]
    if rng.random() < 0.5:
        at = np.array(np.unravel_index(int(np.argmax(dist)), comp.shape))
    else:
        candidates = np.argwhere(dist >= 0.5 * dist.max())
        at = candidates[rng.integers(len(candidates))]
    return at, missed, comp


def partial_fix(pred: np.ndarray, truth: np.ndarray, comp: np.ndarray, at: np.ndarray, rng) -> np.ndarray:
    """``pred`` with the clicked error component fixed within a random reach of the click."""
    reach = rng.choice([10.0, 20.0, 40.0, np.inf])
    grids = np.ogrid[tuple(slice(0, n) for n in pred.shape)]
    d2 = sum(((g - a) * mm) ** 2 for g, a, mm in zip(grids, at, CROP_SPACING_MM))
    fix = comp & (d2 <= reach**2)
    out = pred.copy()
    out[fix] = truth[fix]
    return out


def channels(item: dict, box, posterior, start, fg: list, bg: list, scale: float = 1.0, shift: float = 0.0):
    """The six input channels on ``box`` (slices of the organ's region) for clicks ``fg`` / ``bg`` (region voxels)."""
    hu = item["hu"][box].astype(np.float32) * scale + shift
    soft = (np.clip(hu, *SOFT_WINDOW) - SOFT_WINDOW[0]) / (SOFT_WINDOW[1] - SOFT_WINDOW[0])
    bone = (np.clip(hu, *BONE_WINDOW) - BONE_WINDOW[0]) / (BONE_WINDOW[1] - BONE_WINDOW[0])
    size = hu.shape
    zeros = np.zeros(size, np.float32)

    def balls(points):
        if not points:
            return zeros
        starts = [s.start for s in box]
        return click_balls([np.arange(m) + a - p for m, a, p in zip(size, starts, pt)] for pt in points)

    return np.stack([soft, bone, posterior[box], start[box].astype(np.float32), balls(fg), balls(bg)])


def example(item: dict, rng: np.random.Generator, net=None, loop: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """One simulated request on a training crop: (input channels, target mask). With ``net``, a share ``loop`` of
    the examples add 1-3 clicks placed on the errors of the network's own answer (the network in the loop)."""
    truth = item["truth"]
    mode = rng.choice(["edit", "scratch", "agnostic"], p=[0.5, 0.25, 0.25])
    posterior = item["posterior"].astype(np.float32)
    if mode == "edit":
        start = item["start"]
    elif mode == "scratch":
        start = posterior > 0.5
    else:
        start, posterior = np.zeros_like(truth), np.zeros_like(posterior)
    either = np.argwhere(start | truth)
    low = np.maximum(either.min(axis=0) - 1, 0)
    sim = tuple(slice(int(a), int(b) + 2) for a, b in zip(low, either.max(axis=0)))  # errors lie in this box
    pred, target = start[sim].copy(), truth[sim]
    fg, bg = [], []
    in_loop = net is not None and rng.random() < loop
    for i in range(int(rng.integers(1, 8 if in_loop else 11))):
        if i == 0 and mode != "edit":
            at, missed = centre_click(target, rng), True
            comp = target & ~pred
            labels, _ = ndimage.label(comp)
            comp = labels == labels[tuple(at)] if labels[tuple(at)] else np.zeros_like(comp)
        else:
            found = error_click(pred, target, rng)
            if found is None:
                break
            at, missed, comp = found
        (fg if missed else bg).append(at + low)
        pred = partial_fix(pred, target, comp, at, rng)
    if in_loop:
        whole = tuple(slice(0, n) for n in REGION)
        for _ in range(int(rng.integers(1, 4))):
            x = torch.from_numpy(channels(item, whole, posterior, start, fg, bg))[None]
            with torch.no_grad():
                answer = (net(x)[0, 0] > 0).numpy()
            found = error_click(answer[sim], target, rng)
            if found is None:
                break
            at, missed, _ = found
            (fg if missed else bg).append(at + low)
    last = (fg + bg)[-1] if fg or bg else np.array(REGION) // 2
    if fg and bg:
        last = fg[-1] if rng.random() < 0.5 else bg[-1]
    lo = []
    for a, n, m in zip(last, REGION, TRAIN_CROP):
        lo.append(int(np.clip(a - rng.integers(m // 4, 3 * m // 4 + 1), 0, n - m)))
    box = tuple(slice(a, a + m) for a, m in zip(lo, TRAIN_CROP))
    x = channels(item, box, posterior, start, fg, bg, rng.uniform(0.97, 1.03), rng.uniform(-20, 20))
    y = truth[box][None].astype(np.float32)
    for axis in (1, 2):  # in-plane flips (channel axis 0)
        if rng.random() < 0.5:
            x, y = np.flip(x, axis), np.flip(y, axis)
    if rng.random() < 0.5:
        x, y = np.swapaxes(x, 1, 2), np.swapaxes(y, 1, 2)
    return np.ascontiguousarray(x), np.ascontiguousarray(y)


def loss_fn(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = F.binary_cross_entropy_with_logits(logits, target)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dim=(1, 2, 3, 4))
    dice = 1 - (2 * inter + 1) / (prob.sum(dim=(1, 2, 3, 4)) + target.sum(dim=(1, 2, 3, 4)) + 1)
    return bce + dice.mean()


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=SHIPPED_CLICK_REFINER)
    parser.add_argument("--cache", type=Path, default=ROOT / "runs" / "benchmarks" / "editing")
    parser.add_argument("--regions", type=Path, default=ROOT / "runs" / "benchmarks" / "refiner-regions.npz")
    parser.add_argument("--holdout", type=int, default=8)
    parser.add_argument("--minutes", type=float, default=45.0)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--save-every", type=int, default=100)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--init", type=Path, help="start from these click refiner weights (a fine-tuning run)")
    parser.add_argument("--loop", type=float, default=0.0, help="share of examples with the network in the loop")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    data = OpenKBP()
    templates = set(data.templates(5))
    train = [c["id"] for c in data.split("train") if c["id"] not in templates]
    train = [c for c in train[args.holdout :] if (args.cache / f"{c}.npz").exists()]
    if args.regions.exists():
        stored = np.load(args.regions, allow_pickle=False)
        keys = json.loads(str(stored["keys"]))
        items = [
            {"case": c, "organ": o, **{k: stored[f"{i}_{k}"] for k in ("hu", "posterior", "start", "truth")}}
            for i, (c, o) in enumerate(keys)
        ]
    else:
        tic = time.time()
        items = [r for case_id in train for r in organ_regions(data, case_id, args.cache)]
        arrays = {f"{i}_{k}": it[k] for i, it in enumerate(items) for k in ("hu", "posterior", "start", "truth")}
        np.savez(args.regions, keys=json.dumps([[it["case"], it["organ"]] for it in items]), **arrays)
        print(f"{len(items)} organ regions from {len(train)} scans in {time.time() - tic:.0f} s", flush=True)
    items = [it for it in items if it["truth"].sum() >= 5]  # an organ resampled to (almost) nothing: no example
    net = ClickRefinerNet()
    if args.init:
        net.load_state_dict(torch.load(args.init, map_location="cpu", weights_only=True)["state_dict"])
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    step, seconds = 0, 0.0
    state_path = args.out.with_suffix(".state.pt")  # ignored by git
    if args.resume and state_path.exists():
        state = torch.load(state_path, map_location="cpu", weights_only=True)
        net.load_state_dict(state["net"])
        opt.load_state_dict(state["opt"])
        step, seconds = int(state["step"]), float(state["seconds"])
        rng = np.random.default_rng(args.seed + step)
    budget = args.minutes * 60.0
    tic = time.time() - seconds
    losses = []
    net.train()
    while time.time() - tic < budget:
        lr = float(args.lr * 0.5 * (1 + np.cos(np.pi * min(1.0, (time.time() - tic) / budget))))
        for group in opt.param_groups:
            group["lr"] = lr
        if args.loop > 0:
            net.eval()
        batch = [example(items[int(rng.integers(len(items)))], rng, net, args.loop) for _ in range(args.batch)]
        net.train()
        x = torch.from_numpy(np.stack([b[0] for b in batch]))
        y = torch.from_numpy(np.stack([b[1] for b in batch]))
        loss = loss_fn(net(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
        step += 1
        if step % 20 == 0:
            print(f"step {step} {time.time() - tic:.0f}s lr {lr:.2e} loss {np.mean(losses[-20:]):.4f}", flush=True)
        if step % args.save_every == 0:
            save(net, opt, args, step, time.time() - tic, len(items), len(train), state_path)
    save(net, opt, args, step, time.time() - tic, len(items), len(train), state_path)
    return 0


def save(net, opt, args, step: int, seconds: float, organs: int, scans: int, state_path: Path) -> None:
    from medlsam.utils.atomic import torch_save_atomic

    record = {
        "data": f"OpenKBP train split, {scans} scans that are neither templates nor among the first {args.holdout}",
        "organs": organs,
        "steps": step,
        "batch": args.batch,
        "seconds": round(seconds),
        "lr": args.lr,
        "seed": args.seed,
        "init": str(args.init) if args.init else None,
        "network_in_the_loop": args.loop,
    }
    net.eval()
    save_click_refiner(net, args.out, record)
    net.train()
    torch_save_atomic({"net": net.state_dict(), "opt": opt.state_dict(), "step": step, "seconds": seconds}, state_path)
    print(f"saved {args.out} at step {step}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
