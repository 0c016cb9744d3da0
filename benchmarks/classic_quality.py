"""Quality and speed of the classic (weight-free) fill against OpenCV and PyPatchMatch.

Runs every method over 8 photos from scikit-image's bundled sample data (astronaut, coffee,
chelsea, rocket, camera, brick, grass, gravel; grayscale ones stacked to RGB), each
centre-cropped to a square and resized to 512 x 512, times 3 holes:

- ``square``: a centred square of 15% of the image area;
- ``band``: a 64 px horizontal band across the whole width, centred vertically;
- ``blob``: an irregular star-shaped blob, a polar curve with fixed harmonics.

Metrics, each averaged over the 24 cases:

- ``PSNR in hole``: in dB over the hole's pixels and all three channels (8-bit peak).
- ``texture kept``: the RMS luma gradient (forward differences) inside the hole of the result
  divided by that of the original, i.e. the square root of the ratio of gradient energies.
  Smearing fills score near 0.3, a fill that keeps the texture near 1; far above 1 means
  invented noise or seams. The JSON also has the plain energy ratio (``energy_ratio``).
- ``time``: mean wall time of one fill, in seconds (and the slowest fill). The methods run
  interleaved, case by case, so that load from other processes hits them alike.

Usage::

    python benchmarks/classic_quality.py [--quick] [--json PATH] [--methods telea,classic]

``--quick`` runs 3 photos instead of 8. scikit-image and OpenCV are benchmark-only
dependencies; the photos ship inside the scikit-image package, so nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np
import skimage.data

# Run from a checkout without installing: the packages live in sdk/ and server/.
_ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(_ROOT / "sdk"), str(_ROOT / "server")]

PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "camera", "brick", "grass", "gravel")
QUICK_PHOTOS = ("astronaut", "brick", "coffee")
HOLES = ("square", "band", "blob")
SIZE_PX = 512
SEED = 0

Fill = Callable[[np.ndarray, np.ndarray], np.ndarray]


def load_photo(name: str, size_px: int = SIZE_PX) -> np.ndarray:
    """Returns the bundled sample ``name`` as ``(size_px, size_px, 3)`` uint8 RGB."""
    image = getattr(skimage.data, name)()
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    image = image[..., :3]
    height, width = image.shape[:2]
    side = min(height, width)
    top, left = (height - side) // 2, (width - side) // 2
    image = image[top : top + side, left : left + side]
    interpolation = cv2.INTER_AREA if side > size_px else cv2.INTER_CUBIC
    return np.ascontiguousarray(cv2.resize(image, (size_px, size_px), interpolation=interpolation))


def make_hole(kind: str, size_px: int = SIZE_PX) -> np.ndarray:
    """Returns the ``(size_px, size_px)`` bool hole ``kind`` (see the module docstring)."""
    hole = np.zeros((size_px, size_px), bool)
    if kind == "square":
        side = round(size_px * 0.15**0.5)
        top = (size_px - side) // 2
        hole[top : top + side, top : top + side] = True
    elif kind == "band":
        top = (size_px - 64) // 2
        hole[top : top + 64, :] = True
    elif kind == "blob":
        y, x = np.mgrid[0:size_px, 0:size_px] / size_px
        dy, dx = y - 0.55, x - 0.45
        angle = np.arctan2(dy, dx)
        radius = 0.17 * (1 + 0.3 * np.sin(3 * angle) + 0.15 * np.cos(5 * angle + 1.0))
        hole = np.hypot(dy, dx) < radius
    else:
        raise ValueError(f"unknown hole kind {kind!r}")
    return hole


def psnr_in_hole(result: np.ndarray, original: np.ndarray, hole: np.ndarray) -> float:
    diff = result[hole].astype(np.float64) - original[hole].astype(np.float64)
    mse = float(np.mean(diff**2))
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def gradient_energy(image: np.ndarray, hole: np.ndarray) -> float:
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    gx = np.zeros_like(luma)
    gy = np.zeros_like(luma)
    gx[:, :-1] = np.diff(luma, axis=1)
    gy[:-1, :] = np.diff(luma, axis=0)
    return float(np.sum((gx**2 + gy**2)[hole]))


def energy_ratio(result: np.ndarray, original: np.ndarray, hole: np.ndarray) -> float:
    return gradient_energy(result, hole) / max(gradient_energy(original, hole), 1e-9)


def fill_telea(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    out = cv2.inpaint(bgr, hole.astype(np.uint8) * 255, 3, cv2.INPAINT_TELEA)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def fill_ns(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    bgr = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
    out = cv2.inpaint(bgr, hole.astype(np.uint8) * 255, 3, cv2.INPAINT_NS)
    return cv2.cvtColor(out, cv2.COLOR_BGR2RGB)


def fill_pypatchmatch(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    import patchmatch

    patchmatch.set_random_seed(SEED)
    return patchmatch.inpaint(image, hole.astype(np.uint8), patch_size=3)


def fill_classic(image: np.ndarray, hole: np.ndarray) -> np.ndarray:
    from genfill_server.engines.classic import content_aware_fill

    return content_aware_fill(image, hole, seed=SEED)


METHODS: dict[str, tuple[str, Fill]] = {
    "telea": ("OpenCV Telea r3", fill_telea),
    "ns": ("OpenCV NS r3", fill_ns),
    "pypatchmatch": ("PyPatchMatch 2.2, patch 3", fill_pypatchmatch),
    "classic": ("genfill classic", fill_classic),
}


def evaluate(names: list[str], photos: tuple[str, ...]) -> dict[str, dict]:
    cases: dict[str, list[dict]] = {name: [] for name in names}
    for photo in photos:
        original = load_photo(photo)
        for kind in HOLES:
            hole = make_hole(kind)
            damaged = original.copy()
            damaged[hole] = 0
            for name in names:
                start = time.perf_counter()
                result = METHODS[name][1](damaged, hole)
                elapsed_s = time.perf_counter() - start
                if not np.array_equal(result[~hole], original[~hole]):
                    raise AssertionError(f"{name} {photo}/{kind}: pixels outside the hole changed")
                energy = energy_ratio(result, original, hole)
                cases[name].append(
                    {
                        "photo": photo,
                        "hole": kind,
                        "psnr_db": psnr_in_hole(result, original, hole),
                        "texture_kept": energy**0.5,
                        "energy_ratio": energy,
                        "time_s": elapsed_s,
                    }
                )
    summaries = {}
    for name, rows in cases.items():
        summaries[name] = {
            "label": METHODS[name][0],
            **{key: float(np.mean([r[key] for r in rows])) for key in ("psnr_db", "texture_kept", "energy_ratio", "time_s")},
            "max_time_s": float(np.max([r["time_s"] for r in rows])),
            "cases": rows,
        }
    return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="3 photos instead of 8")
    parser.add_argument("--json", type=Path, help="write the per-case results here")
    parser.add_argument(
        "--methods", default=",".join(METHODS), help=f"comma-separated subset of {list(METHODS)}"
    )
    parser.add_argument("--per-case", action="store_true", help="also print every case")
    args = parser.parse_args(argv)

    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    photos = QUICK_PHOTOS if args.quick else PHOTOS

    # Warm up lazy imports and native libraries so the first case is not charged for them.
    warm = load_photo("camera", 64)
    for name in names:
        METHODS[name][1](warm, make_hole("square", 64))

    results = evaluate(names, photos)
    print(f"{len(photos)} photos x {len(HOLES)} holes at {SIZE_PX} px")
    print(f"| {'method':<28} | PSNR in hole | texture kept | time per fill (max) |")
    print(f"|{'-' * 30}|--------------|--------------|---------------------|")
    for summary in results.values():
        print(
            f"| {summary['label']:<28} | {summary['psnr_db']:9.2f} dB | {summary['texture_kept']:12.2f} "
            f"| {summary['time_s']:8.3f} s ({summary['max_time_s']:.2f} s) |"
        )
        if args.per_case:
            for case in summary["cases"]:
                print(
                    f"|   {case['photo'] + '/' + case['hole']:<26} | {case['psnr_db']:9.2f} dB "
                    f"| {case['texture_kept']:12.2f} | {case['time_s']:8.3f} s |"
                )
    if args.json:
        payload = {"photos": list(photos), "holes": list(HOLES), "size_px": SIZE_PX, "methods": results}
        args.json.write_text(json.dumps(payload, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
