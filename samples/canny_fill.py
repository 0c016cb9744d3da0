"""Fill a selection guided by the edges of the image (ControlNet canny).

    python samples/canny_fill.py room.png --mask wall.png --prompt "a bookshelf" -o out.png
    python samples/canny_fill.py room.png --mask wall.png --edges sketch.png --prompt "..." -o out.png

The server derives a canny edge map from the canvas, or uses ``--edges`` (an image the size of
the canvas, white edges on black). Needs a diffusion model with a canny ControlNet installed
beside it (for example control_v11p_sd15_canny next to an SD 1.5 inpainting model).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _connect import add_server_arguments, connect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--mask", type=Path, required=True)
    parser.add_argument("--prompt", required=True)
    parser.add_argument("--edges", type=Path, default=None, help="control image (default: derived by the server)")
    parser.add_argument("--strength", type=float, default=1.0, help="ControlNet strength, 0 to 2")
    parser.add_argument("--model", default=None, help="base model (default: the first with a canny ControlNet)")
    parser.add_argument("--variations", type=int, default=3)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("-o", "--output", type=Path, required=True, help="variations get -1, -2... before the suffix")
    add_server_arguments(parser)
    args = parser.parse_args()

    control = {"type": "canny", "strength": args.strength}
    if args.edges is not None:
        control["image"] = args.edges
    with connect(args) as client:
        model = args.model
        if model is None:
            model = next((m.name for m in client.hello.models if "canny" in m.control), None)
            if model is None:
                parser.exit(1, "no model with a canny ControlNet is installed on the server\n")
        result = client.fill(
            args.image, args.mask, args.prompt, model=model, control=[control],
            variations=args.variations, steps=args.steps, seed=args.seed,
        )
    for index in range(len(result.arrays)):
        path = args.output if index == 0 else args.output.with_name(f"{args.output.stem}-{index}{args.output.suffix}")
        result.composite(index).save(path)
        print(f"variation {index} (seed {result.seeds[index]}) -> {path}")


if __name__ == "__main__":
    main()
