"""fieldkube-prepare: raw images -> tiled, split, bin-balanced, sharded Parquet dataset, in parallel.

Locally the shards run in a process pool; in a cluster the same command runs as a Kubernetes Indexed
Job, one shard per index (`--shard-index`, default `$JOB_COMPLETION_INDEX`), followed by one
`--finalize` that writes manifest.json. The item list is deterministic, so all indices share one plan.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from fieldkube.trainer.dataset_format import (
    COUNT_BINS,
    MANIFEST,
    MANIFEST_FORMAT,
    PIXELS,
    ROW_SCHEMA,
    count_bin,
    encode_mask,
    encode_tile,
    marker_file,
    shard_file,
    write_json_atomic,
)
from fieldkube.trainer.errors import DataError, TrainerError
from fieldkube.trainer.sources import (
    SourceItem,
    inria_items,
    load_item,
    mask_items,
    point_items,
    red_cross_items,
    synthetic_items,
)

log = logging.getLogger("fieldkube.prepare")


@dataclass(frozen=True)
class PrepareOptions:
    task: str  # counter | segmenter
    tile: int
    splits: tuple[tuple[str, float], ...]
    split_by: str  # image | tile
    shards: int
    seed: int
    dark_threshold: float
    fog_threshold: float
    pixels: str = "png"  # png | raw (uint8 tiles: no decode in the loader; dataset_format.PIXELS)


def parse_split(text: str) -> tuple[tuple[str, float], ...]:
    """'70/30' -> train/test; '60/20/20' -> train/val/test (fractions normalised); '0/100' -> test only."""
    try:
        parts = [float(p) for p in text.split("/")]
    except ValueError:
        raise DataError(f"--split {text!r}: expected numbers like 70/30 or 60/20/20") from None
    names = {2: ("train", "test"), 3: ("train", "val", "test")}.get(len(parts))
    if names is None or any(p < 0 for p in parts) or sum(parts) <= 0:
        raise DataError(
            f"--split {text!r}: expected 2 or 3 non-negative parts, not all zero (70/30, 60/20/20; "
            "0/100 for a held-out evaluation set)"
        )
    total = sum(parts)
    return tuple((name, p / total) for name, p in zip(names, parts, strict=True))


def _unit(seed: int, key: str) -> float:
    """A deterministic uniform number in [0, 1) from the seed and a key."""
    digest = hashlib.sha256(f"{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def assign_split(options: PrepareOptions, key: str) -> str:
    u = _unit(options.seed, key)
    edge = 0.0
    for name, fraction in options.splits:
        edge += fraction
        if u < edge:
            return name
    return options.splits[-1][0]


def _tile_rows(item: SourceItem, options: PrepareOptions) -> tuple[list[dict[str, Any]], int]:
    """All tile rows of one item, and 1 if the whole image was dropped as dark or foggy."""
    from fieldkube.vision.tiling import grid_shape, roi_to_multiple, tile_boxes

    loaded = load_item(item)
    image = loaded.image
    gray = image.astype(np.float32).mean(axis=2)
    if gray.mean() < options.dark_threshold or gray.std() < options.fog_threshold:
        return [], 1
    tile = options.tile
    if image.shape[0] < tile or image.shape[1] < tile:
        raise DataError(
            f"{item.image or item.key}: image {image.shape[0]}x{image.shape[1]} is smaller than tile {tile}"
        )
    points = loaded.points
    oy = ox = 0
    if options.task == "counter":
        roi = roi_to_multiple(image.shape[0], image.shape[1], tile)
        oy, ox = roi.y0, roi.x0
        image = image[roi.y0 : roi.y1, roi.x0 : roi.x1]
        if points is not None:
            points = points - np.array([ox, oy], dtype=np.float64)
    height, width = image.shape[:2]
    _, cols = grid_shape(height, width, tile)
    image_split = assign_split(options, item.key)
    rows = []
    for index, (y0, x0, y1, x1) in enumerate(tile_boxes(height, width, tile)):
        row, col = divmod(index, cols)
        tile_id = f"{item.key}_r{row:02d}_c{col:02d}"
        record: dict[str, Any] = {
            "id": tile_id,
            "source": item.image or f"synthetic:{item.key}",
            "split": image_split if options.split_by == "image" else assign_split(options, tile_id),
            "tile_row": row,
            "tile_col": col,
            "y0": y0 + oy,
            "x0": x0 + ox,
            "height": tile,
            "width": tile,
            "image": encode_tile(np.ascontiguousarray(image[y0:y1, x0:x1]), options.pixels),
            "tags": ",".join(item.tags),
            "points": None,
            "mask": None,
        }
        if options.task == "counter":
            assert points is not None
            inside = (points[:, 0] >= x0) & (points[:, 0] < x1) & (points[:, 1] >= y0) & (points[:, 1] < y1)
            local = points[inside] - np.array([x0, y0], dtype=np.float64)
            record["points"] = local.astype(np.float32).ravel().tolist()
            record["count"] = float(len(local))
            record["bin"] = count_bin(len(local))
        else:
            assert loaded.mask is not None
            mask_tile = loaded.mask[y0:y1, x0:x1]
            record["mask"] = encode_mask(np.ascontiguousarray(mask_tile), options.pixels)
            record["count"] = float(mask_tile.mean())
            record["bin"] = ""
        rows.append(record)
    return rows, 0


def _write_parquet_atomic(path: Path, rows: list[dict[str, Any]]) -> None:
    table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, row_group_size=256)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def plan_fingerprint(items: list[SourceItem], options: PrepareOptions) -> str:
    text = json.dumps([asdict(options), [asdict(i) for i in items]], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def prepare_shard(root: Path, items: list[SourceItem], options: PrepareOptions, shard: int) -> dict[str, Any]:
    """Process items shard, shard+shards, ...; write one Parquet file per split and a completion marker."""
    started = time.perf_counter()
    by_split: dict[str, list[dict[str, Any]]] = {name: [] for name, _ in options.splits}
    mine = items[shard :: options.shards]
    dropped = 0
    for item in mine:
        rows, was_dropped = _tile_rows(item, options)
        dropped += was_dropped
        for record in rows:
            by_split[record["split"]].append(record)
    for split, rows in by_split.items():
        _write_parquet_atomic(shard_file(root, split, shard), rows)
    marker = {
        "shard": shard,
        "fingerprint": plan_fingerprint(items, options),
        "images": len(mine),
        "dropped_images": dropped,
        "rows": {split: len(rows) for split, rows in by_split.items()},
        "seconds": round(time.perf_counter() - started, 3),
    }
    write_json_atomic(marker_file(root, shard), marker)
    return marker


def _balance(
    root: Path, options: PrepareOptions, files: list[str]
) -> tuple[dict[str, list[int]], dict[str, Any]]:
    """Seed-000 bin balancing of the train split: every non-empty bin cut to the smallest one (seeded)."""
    members: dict[str, list[tuple[str, int]]] = {label: [] for label, _, _ in COUNT_BINS}
    for name in files:
        bins = pq.read_table(root / name, columns=["bin"]).column("bin").to_pylist()
        for row, label in enumerate(bins):
            members[label].append((name, row))
    sizes = {label: len(rows) for label, rows in members.items()}
    non_empty = [n for n in sizes.values() if n > 0]
    keep = min(non_empty) if non_empty else 0
    rng = np.random.default_rng([options.seed, 104729])
    selection: dict[str, list[int]] = {name: [] for name in files}
    for rows in members.values():
        if not rows:
            continue
        for pick in sorted(rng.choice(len(rows), size=keep, replace=False).tolist()):
            name, row = rows[pick]
            selection[name].append(row)
    for kept in selection.values():
        kept.sort()
    return selection, {"bins_before": sizes, "per_bin_after": keep}


def finalize(root: Path, items: list[SourceItem], options: PrepareOptions, balance: bool) -> dict[str, Any]:
    """Check every shard's marker and write manifest.json (with the balanced train selection)."""
    fingerprint = plan_fingerprint(items, options)
    markers = []
    for shard in range(options.shards):
        path = marker_file(root, shard)
        if not path.is_file():
            raise DataError(f"{path}: shard {shard} has not finished (run it, then --finalize again)")
        marker = json.loads(path.read_text())
        if marker.get("fingerprint") != fingerprint:
            raise DataError(f"{path}: shard {shard} was prepared with different inputs or options")
        markers.append(marker)
    splits: dict[str, Any] = {}
    for name, fraction in options.splits:
        files = [str(shard_file(root, name, s).relative_to(root)) for s in range(options.shards)]
        rows = sum(m["rows"][name] for m in markers)
        splits[name] = {"fraction": round(fraction, 4), "files": files, "rows": rows}
    balancing: dict[str, Any] | None = None
    if balance and options.task == "counter":
        selection, balancing = _balance(root, options, splits["train"]["files"])
        splits["train"]["selection"] = selection
        splits["train"]["selected_rows"] = sum(len(v) for v in selection.values())
    manifest = {
        "format": MANIFEST_FORMAT,
        "task": options.task,
        "tile": options.tile,
        "pixels": options.pixels,
        "options": asdict(options),
        "fingerprint": fingerprint,
        "images": len(items),
        "dropped_images": sum(m["dropped_images"] for m in markers),
        "splits": splits,
        "balancing": balancing,
    }
    write_json_atomic(root / MANIFEST, manifest)
    return manifest


