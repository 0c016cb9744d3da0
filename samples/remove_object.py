"""Remove an object: paint it white in a mask, get it filled from its surroundings.

    python samples/remove_object.py photo.png --mask object.png -o clean.png
    python samples/remove_object.py photo.png --mask object.png -o clean.png --local

Mode "remove" pre-fills the selection with the classic content-aware fill; a diffusion model,
when one is used, then refines it. Pixels outside the mask stay exactly as they were.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from _connect import add_server_arguments, connect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("image", type=Path)
    parser.add_argument("--mask", type=Path, required=True, help="white over the object to remove")
    parser.add_argument("-o", "--output", type=Path, required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--engine", default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--grow", type=int, default=None, help="grow the selection by this many pixels first")
    add_server_arguments(parser)
    args = parser.parse_args()

    with connect(args) as client:
        result = client.fill(
            args.image, args.mask, "", mode="remove", model=args.model, engine=args.engine,
            variations=1, seed=args.seed, grow_px=args.grow,
        )
    result.composite(0).save(args.output)
    print(f"removed {result.box} with {result.engine} in {result.seconds:.2f} s -> {args.output}")


if __name__ == "__main__":
    main()
