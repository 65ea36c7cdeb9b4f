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


RT_STATE = """(rt) => {
  const services = window.services;
  const displaySet = services.displaySetService.getDisplaySetByUID(rt);
  const referenced = services.displaySetService.getDisplaySetByUID(displaySet.referencedDisplaySetInstanceUID);
  const structureSet = displaySet.structureSet && displaySet.structureSet.ROIContours.map((roi) => ({
    number: roi.ROINumber, name: roi.ROIName, color: roi.colorArray || null,
    contours: roi.contourPoints.length, points: roi.contourPoints.reduce((n, c) => n + c.numberOfPoints, 0),
    types: Array.from(new Set(roi.contourPoints.map((c) => c.type))),
  }));
  const seg = services.segmentationService;
  const segmentation = seg.getSegmentation(rt);
  const viewportId = services.viewportGridService.getActiveViewportId();
  const shown = services.viewportGridService.getDisplaySetsUIDsForViewport(viewportId) || [];
  const segments = {};
  const annotations = {};
  if (segmentation) {
    for (const [index, segment] of Object.entries(segmentation.segments)) {
      if (segment) segments[index] = segment.label;
    }
    const map = (segmentation.representationData.Contour || {}).annotationUIDsMap || new Map();
    for (const [index, uids] of map) annotations[index] = uids.size;
  }
  return {
    displaySet: {Modality: displaySet.Modality, SeriesInstanceUID: displaySet.SeriesInstanceUID,
                 SeriesDescription: displaySet.SeriesDescription, isLoaded: !!displaySet.isLoaded},
    referencedSeries: referenced ? referenced.SeriesInstanceUID : null,
    structureSet,
    segments, annotations,
    representations: seg.getSegmentationRepresentations(viewportId).map((r) => ({
      type: r.type, segmentationId: r.segmentationId, visible: r.visible})),
    viewportSeries: shown.map((uid) => services.displaySetService.getDisplaySetByUID(uid).SeriesInstanceUID),
  };
}"""

RT_DRAWN = """(rt) => {
  // What the viewport draws now: the image shown (its z), per segment the contours OHIF put on that image (cornerstone
  // annotations) and the outlines drawn in the viewport's SVG layer in the segment's colour (subpaths), and where.
  const services = window.services;
  const viewportId = services.viewportGridService.getActiveViewportId();
  const viewport = window.cornerstone.getEnabledElementByViewportId(viewportId).viewport;
  const imageId = viewport.getCurrentImageId();
  const plane = window.cornerstone.metaData.get('imagePlaneModule', imageId);
  const segmentation = services.segmentationService.getSegmentation(rt);
  const state = window.cornerstoneTools.annotation.state;
  const element = viewport.element;
  const paths = Array.from(element.querySelectorAll('svg path[stroke^="rgba"]'));
  const pane = element.closest('[data-cy=viewport-pane]') || element;
  const out = {z: plane.imagePositionPatient[2], loading: pane.innerText.includes('Loading'), segments: {}};
  const box = [Infinity, Infinity, Infinity, -Infinity, -Infinity, -Infinity];
  for (const [index, uids] of segmentation.representationData.Contour.annotationUIDsMap) {
    const color = services.segmentationService.getSegmentColor(viewportId, rt, Number(index)).slice(0, 3);
    const onImage = Array.from(uids).map((uid) => state.getAnnotation(uid))
      .filter((a) => a && a.metadata.referencedImageId === imageId);
    const zs = [];
    for (const a of onImage) {
      for (const p of a.data.contour.polyline) {
        for (let i = 0; i < 3; i++) { box[i] = Math.min(box[i], p[i]); box[i + 3] = Math.max(box[i + 3], p[i]); }
      }
      zs.push(a.data.contour.polyline[0][2]);
    }
    const prefix = `rgba(${color[0]}, ${color[1]}, ${color[2]},`;
    const drawn = paths.filter((p) => p.getAttribute('stroke').startsWith(prefix))
      .reduce((n, p) => n + (p.getAttribute('d').match(/M/g) || []).length, 0);
    out.segments[index] = {annotations: onImage.length, drawn, color, zs};
  }
  out.box = box;
  return out;
}"""

