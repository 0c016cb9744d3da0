"""Object removal on real photos: Telea, PyPatchMatch and genfill's classic engine in one run.

The removal set lives in ``tests/data/removal``: 15 freely licensed photos that scikit-image
ships (licences in ``masks.json``), downscaled to a long side of 512 px, and 22 object masks
drawn by hand as ellipses and polygons over them (``masks.json``, "cases"). ``--build-set``
rewrites the photos from the installed scikit-image, so the set can be checked against its
source; nothing is downloaded.

Measures, per case and method (``hole`` is the mask; ``band`` the known pixels 3 to 15 px
outside it, what a viewer compares the fill with):

- ``psnr_db``: PSNR over the hole against the original, i.e. against the object that was
  removed. For removal it is a weak guide (the right answer is not the object) and is kept
  because the classic engine was tuned on it.
- ``texture``: RMS luma gradient in the hole over that of the original there, as in
  ``classic_quality.py``; ``texture_band``: the same over the band's. A smear scores well below
  1 on the second, pasted edges or noise well above.
- ``seam``: RMS luma gradient on the hole's border (the pixels within 1 px of it, both sides)
  over the band's. A fill that meets its surroundings scores about 1; a visible seam more.
- ``foreign``: share of filled pixels whose content comes from far away or from across a
  strong edge. For each of up to ``FOREIGN_QUERIES`` hole pixels, the ``7 x 7`` patch of the
  result is matched against every known patch of the image (brute force, the same for every
  method); among the matches within a tolerance of the best, the one nearest the hole is
  taken, so a smooth fill that could have come from next door is not charged. Foreign is a
  source more than ``FOREIGN_DISTANCE_PX`` from the hole, or one whose straight path to the
  hole crosses a strong edge of the photo (long Canny contours of the blurred luma), such
  as the outline between a face and the backdrop behind it.
- ``ring``: the largest share of the original colour that a pixel inside the (hard) selection
  keeps in what the user gets. Telea and PyPatchMatch are pasted with the hole as a hard
  mask (0); ``ours`` runs through the server's real fill pipeline (``run_fill``: context
  crop, classic engine, colour match, compositing mask), and its layer's alpha is read.
- ``time_s``, ``cpu_s``: wall and CPU time of one fill (ours: the whole pipeline). On a
  shared machine the CPU time is the steadier figure; the fills are single-threaded but for
  the pipeline's colour helpers.

A contact sheet (``--sheet``) shows, per case, the photo with the mask outlined, then a crop
around the hole of the original and of each method's result, for a person to look at.

Usage::

    python benchmarks/removal.py [--cases a,b] [--methods telea,pypatchmatch,ours]
        [--sheet PATH] [--json PATH] [--build-set]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
from PIL import Image, ImageDraw

_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "sdk"), str(_ROOT / "server")]

SET_DIR = _ROOT / "tests" / "data" / "removal"
LONG_SIDE_PX = 512
SEED = 0
FOREIGN_QUERIES = 300
FOREIGN_DISTANCE_PX = 64
FOREIGN_PATCH_RADIUS = 3
BAND_PX = (3, 15)


# --- the set ---------------------------------------------------------------------------


def spec() -> dict:
    return json.loads((SET_DIR / "masks.json").read_text())


def build_set() -> None:
    """Writes every photo of ``masks.json`` from the installed scikit-image."""
    import skimage.data

    for name, info in spec()["photos"].items():
        image = getattr(skimage.data, info["source"].split(".")[-1])()
        if image.ndim == 2:
            image = np.stack([image] * 3, axis=-1)
        image = np.ascontiguousarray(image[..., :3])
        height, width = image.shape[:2]
        scale = LONG_SIDE_PX / max(height, width)
        size = (round(width * scale), round(height * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_AREA if scale < 1 else cv2.INTER_CUBIC)
        Image.fromarray(image).save(SET_DIR / f"{name}.jpg", quality=90)


def load_photo(name: str) -> np.ndarray:
    return np.asarray(Image.open(SET_DIR / f"{name}.jpg").convert("RGB"))


def rasterise(case: dict, size: tuple[int, int], margin_px: int = 0) -> np.ndarray:
    """The ``(H, W)`` bool mask of a case's shapes on a photo of ``size`` ``(W, H)``, grown
    by a disc of ``margin_px``."""
    canvas = Image.new("L", size, 0)
    draw = ImageDraw.Draw(canvas)
    for cx, cy, rx, ry in case.get("ellipse", []):
        draw.ellipse([cx - rx, cy - ry, cx + rx, cy + ry], fill=255)
    for points in case.get("polygon", []):
        draw.polygon([tuple(p) for p in points], fill=255)
    mask = np.asarray(canvas)
    if margin_px:
        disc = cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * margin_px + 1, 2 * margin_px + 1))
        mask = cv2.dilate(mask, disc)
    return mask > 0


def load_case(name: str, data: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(image, hole)``: ``(H, W, 3)`` uint8 RGB and ``(H, W)`` bool."""
    data = data or spec()
    case = data["cases"][name]
    image = load_photo(case["photo"])
    return image, rasterise(case, (image.shape[1], image.shape[0]), data.get("margin_px", 0))


