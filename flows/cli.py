"""The `addclass` console script: thin argument parsing over tasks/ and flows/ (imports are lazy)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Handler = Callable[[argparse.Namespace], int]


def _print_json(obj: Any) -> None:
    print(json.dumps(obj, indent=2, sort_keys=False, default=str))


# ---------------------------------------------------------------------------- ingest / inspect
def cmd_ingest(a: argparse.Namespace) -> int:
    from tasks import ingest

    progress = not a.quiet
    if a.layout == "mass13k":
        ingest.ingest_mass13k(a.src, a.store, overwrite=a.overwrite, progress=progress)
    elif a.layout == "camvid":
        ingest.ingest_camvid(a.src, a.store, val_fraction=a.val_fraction, overwrite=a.overwrite, progress=progress)
    else:
        ingest.ingest_synthetic(a.store, images=a.images, size=(a.size[0], a.size[1]), seed=a.seed,
                                overwrite=a.overwrite, progress=progress)
    print(f"created {a.store}")
    return 0


def cmd_inspect(a: argparse.Namespace) -> int:
    from tasks.inspect import format_summary, summarize_store, write_overlay_png

    if a.image:
        if not a.png:
            raise ValueError("--image needs --png OUT (where to write the overlay).")
        out = write_overlay_png(a.store, a.image, a.png, version=a.version)
        print(f"wrote {out}")
        return 0
    summary = summarize_store(a.store, max_images=a.max_images)
    if a.json:
        _print_json(summary)
    else:
        print(format_summary(summary))
    return 0


# ---------------------------------------------------------------------------- demo
def cmd_demo(a: argparse.Namespace) -> int:
    from tasks.ingest import ingest_synthetic
    from tasks.inspect import format_summary, summarize_store, write_overlay_png

    out = Path(a.out)
    store = out / "store.zarr"
    ingest_synthetic(store, images=a.images, size=(a.size[0], a.size[1]), seed=a.seed, overwrite=True,
                     progress=not a.quiet)
    print(format_summary(summarize_store(store)))
    from storage.store import open_label_store

    first = open_label_store(store).image_ids("train")[0]
    png = write_overlay_png(store, first, out / "overlay.png")
    print(f"\ndemo store: {store}\noverlay:    {png}")
    return 0


# ---------------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="addclass", description=__doc__.splitlines()[0] if __doc__ else None)
    sub = p.add_subparsers(dest="command", required=True)

    ing = sub.add_parser("ingest", help="create a label store from a dataset")
    ing_sub = ing.add_subparsers(dest="layout", required=True)
    for layout, helptext in (("mass13k", "MaSS13K layout: images/{split}/*.jpg, annotations/{split}/*.png"),
                             ("camvid", "CamVid layout: train/ trainannot/ test/ testannot/ (car hidden in others)")):
        sp = ing_sub.add_parser(layout, help=helptext)
        sp.add_argument("src")
        sp.add_argument("store")
        if layout == "camvid":
            sp.add_argument("--val-fraction", type=float, default=0.2, help="last part of train held out as val")
    syn = ing_sub.add_parser("synthetic", help="procedural demo scenes with exact car masks")
    syn.add_argument("store")
    syn.add_argument("--images", type=int, default=12)
    syn.add_argument("--size", type=int, nargs=2, default=(256, 384), metavar=("H", "W"))
    syn.add_argument("--seed", type=int, default=0)
    for sp in ing_sub.choices.values():
        sp.add_argument("--overwrite", action="store_true", help="replace an existing store")
        sp.add_argument("--quiet", action="store_true", help="no progress bar")
    ing.set_defaults(func=cmd_ingest)

    ins = sub.add_parser("inspect", help="summarize a label store")
    ins.add_argument("store")
    ins.add_argument("--json", action="store_true")
    ins.add_argument("--max-images", type=int, default=200, help="images read per split for pixel shares")
    ins.add_argument("--image", help="render this image id as an overlay (with --png)")
    ins.add_argument("--png", help="overlay output file")
    ins.add_argument("--version", default="latest")
    ins.set_defaults(func=cmd_inspect)

    demo = sub.add_parser("demo", help="the whole pipeline on synthetic data, no downloads")
    demo.add_argument("--out", default="demo-out")
    demo.add_argument("--images", type=int, default=12)
    demo.add_argument("--size", type=int, nargs=2, default=(256, 384), metavar=("H", "W"))
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--quiet", action="store_true")
    demo.set_defaults(func=cmd_demo)
    return p


USER_ERRORS: tuple[type[BaseException], ...] = (ValueError, KeyError, FileNotFoundError, FileExistsError,
                                               PermissionError, RuntimeError)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    func: Handler = args.func
    try:
        return func(args)
    except USER_ERRORS as e:  # clear one-line errors for bad input; tracebacks for bugs
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"addclass: error: {msg}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