FOCUS_ON_BOX = """([box, margin]) => {
  const viewportId = window.services.viewportGridService.getActiveViewportId();
  const viewport = window.cornerstone.getEnabledElementByViewportId(viewportId).viewport;
  const camera = viewport.getCamera();
  const centre = [(box[0] + box[3]) / 2, (box[1] + box[4]) / 2, camera.focalPoint[2]];
  const shift = [0, 1, 2].map((a) => centre[a] - camera.focalPoint[a]);
  const [width, height] = [viewport.canvas.clientWidth, viewport.canvas.clientHeight];
  const half = Math.max((box[4] - box[1]) / 2, ((box[3] - box[0]) / 2) * height / width) * margin;
  viewport.setCamera({focalPoint: centre, position: camera.position.map((p, a) => p + shift[a]), parallelScale: half});
  viewport.render();
}"""


CURRENT_SLICE = """() => {
  const viewportId = window.services.viewportGridService.getActiveViewportId();
  return window.cornerstone.getEnabledElementByViewportId(viewportId).viewport.getCurrentImageIdIndex();
}"""

SEGMENT_SLICE = """([rt, index]) => {
  // the image through the segment's centre (OHIF's own centre, where its panel jumps)
  const centre = window.services.segmentationService.getSegmentation(rt).segments[index].cachedStats.center.world;
  const viewportId = window.services.viewportGridService.getActiveViewportId();
  const imageIds = window.cornerstone.getEnabledElementByViewportId(viewportId).viewport.getImageIds();
  const z = imageIds.map((id) => window.cornerstone.metaData.get('imagePlaneModule', id).imagePositionPatient[2]);
  const best = z.reduce((b, v, i) => (Math.abs(v - centre[2]) < Math.abs(z[b] - centre[2]) ? i : b), 0);
  return {index: best, z: z[best], slices: imageIds.length};
}"""

VIEWPORT_CENTRE = """() => {
  const viewportId = window.services.viewportGridService.getActiveViewportId();
  const r = window.cornerstone.getEnabledElementByViewportId(viewportId).viewport.element.getBoundingClientRect();
  return [r.x + r.width / 2, r.y + r.height / 2];
}"""


RT_SETTLED = (
    """(rt) => {
  const drawn = (%s)(rt);
  const segments = Object.values(drawn.segments);
  return !drawn.loading && segments.some((s) => s.annotations > 0)
    && segments.every((s) => s.drawn === s.annotations);
}"""
    % RT_DRAWN
)


def show_rtstruct(
    playwright,
    chromium: str,
    server: str,
    study_uid: str,
    series_uid: str,
    screenshot: Path,
    segment: str,
    timeout_s=60.0,
) -> dict:
    """Open ``study_uid`` at ``server``/ohif/ in the basic viewer (route ``viewer``), load the RTSTRUCT series
    ``series_uid`` as a user does (double-click its thumbnail, answer Yes to "open this Segmentation?"), show the
    segmentation panel and scroll with the mouse wheel to the slice through ``segment``'s centre; returns what OHIF
    parsed and shows (``RT_STATE`` once loaded, ``RT_DRAWN`` on that slice, the segmentation panel's rows, the
    viewport's slice overlay, the page's errors, seconds) and writes a screenshot zoomed on that slice's contours.
    Clicking the segment in the panel jumps there too, but this OHIF's overlay and wheel then stay on the old slice."""
    ms = timeout_s * 1000
    browser = playwright.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
    try:
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        errors = _page_errors(page, server)
        seconds = {}
        rt, clicked = _load_rtstruct(page, server, study_uid, series_uid, ms, seconds)
        state = page.evaluate(RT_STATE, rt)
        panel = page.get_by_text("Appearance Settings")
        if not panel.is_visible():
            page.locator("[data-cy=panelSegmentation-btn]").click()
        panel.wait_for(timeout=ms)
        index = next(int(k) for k, v in state["segments"].items() if v == segment)
        target = page.evaluate(SEGMENT_SLICE, [rt, index])
        _scroll_to(page, target, ms)
        _wait_quietly(page, RT_SETTLED, rt, 15)  # the caller's assertions say what differs if it never settles
        drawn = page.evaluate(RT_DRAWN, rt)
        rows = page.locator("[data-cy=data-row]").all_inner_texts()  # the segmentation panel's segments
        overlay = page.locator("[data-cy=viewport-overlay-bottom-right]").inner_text()
        seconds["shown"] = time.perf_counter() - clicked
        page.evaluate(FOCUS_ON_BOX, [drawn["box"], 1.25])
        _wait_quietly(page, RT_SETTLED, rt, 15)  # the outlines redrawn after the zoom
        screenshot.parent.mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(screenshot))
        return {
            "state": state,
            "drawn": drawn,
            "panel": [row.split() for row in rows],
            "overlay": overlay,
            "target": target,
            "errors": errors,
            "seconds": seconds,
        }
    finally:
        browser.close()


