"""Outpaint every image in a folder to 16:9, keeping the original pixels unchanged.

    python samples/expand_to_16x9.py product-shots/ -o wide/ --prompt "studio backdrop"
    python samples/expand_to_16x9.py product-shots/ -o wide/ --local      # no running server needed

The canvas grows evenly on the two short sides. Images already 16:9 or wider-than-tall enough
are copied as they are.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from _connect import add_server_arguments, connect

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff"}


def margins_for(width: int, height: int, aspect: float = 16 / 9) -> dict[str, int]:
    """Margins in pixels that bring ``width x height`` to ``aspect``, split evenly."""
    if width / height < aspect:
        extra = round(height * aspect) - width
        return {"left": extra // 2, "right": extra - extra // 2, "top": 0, "bottom": 0}
    extra = round(width / aspect) - height
    return {"left": 0, "right": 0, "top": extra // 2, "bottom": extra - extra // 2}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="folder of images")
    parser.add_argument("-o", "--output", type=Path, required=True, help="folder for the results")
    parser.add_argument("--prompt", default="")
    parser.add_argument("--model", default=None)
    parser.add_argument("--engine", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=None)
    add_server_arguments(parser)
    args = parser.parse_args()

    from PIL import Image

    args.output.mkdir(parents=True, exist_ok=True)
    paths = sorted(p for p in args.folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    with connect(args) as client:
        for path in paths:
            with Image.open(path) as opened:
                image = opened.convert("RGBA")
            margins = margins_for(*image.size)
            target = args.output / f"{path.stem}.png"
            if not any(margins.values()):
                shutil.copyfile(path, target) if path.suffix.lower() == ".png" else image.save(target)
                print(f"{path.name}: already 16:9")
                continue
            result = client.expand(
                image, prompt=args.prompt, model=args.model, engine=args.engine,
                variations=1, seed=args.seed, steps=args.steps, **margins,
            )
            result.composite(0).save(target)
            print(f"{path.name}: {image.size[0]}x{image.size[1]} -> {result.canvas_size.width}x{result.canvas_size.height}")


if __name__ == "__main__":
    main()