# --- methods ---------------------------------------------------------------------------


@dataclass
class Outcome:
    image: np.ndarray  # what the user sees, (H, W, 3) uint8
    ring: float  # largest share of original colour kept inside the selection


def fill_telea(image: np.ndarray, hole: np.ndarray) -> Outcome:
    out = cv2.inpaint(image, hole.astype(np.uint8) * 255, 3, cv2.INPAINT_TELEA)
    return Outcome(out, 0.0)


def fill_pypatchmatch(image: np.ndarray, hole: np.ndarray) -> Outcome:
    import patchmatch

    patchmatch.set_random_seed(SEED)
    out = patchmatch.inpaint(image, hole.astype(np.uint8), patch_size=3)
    result = image.copy()
    result[hole] = out[hole]
    return Outcome(result, 0.0)


_classic_engine = None


def fill_ours(image: np.ndarray, hole: np.ndarray) -> Outcome:
    """The server's own path: ``run_fill`` with the classic engine, a default request."""
    global _classic_engine
    from genfill import fill
    from genfill.fill import Box
    from genfill.protocol import FillRequest
    from genfill_server.engines.classic import ClassicEngine
    from genfill_server.pipeline import run_fill

    if _classic_engine is None:
        _classic_engine = ClassicEngine()
        _classic_engine.load()
    canvas = np.dstack([image, np.full(image.shape[:2], 255, np.uint8)])
    selection = hole.astype(np.uint8) * 255
    request = FillRequest(image="a" * 64, mask="b" * 64, prompt="", mode="remove")
    result = run_fill(_classic_engine, request, canvas, selection, [SEED], lambda *args: None)
    box: Box = result.box
    layer = result.layers[0]
    out = fill.composite(canvas, layer, box)[..., :3]
    alpha = np.zeros(hole.shape, np.uint8)
    alpha[box.slices] = layer[..., 3]
    ring = float(1 - alpha[hole].min() / 255)
    return Outcome(np.ascontiguousarray(out), ring)


METHODS: dict[str, Callable[[np.ndarray, np.ndarray], Outcome]] = {
    "telea": fill_telea,
    "pypatchmatch": fill_pypatchmatch,
    "ours": fill_ours,
}


# --- measures --------------------------------------------------------------------------


def luma(image: np.ndarray) -> np.ndarray:
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])


def gradient_sq(image: np.ndarray) -> np.ndarray:
    y = luma(image)
    gx = np.zeros_like(y)
    gy = np.zeros_like(y)
    gx[:, :-1] = np.diff(y, axis=1)
    gy[:-1] = np.diff(y, axis=0)
    return gx**2 + gy**2