def _page_errors(page, server: str) -> list[str]:
    """The page's errors as they come, less resources outside the server (OHIF's web fonts)."""
    errors: list[str] = []
    page.on(
        "console",
        lambda m: (
            errors.append(f"{m.text} ({m.location.get('url', '')})")
            if m.type == "error" and (m.location.get("url") or server).startswith(server)
            else None
        ),
    )
    page.on("pageerror", lambda error: errors.append(f"page error: {error}"))
    return errors


def _load_rtstruct(page, server: str, study_uid: str, series_uid: str, ms: float, seconds: dict) -> tuple[str, float]:
    """The study opened and the RTSTRUCT series loaded as a user does (``seconds``: study_loaded, rtstruct_loaded);
    returns its display set's uid and the time (perf_counter) of the double-click on its thumbnail."""
    tic = time.perf_counter()
    page.goto(f"{server}/ohif/viewer?StudyInstanceUIDs={study_uid}")
    find = (
        "(uid) => window.services && window.services.displaySetService.getActiveDisplaySets()"
        ".some((d) => d.Modality === 'RTSTRUCT' && d.SeriesInstanceUID === uid)"
    )
    page.wait_for_function(find, arg=series_uid, timeout=ms)
    rt = page.evaluate(
        "(uid) => window.services.displaySetService.getActiveDisplaySets()"
        ".find((d) => d.Modality === 'RTSTRUCT' && d.SeriesInstanceUID === uid).displaySetInstanceUID",
        series_uid,
    )
    seconds["study_loaded"] = time.perf_counter() - tic
    hide = page.locator("[data-cy=confirm-and-hide-button]")
    if hide.count():
        hide.first.click()
    tic = time.perf_counter()
    page.locator(f"#thumbnail-{rt}").dblclick()
    page.locator("[data-cy=yes-hydrate-btn]").click(timeout=ms)  # "Do you want to open this Segmentation?"
    hydrated = """(rt) => {
      const seg = window.services.segmentationService;
      const viewportId = window.services.viewportGridService.getActiveViewportId();
      const s = seg.getSegmentation(rt);
      return !!s && Object.keys(s.segments).length > 0
        && seg.getSegmentationRepresentations(viewportId).some((r) => r.segmentationId === rt);
    }"""
    page.wait_for_function(hydrated, arg=rt, timeout=ms)
    seconds["rtstruct_loaded"] = time.perf_counter() - tic
    return rt, tic


def _scroll_to(page, target: dict, ms: float) -> None:
    """Scroll there as a user does: a wheel step is a slice (its direction learnt on the way)."""
    page.mouse.move(*page.evaluate(VIEWPORT_CENTRE))
    step = 100
    for _ in range(2 * target["slices"]):
        now = page.evaluate(CURRENT_SLICE)
        if now == target["index"]:
            break
        page.mouse.wheel(0, step if target["index"] > now else -step)
        page.wait_for_function(f"() => ({CURRENT_SLICE})() !== {now}", timeout=ms)
        if abs(page.evaluate(CURRENT_SLICE) - target["index"]) > abs(now - target["index"]):
            step = -step


def _wait_quietly(page, function: str, arg, timeout_s: float) -> bool:
    """page.wait_for_function without raising: whether ``function(arg)`` became true within ``timeout_s``."""
    from playwright.sync_api import TimeoutError as PlaywrightTimeout

    try:
        page.wait_for_function(function, arg=arg, timeout=timeout_s * 1000)
        return True
    except PlaywrightTimeout:
        return False