def run_parallel(root: Path, items: list[SourceItem], options: PrepareOptions, workers: int) -> None:
    started = time.perf_counter()
    done = 0
    if workers <= 1:
        results = (prepare_shard(root, items, options, s) for s in range(options.shards))
        for marker in results:
            done += 1
            _log_progress(done, options.shards, marker, started)
        return
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(prepare_shard, root, items, options, s) for s in range(options.shards)]
        for future in as_completed(futures):
            marker = future.result()
            done += 1
            _log_progress(done, options.shards, marker, started)


def _log_progress(done: int, total: int, marker: dict[str, Any], started: float) -> None:
    elapsed = time.perf_counter() - started
    rate = done / elapsed if elapsed > 0 else 0.0
    eta = (total - done) / rate if rate > 0 else 0.0
    rows = sum(marker["rows"].values())
    log.info(
        "shard %d done: %d images -> %d tiles (%d/%d shards, %.2f shards/s, ETA %.0fs)",
        marker["shard"],
        marker["images"],
        rows,
        done,
        total,
        rate,
        eta,
    )


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fieldkube-prepare",
        description="Prepare a tiled, split, sharded Parquet dataset for fieldkube-train.",
    )
    parser.add_argument("--out", required=True, help="output dataset directory")
    source = parser.add_argument_group("source (choose one)")
    source.add_argument(
        "--synthetic",
        choices=["field", "field-shifted", "aerial"],
        help="generate synthetic images (field-shifted: the domain-shift benchmark's other crop and light)",
    )
    source.add_argument("--num-images", type=int, default=20, help="synthetic: number of images")
    source.add_argument("--image-size", default="448x672", help="synthetic: HxW of each image")
    source.add_argument("--images", help="folder of images (with --points or --masks)")
    source.add_argument("--points", help="point annotations, CSV (image,x,y) or JSON")
    source.add_argument("--masks", help="folder of masks named like the images")
    source.add_argument("--red-cross", help="folder of images annotated with red crosses (seed 000)")
    source.add_argument("--inria", help="Inria Aerial Image Labeling root (images/, gt/)")
    parser.add_argument("--tile", type=int, help="tile size (default 224 counter, 128 segmenter)")
    parser.add_argument("--split", default=None, help="70/30 (train/test) or 60/20/20 (train/val/test)")
    parser.add_argument("--split-by", choices=["image", "tile"], default="image", help="split unit")
    parser.add_argument(
        "--balance",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="equalise seed-000 count bins in the train split (counter)",
    )
    parser.add_argument(
        "--pixels",
        choices=PIXELS,
        default="png",
        help="how tiles are stored: png (compact; the loader decodes each tile, about 1.3 ms of CPU for "
        "256 px) or raw (uint8, no decode; larger shards): raw when loader CPU limits a GPU",
    )
    parser.add_argument("--shards", type=int, default=None, help="number of shards (default: 2 x workers)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="local worker processes")
    parser.add_argument(
        "--shard-index",
        type=int,
        default=None,
        help="process only this shard (default $JOB_COMPLETION_INDEX in an Indexed Job)",
    )
    parser.add_argument(
        "--finalize", action="store_true", help="only write manifest.json from finished shards"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of synthetic data, splits and balancing")
    parser.add_argument(
        "--dark-threshold", type=float, default=15.0, help="drop images darker than this mean"
    )
    parser.add_argument(
        "--fog-threshold", type=float, default=4.0, help="drop images with less contrast (std)"
    )
    return parser


def _parse_size(text: str) -> tuple[int, int]:
    try:
        height, width = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise DataError(f"--image-size {text!r}: expected HxW, e.g. 448x672") from None
    if height <= 0 or width <= 0:
        raise DataError(f"--image-size {text!r}: sides must be positive")
    return height, width


def build_plan(args: argparse.Namespace) -> tuple[list[SourceItem], str]:
    """The deterministic item list and the task it serves, from the chosen source flags."""
    chosen = [n for n in ("synthetic", "points", "masks", "red_cross", "inria") if getattr(args, n)]
    if len(chosen) != 1:
        raise DataError(
            "choose exactly one source: --synthetic, --images with --points or --masks, --red-cross, --inria"
        )
    if args.synthetic:
        height, width = _parse_size(args.image_size)
        if args.num_images < 1:
            raise DataError(f"--num-images {args.num_images}: expected >= 1")
        task = "segmenter" if args.synthetic == "aerial" else "counter"
        tile = args.tile or (224 if task == "counter" else 128)
        return synthetic_items(args.synthetic, args.num_images, height, width, args.seed, tile), task
    if args.points or args.masks:
        if not args.images:
            raise DataError("--points/--masks need --images <folder>")
        if args.points:
            return point_items(Path(args.images), Path(args.points)), "counter"
        return mask_items(Path(args.images), Path(args.masks)), "segmenter"
    if args.red_cross:
        return red_cross_items(Path(args.red_cross)), "counter"
    return inria_items(Path(args.inria)), "segmenter"


def run(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    items, task = build_plan(args)
    tile = args.tile or (224 if task == "counter" else 128)
    if tile < 8:
        raise DataError(f"--tile {tile}: expected >= 8")
    workers = max(1, args.workers)
    shards = args.shards or min(len(items), 2 * workers)
    if shards < 1:
        raise DataError(f"--shards {shards}: expected >= 1")
    split = parse_split(args.split or ("70/30" if task == "counter" else "60/20/20"))
    options = PrepareOptions(
        task,
        tile,
        split,
        args.split_by,
        shards,
        args.seed,
        args.dark_threshold,
        args.fog_threshold,
        args.pixels,
    )
    root = Path(args.out)
    index = args.shard_index
    if index is None and "JOB_COMPLETION_INDEX" in os.environ and not args.finalize:
        index = int(os.environ["JOB_COMPLETION_INDEX"])
    if index is not None:
        if not 0 <= index < shards:
            raise DataError(f"shard index {index}: expected 0..{shards - 1} (--shards {shards})")
        marker = prepare_shard(root, items, options, index)
        log.info("shard %d written: %s", index, marker["rows"])
        return 0
    if not args.finalize:
        log.info(
            "preparing %d %s images into %d shards with %d workers -> %s",
            len(items),
            task,
            shards,
            workers,
            root,
        )
        run_parallel(root, items, options, workers)
    manifest = finalize(root, items, options, args.balance)
    summary = {name: split.get("selected_rows", split["rows"]) for name, split in manifest["splits"].items()}
    log.info(
        "wrote %s: tiles per split %s, dropped images %d",
        root / MANIFEST,
        summary,
        manifest["dropped_images"],
    )
    if manifest["balancing"]:
        log.info(
            "train bins before balancing %s, kept %d per bin",
            manifest["balancing"]["bins_before"],
            manifest["balancing"]["per_bin_after"],
        )
    return 0


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr)
    try:
        code = run(argv)
    except TrainerError as exc:
        print(f"fieldkube-prepare: error: {exc}", file=sys.stderr)
        code = 2
    sys.exit(code)


if __name__ == "__main__":
    main()
