"""Drive the OHIF bundled with MONAI Label in a real browser (Playwright + the system Chromium), as a user does:
open a study in the MONAI Label mode, connect the panel to the server, run an auto-segmentation model, and read
back what OHIF displays (``window.services.segmentationService``)."""

from __future__ import annotations

import base64
import time
from pathlib import Path

import numpy as np

READ_LABELMAP = """() => {
  const seg = window.services.segmentationService;
  const volume = seg.getLabelmapVolume('1');
  const data = volume.voxelManager.getCompleteScalarDataArray();
  const bytes = new Uint8Array(data.length);
  bytes.set(data);
  let text = '';
  for (let i = 0; i < bytes.length; i += 32768) {
    text += String.fromCharCode.apply(null, bytes.subarray(i, i + 32768));
  }
  const segments = {};
  for (const [index, segment] of Object.entries(seg.getSegmentation('1').segments)) {
    if (segment) segments[index] = segment.label;
  }
  return {data: btoa(text), dimensions: Array.from(volume.dimensions), segments: segments,
          origin: Array.from(volume.origin), spacing: Array.from(volume.spacing),
          direction: Array.from(volume.direction)};
}"""


FOCUS_ON_LABELS = """(zoom) => {
  try {
    const volume = window.services.segmentationService.getLabelmapVolume('1');
    const [nx, ny, nz] = volume.dimensions;
    const data = volume.voxelManager.getCompleteScalarDataArray();
    let n = 0, si = 0, sj = 0, sk = 0;
    for (let k = 0; k < nz; k++) for (let j = 0; j < ny; j++) for (let i = 0; i < nx; i++) {
      if (data[i + nx * (j + ny * k)]) { n++; si += i; sj += j; sk += k; }
    }
    if (!n) return 'no labels';
    const world = volume.imageData.indexToWorld([si / n, sj / n, sk / n]);
    for (const engine of window.cornerstone.getRenderingEngines()) {
      for (const viewport of engine.getViewports()) {
        const camera = viewport.getCamera();
        const shift = [0, 1, 2].map((a) => world[a] - camera.focalPoint[a]);
        viewport.setCamera({
          focalPoint: world,
          position: camera.position.map((p, a) => p + shift[a]),
          parallelScale: camera.parallelScale / zoom,
        });
        viewport.render();
      }
    }
    return 'ok';
  } catch (e) { return String(e); }
}"""


def run_ohif_autosegmentation(
    playwright, chromium: str, server: str, study_uid: str, screenshot: Path, model: str = "medlsam", timeout_s=600
) -> dict:
    """Open ``study_uid`` at ``server``/ohif/, connect, run ``model``; returns {"voxels": OHIF's labelmap (flat,
    its own voxel order), "dimensions", "segments": {index: organ name}, "seconds": {...}} and writes a screenshot."""
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        console: list[str] = []
        page.on("console", lambda message: console.append(message.text))
        seconds = {}
        tic = time.perf_counter()
        page.goto(f"{server}/ohif/monai-label?StudyInstanceUIDs={study_uid}")
        page.wait_for_function(
            "() => window.services && window.services.displaySetService.getActiveDisplaySets().length > 0",
            timeout=120_000,
        )
        _wait_console(page, console, "displaySetsToAllImages", 120)
        seconds["study_loaded"] = time.perf_counter() - tic
        hide = page.get_by_text("Confirm and Hide")
        if hide.count():
            hide.first.click()
        url_input = page.locator("#monailabelServerURL")
        url_input.fill(server + "/")
        url_input.locator("xpath=ancestor::tr[1]//button").click()
        page.wait_for_function(
            "() => { try { return window.services.segmentationService.getLabelmapVolume('1') != null } "
            "catch (e) { return false } }",
            timeout=60_000,
        )
        selector = page.locator("select", has=page.locator(f"option[value='{model}']")).first
        selector.select_option(model)
        tic = time.perf_counter()
        page.locator("button[title='Run Segmentation']").first.click()
        _wait_console(page, console, "updated the segmentation's scalar data", timeout_s)
        seconds["autosegmentation"] = time.perf_counter() - tic
        page.wait_for_timeout(2000)  # let the viewports render the new labelmap
        shown = page.evaluate(READ_LABELMAP)
        focus = page.evaluate(FOCUS_ON_LABELS, 2.5)  # for the screenshot: views through the organs' centre, zoomed
        if focus != "ok":
            console.append(f"focus: {focus}")
        page.wait_for_timeout(1500)
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
        return {
            "voxels": np.frombuffer(base64.b64decode(shown["data"]), dtype=np.uint8),
            "dimensions": shown["dimensions"],
            "origin": shown["origin"],
            "spacing": shown["spacing"],
            "direction": shown["direction"],
            "segments": {int(k): v for k, v in shown["segments"].items()},
            "seconds": seconds,
        }
    finally:
        browser.close()


def _wait_console(page, console: list[str], text: str, timeout_s: float) -> None:
    """Wait for a console line (page.wait_for_timeout lets Playwright deliver the page's events meanwhile)."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if any(text in line for line in console):
            return
        if any("Failed to Run Segmentation" in line for line in console):
            break
        page.wait_for_timeout(500)
    raise TimeoutError(f"OHIF never logged {text!r}; last console lines: {console[-10:]}")
