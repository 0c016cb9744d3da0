"""Fill a hole in an image with genfill and save the before and after.

    python samples/fill_hole.py --local                 # runs a server in this process
    python samples/fill_hole.py photo.png --mask hole.png -o out/
    python samples/fill_hole.py --url ws://host:7860 --token TOKEN

Without an image it paints a brick wall and cuts a hole in it, so it runs anywhere. With no
diffusion model installed the server's classic engine fills from the image itself.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from genfill import Client
from PIL import Image


def brick_wall(width: int = 512, height: int = 384, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    offset = (y // 24 % 2) * 24
    mortar = ((y % 24) < 3) | (((x + offset) % 48) < 3)
    rgb = np.where(mortar[:, :, None], (205, 200, 190), (165, 72, 48)).astype(np.float32)
    rgb += rng.normal(0, 8, rgb.shape)
    return np.clip(rgb, 0, 255).astype(np.uint8)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", nargs="?", type=Path, help="image to edit (default: a generated brick wall)")
    parser.add_argument("--mask", type=Path, help="selection: white is filled (default: a hole in the middle)")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--variations", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-o", "--output", type=Path, default=Path("genfill-sample"))
    parser.add_argument("--local", action="store_true", help="run a server inside this process")
    parser.add_argument("--url", default=None, help="server url (default: the running server's state file)")
    parser.add_argument("--token", default=None)
    args = parser.parse_args()

    image = np.asarray(Image.open(args.image).convert("RGB")) if args.image else brick_wall()
    height, width = image.shape[:2]
    if args.mask:
        mask = np.asarray(Image.open(args.mask).convert("L"))
    else:
        mask = np.zeros((height, width), np.uint8)
        mask[height // 3 : height * 2 // 3, width // 3 : width * 2 // 3] = 255

    server = None
    if args.local:
        from genfill_server.background import BackgroundServer

        server = BackgroundServer()
        server.start()
        args.url, args.token = server.url, server.token
    try:
        with Client(args.url, token=args.token) as client:
            result = client.fill(
                image, mask, args.prompt, variations=args.variations, seed=args.seed,
                on_progress=lambda event: print(f"  {event.kind} {event.step or ''}/{event.total or ''}", end="\r"),
            )
    finally:
        if server is not None:
            server.stop()

    args.output.mkdir(parents=True, exist_ok=True)
    before = image.copy()
    before[mask > 0] = (255, 0, 255)
    Image.fromarray(before).save(args.output / "before.png")
    for index in range(len(result.seeds)):
        result.composite(index).save(args.output / f"after-{index}.png")
    print(f"\nfilled {result.box} with {result.engine} in {result.seconds:.2f} s, seeds {result.seeds}")
    print(f"wrote {args.output}/before.png and after-0..{len(result.seeds) - 1}.png")


if __name__ == "__main__":
    main()