def rings(hole: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(border, band, core)``: pixels within 1 px of the hole's edge (both sides), known
    pixels ``BAND_PX`` away, and hole pixels more than 1 px inside."""
    from scipy import ndimage

    outside = ndimage.distance_transform_edt(hole)  # distance to the nearest known pixel
    inside = ndimage.distance_transform_edt(~hole)
    border = (hole & (outside <= 1.5)) | (~hole & (inside <= 1.5))
    band = ~hole & (inside >= BAND_PX[0]) & (inside <= BAND_PX[1])
    return border, band, hole & (outside > 1.5)


def psnr_in_hole(result: np.ndarray, original: np.ndarray, hole: np.ndarray) -> float:
    diff = result[hole].astype(np.float64) - original[hole].astype(np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def strong_edges(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    """Long contours of the blurred photo, outside the hole: the outlines between regions
    (a face and its backdrop), not the edges inside a texture."""
    grey = cv2.GaussianBlur(cv2.cvtColor(image, cv2.COLOR_RGB2GRAY), (0, 0), 2.0)
    edges = cv2.Canny(grey, 30, 80) > 0
    count, labels, stats, _ = cv2.connectedComponentsWithStats(edges.astype(np.uint8), connectivity=8)
    long = np.zeros(count, bool)
    long[1:] = stats[1:, cv2.CC_STAT_AREA] >= 60
    keep = long[labels]
    near_hole = cv2.dilate(hole.astype(np.uint8), np.ones((7, 7), np.uint8)) > 0
    return keep & ~near_hole


def foreign_share(result: np.ndarray, damaged: np.ndarray, hole: np.ndarray, rng: np.random.Generator) -> float:
    from scipy import ndimage

    r = FOREIGN_PATCH_RADIUS
    height, width = hole.shape
    image = result.astype(np.float32)
    blocked = cv2.dilate(hole.astype(np.uint8), np.ones((2 * r + 1, 2 * r + 1), np.uint8)) > 0
    inner = np.zeros_like(hole)
    inner[r : height - r, r : width - r] = True
    sy, sx = np.nonzero(~blocked & inner)
    keep = (sy % 2 == 0) & (sx % 2 == 0)
    sy, sx = sy[keep], sx[keep]
    hy, hx = np.nonzero(hole & inner)
    if hy.size == 0 or sy.size == 0:
        return 0.0
    pick = rng.choice(hy.size, min(FOREIGN_QUERIES, hy.size), replace=False)
    hy, hx = hy[pick], hx[pick]
    offsets = np.arange(-r, r + 1)
    dy, dx = np.meshgrid(offsets, offsets, indexing="ij")

    def patches(y: np.ndarray, x: np.ndarray) -> np.ndarray:
        return image[y[:, None] + dy.ravel()[None], x[:, None] + dx.ravel()[None]].reshape(y.size, -1)

    sources = patches(sy, sx)
    queries = patches(hy, hx)
    s2 = (sources**2).sum(axis=1)
    distance_to_hole, nearest = ndimage.distance_transform_edt(~hole, return_indices=True)
    source_reach = distance_to_hole[sy, sx]
    edges = strong_edges(damaged, hole)
    foreign = 0
    for start in range(0, queries.shape[0], 64):
        q = queries[start : start + 64]
        ssd = (q**2).sum(axis=1)[:, None] + s2[None] - 2 * q @ sources.T
        best = ssd.min(axis=1, keepdims=True)
        # Near-ties (flat areas match equally well in many places) go to the nearest source.
        tolerance = np.maximum(0.1 * best, 9.0 * q.shape[1])
        reach = np.where(ssd <= best + tolerance, source_reach[None], np.inf)
        chosen = reach.argmin(axis=1)
        for index in chosen:
            y, x = sy[index], sx[index]
            if source_reach[index] > FOREIGN_DISTANCE_PX:
                foreign += 1
                continue
            ty, tx = nearest[0][y, x], nearest[1][y, x]
            steps = int(max(abs(ty - y), abs(tx - x))) + 1
            line_y = np.rint(np.linspace(y, ty, steps)).astype(int)
            line_x = np.rint(np.linspace(x, tx, steps)).astype(int)
            foreign += bool(edges[line_y, line_x].any())
    return foreign / queries.shape[0]


def measure(result: np.ndarray, original: np.ndarray, hole: np.ndarray, rng: np.random.Generator) -> dict:
    border, band, core = rings(hole)
    g_result, g_original = gradient_sq(result), gradient_sq(original)
    band_energy = max(float(g_result[band].mean()), 1e-9)
    damaged = original.copy()
    damaged[hole] = 0
    return {
        "psnr_db": psnr_in_hole(result, original, hole),
        "texture": (float(g_result[core].sum()) / max(float(g_original[core].sum()), 1e-9)) ** 0.5,
        "texture_band": (float(g_result[core].mean()) / band_energy) ** 0.5,
        "seam": (float(g_result[border].mean()) / band_energy) ** 0.5,
        "foreign": foreign_share(result, damaged, hole, rng),
    }


# --- contact sheet ---------------------------------------------------------------------

TILE_PX = 224


def crop_box(hole: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(hole.any(axis=1))
    cols = np.flatnonzero(hole.any(axis=0))
    side = max(rows[-1] - rows[0], cols[-1] - cols[0]) * 1.6 + 16
    cy, cx = (rows[0] + rows[-1]) / 2, (cols[0] + cols[-1]) / 2
    height, width = hole.shape
    side = min(side, height, width)
    top = int(np.clip(cy - side / 2, 0, height - side))
    left = int(np.clip(cx - side / 2, 0, width - side))
    return left, top, left + int(side), top + int(side)


def tile(image: np.ndarray, box: tuple[int, int, int, int] | None = None) -> Image.Image:
    picture = Image.fromarray(image)
    if box is not None:
        picture = picture.crop(box)
    picture.thumbnail((TILE_PX, TILE_PX), Image.LANCZOS if box is None else Image.NEAREST)
    if box is not None and picture.size[0] < TILE_PX:
        picture = picture.resize((TILE_PX, TILE_PX), Image.LANCZOS)
    return picture


def contact_sheet(rows: list[tuple[str, np.ndarray, np.ndarray, dict[str, np.ndarray]]], path: Path) -> None:
    """Per case: photo with the mask outlined | original crop | each method's crop."""
    methods = list(rows[0][3]) if rows else []
    columns = 2 + len(methods)
    label_px = 14
    sheet = Image.new("RGB", (columns * TILE_PX, label_px + len(rows) * (TILE_PX + label_px)), "white")
    draw = ImageDraw.Draw(sheet)
    for column, title in enumerate(["photo + mask", "original (crop)", *methods]):
        draw.text((column * TILE_PX + 4, 1), title, fill="black")
    for row, (name, original, hole, results) in enumerate(rows):
        y = label_px + row * (TILE_PX + label_px)
        draw.text((4, y + 1), name, fill="black")
        y += label_px
        outline = original.copy()
        edge = hole & ~(cv2.erode(hole.astype(np.uint8), np.ones((5, 5), np.uint8)) > 0)
        outline[cv2.dilate(edge.astype(np.uint8), np.ones((3, 3), np.uint8)) > 0] = (255, 0, 255)
        box = crop_box(hole)
        tiles = [tile(outline), tile(original, box)] + [tile(results[m], box) for m in methods]
        for column, picture in enumerate(tiles):
            sheet.paste(picture, (column * TILE_PX, y))
    sheet.save(path)


# --- run -------------------------------------------------------------------------------


def evaluate(case_names: list[str], method_names: list[str], sheet: Path | None) -> dict:
    data = spec()
    rng = np.random.default_rng(0)
    per_case: dict[str, dict[str, dict]] = {}
    sheet_rows = []
    for name in case_names:
        original, hole = load_case(name, data)
        damaged = original.copy()
        damaged[hole] = 0
        per_case[name] = {}
        results = {}
        for method in method_names:
            start, start_cpu = time.perf_counter(), time.process_time()
            outcome = METHODS[method](damaged, hole)
            elapsed_s, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
            if not np.array_equal(outcome.image[~hole], original[~hole]):
                raise AssertionError(f"{method} {name}: pixels outside the hole changed")
            scores = measure(outcome.image, original, hole, rng)
            scores.update(ring=outcome.ring, time_s=elapsed_s, cpu_s=cpu_s)
            per_case[name][method] = scores
            results[method] = outcome.image
        sheet_rows.append((name, original, hole, results))
    if sheet is not None:
        contact_sheet(sheet_rows, sheet)
    return per_case


KEYS = ("psnr_db", "texture", "texture_band", "seam", "foreign", "ring", "time_s", "cpu_s")


def summarise(per_case: dict, method_names: list[str]) -> dict:
    out = {}
    for method in method_names:
        rows = [per_case[c][method] for c in per_case]
        out[method] = {key: float(np.mean([r[key] for r in rows])) for key in KEYS}
        out[method]["max_ring"] = float(np.max([r["ring"] for r in rows]))
        out[method]["max_time_s"] = float(np.max([r["time_s"] for r in rows]))
        out[method]["max_cpu_s"] = float(np.max([r["cpu_s"] for r in rows]))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="comma-separated subset of the cases")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--sheet", type=Path, help="write the contact sheet PNG here")
    parser.add_argument("--json", type=Path, help="write per-case results here")
    parser.add_argument("--per-case", action="store_true")
    parser.add_argument("--build-set", action="store_true", help="rewrite the photos from scikit-image")
    args = parser.parse_args(argv)
    if args.build_set:
        build_set()
        return 0
    all_cases = list(spec()["cases"])
    case_names = args.cases.split(",") if args.cases else all_cases
    method_names = args.methods.split(",")
    for name in case_names:
        if name not in all_cases:
            parser.error(f"unknown case {name!r}")
    for name in method_names:
        if name not in METHODS:
            parser.error(f"unknown method {name!r}; choose from {list(METHODS)}")
    # Warm lazy imports and native libraries outside the timings.
    warm_image, warm_hole = np.zeros((64, 64, 3), np.uint8), np.zeros((64, 64), bool)
    warm_hole[20:30, 20:30] = True
    for method in method_names:
        METHODS[method](warm_image, warm_hole)
    per_case = evaluate(case_names, method_names, args.sheet)
    summary = summarise(per_case, method_names)
    print(f"{len(case_names)} cases from {len({spec()['cases'][c]['photo'] for c in case_names})} photos, long side {LONG_SIDE_PX} px")
    print("| method | PSNR in hole | texture (vs orig / vs band) | seam | foreign | ring (max) | wall time (max) | CPU time (max) |")
    print("|---|---|---|---|---|---|---|---|")
    for method, s in summary.items():
        print(
            f"| {method} | {s['psnr_db']:.2f} dB | {s['texture']:.2f} / {s['texture_band']:.2f} | {s['seam']:.2f} "
            f"| {s['foreign']:.3f} | {s['ring']:.2f} ({s['max_ring']:.2f}) | {s['time_s']:.3f} s ({s['max_time_s']:.2f} s) "
            f"| {s['cpu_s']:.3f} s ({s['max_cpu_s']:.2f} s) |"
        )
    if args.per_case:
        for name, methods in per_case.items():
            for method, r in methods.items():
                print(
                    f"  {name:<22} {method:<13} {r['psnr_db']:6.2f} dB tex {r['texture']:.2f}/{r['texture_band']:.2f} "
                    f"seam {r['seam']:.2f} foreign {r['foreign']:.3f} ring {r['ring']:.2f} {r['time_s']:.3f} s"
                )
    if args.json:
        args.json.write_text(json.dumps({"summary": summary, "cases": per_case}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
