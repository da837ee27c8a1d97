"""Label a collection of images with a patched model: `fastdino segment MODEL SRC --out DIR`.

Three ways to run the same work, with the same outputs:
- one process (the default);
- torchrun: `torchrun --nproc-per-node N -m fastdino segment ...`; each rank takes its share of the
  images (torch's DistributedSampler, in order, without its padding) on its own GPU (gloo on CPU);
- Ray Data (`--ray`, `pip install fastdino[ray]`): paths -> decode + resize -> `map_batches` with
  an actor pool, one actor per GPU (or `--concurrency` on CPU), each building, patching and (with
  `--tune`, into the shared timing cache) tuning the model once; Ray fuses the decode into the
  actors' stage where it sees fit. Output paths must be on a filesystem every worker shares.

Outputs in DIR: per image, its class map as a PNG at the image's size (`masks/`, 8-bit, 16-bit above
256 classes) for a segmentation model, or its feature vector as .npy (`features/`) for a backbone;
`results/*.parquet`, one row per image (path, ok, error, height, width, output: the file written);
`summary.json` (counts and every failed image with its error). An image that cannot be read or
decoded is reported there and the others complete; a batch whose forward fails is reported
image by image in the same way.

The core of fastdino never imports this module; Ray is imported only with `--ray`.
"""

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from .deploy import MODEL_HELP, class_map, features, input_name, load_model, named_outputs

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
# ImageNet's, as DINOv3's preprocessing
MEAN, STD = np.array((0.485, 0.456, 0.406), np.float32), np.array((0.229, 0.224, 0.225), np.float32)
COLUMNS = ("path", "ok", "error", "height", "width", "output")


def list_images(src: str) -> list[str]:
    """The images under a directory (recursively, sorted), or the paths listed in a text file; as
    absolute paths (Ray's workers need not share the driver's working directory)."""
    root = Path(src)
    if root.is_dir():
        return sorted(str(p.absolute()) for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES
                      and p.is_file())
    if root.is_file():
        return [str(Path(line.strip()).absolute()) for line in root.read_text().splitlines() if line.strip()]
    raise FileNotFoundError(f"SRC {src!r} is neither a directory of images nor a file listing them")


def _pil():
    try:
        from PIL import Image
    except ImportError as e:
        raise ImportError("fastdino segment reads images with Pillow: pip install pillow "
                          "(or pip install 'fastdino[ray]')") from e
    return Image


def preprocess(batch: dict, resolution: int) -> dict:
    """Paths -> RGB, resized to resolution x resolution (bilinear), ImageNet-normalised, (3, R, R)
    float32. A row that cannot be read gets ok=False and its error; its pixels are zeros, never run."""
    image = _pil()
    n = len(batch["path"])
    out = {"path": np.asarray(batch["path"], dtype=object), "ok": np.zeros(n, bool),
           "error": np.full(n, "", dtype=object), "height": np.zeros(n, np.int64),
           "width": np.zeros(n, np.int64), "pixels": np.zeros((n, 3, resolution, resolution), np.float32)}
    for i, path in enumerate(out["path"]):
        try:
            with image.open(path) as im:
                rgb = im.convert("RGB")
                out["width"][i], out["height"][i] = rgb.size
                rgb = rgb.resize((resolution, resolution), image.BILINEAR)
            out["pixels"][i] = ((np.asarray(rgb, np.float32) / 255 - MEAN) / STD).transpose(2, 0, 1)
            out["ok"][i] = True
        except Exception as e:  # noqa: BLE001 - any unreadable image is reported, the others go on
            out["error"][i] = f"{type(e).__name__}: {e}"
    return out


def output_name(path: str) -> str:
    """A file name for an image's output, unique per source path."""
    return f"{Path(path).stem}-{hashlib.sha1(path.encode()).hexdigest()[:10]}"


class Segmenter:
    """The model, built, patched and (optionally) tuned once per process or Ray actor; called on
    preprocessed batches (columns of `preprocess`), it writes each image's output file and returns
    the result rows (COLUMNS)."""

    def __init__(self, model: str, out_dir: str, resolution: int = 512, device: Optional[str] = None,
                 dtype: str = "float32", backend: Optional[str] = None, precision: Optional[str] = None,
                 tune: bool = False, dinov3_repo: Optional[str] = None):
        from .patch import patch

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.dtype = getattr(torch, dtype)
        self.model = load_model(model, resolution, self.device, dinov3_repo).to(self.dtype)
        self.report = patch(self.model, backend=backend, precision=precision)
        self.arg, self.out_dir, self.tune = input_name(self.model), Path(out_dir), tune

    def _forward(self, pixels: np.ndarray) -> dict:
        x = torch.from_numpy(pixels).to(self.device, self.dtype)
        if self.tune:  # once, on the first batch: its shape is the one this job runs
            from .tuning import tune

            tune(self.model, {self.arg: x})
            self.tune = False
        with torch.inference_mode():
            return named_outputs(self.model(**{self.arg: x}))

    def __call__(self, batch: dict) -> dict:
        rows = {k: np.asarray(batch[k]).copy() for k in ("path", "ok", "error", "height", "width")}
        rows["error"] = rows["error"].astype(object)
        rows["output"] = np.full(len(rows["path"]), "", dtype=object)
        todo = np.flatnonzero(rows["ok"])
        if todo.size == 0:
            return rows
        try:
            outputs = self._forward(np.ascontiguousarray(np.asarray(batch["pixels"])[todo]))
            maps = class_map(outputs)
            if maps is not None:
                self._write_masks(maps, rows, todo)
            else:
                self._write_features(features(outputs), rows, todo)
        except Exception as e:  # noqa: BLE001 - a failed batch is reported per image, the job goes on
            rows["ok"][todo] = False
            rows["error"][todo] = f"{type(e).__name__}: {e}"
        return rows

    def _write_masks(self, maps, rows, todo):
        image = _pil()
        (self.out_dir / "masks").mkdir(parents=True, exist_ok=True)
        for m, i in zip(maps, todo):
            size = (int(rows["height"][i]), int(rows["width"][i]))
            full = torch.nn.functional.interpolate(m[None, None].float(), size=size, mode="nearest")[0, 0]
            full = full.to(torch.int64).cpu().numpy()
            name = f"masks/{output_name(rows['path'][i])}.png"
            pixels = full.astype(np.uint8) if full.max(initial=0) < 256 else full.astype(np.uint16)
            image.fromarray(pixels).save(self.out_dir / name)
            rows["output"][i] = name

    def _write_features(self, feats, rows, todo):
        (self.out_dir / "features").mkdir(parents=True, exist_ok=True)
        for f, i in zip(feats.cpu().numpy(), todo):
            name = f"features/{output_name(rows['path'][i])}.npy"
            np.save(self.out_dir / name, f)
            rows["output"][i] = name


def _write_parquet(rows: list[dict], path: Path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path.parent.mkdir(parents=True, exist_ok=True)
    table = {k: [v for r in rows for v in np.asarray(r[k]).tolist()] for k in COLUMNS}
    pq.write_table(pa.table(table), path)


def run_local(paths: list[str], out_dir: str, segmenter: Segmenter, resolution: int, batch_size: int,
              part: str = "part-0", show: bool = True) -> None:
    """Label `paths` in this process, batch by batch; results/<part>.parquet."""
    rows = []
    for start in range(0, len(paths), batch_size):
        rows.append(segmenter(preprocess({"path": paths[start:start + batch_size]}, resolution)))
        if show:
            print(f"\rfastdino segment: {min(start + batch_size, len(paths))}/{len(paths)} images",
                  end="", file=sys.stderr, flush=True)
    if show:
        print(file=sys.stderr)
    _write_parquet(rows, Path(out_dir) / "results" / f"{part}.parquet")


def run_ray(paths: list[str], out_dir: str, model_kwargs: dict, resolution: int, batch_size: int,
            concurrency: Optional[int] = None, address: Optional[str] = None) -> None:
    """Label `paths` with a Ray Data pipeline: decode + resize, the model in an actor pool (one
    actor per GPU; `concurrency` actors, default 1, on CPU), results written as Parquet by
    Ray. Connects to `address` (default: a running cluster, else a local one)."""
    import ray

    if not ray.is_initialized():
        ray.init(address=address)
    device = model_kwargs.get("device")
    gpus = int(ray.cluster_resources().get("GPU", 0))
    gpu = device == "cuda" or (device is None and gpus > 0)
    if gpu and gpus == 0:
        raise RuntimeError("fastdino segment --ray: --device cuda, but the Ray cluster has no GPU")
    actors = concurrency or (gpus if gpu else 1)
    ds = ray.data.from_items([{"path": p} for p in paths])
    ds = ds.map_batches(preprocess, fn_kwargs={"resolution": resolution}, batch_size=batch_size)
    ds = ds.map_batches(Segmenter, fn_constructor_kwargs=model_kwargs,
                        batch_size=batch_size, concurrency=actors, num_gpus=1 if gpu else 0)
    ds.write_parquet(str(Path(out_dir) / "results"))


def summarize(out_dir: str) -> dict:
    """Counts and the failed images, from results/*.parquet; written to summary.json."""
    import pyarrow.parquet as pq

    table = pq.read_table(Path(out_dir) / "results", columns=["path", "ok", "error"]).to_pylist()
    failed = [{"path": r["path"], "error": r["error"]} for r in table if not r["ok"]]
    summary = {"images": len(table), "ok": len(table) - len(failed), "failed": len(failed),
               "failures": sorted(failed, key=lambda r: r["path"])}
    (Path(out_dir) / "summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _ranks() -> tuple[int, int]:
    """(rank, world size) under torchrun, else (0, 1)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def add_segment_arguments(parser):
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("src", help="a directory of images (searched recursively) or a file listing paths")
    parser.add_argument("--out", required=True, help="output directory (masks/ or features/, results/, "
                                                     "summary.json)")
    parser.add_argument("--resolution", type=int, default=512, help="images are resized to this square side")
    parser.add_argument("--batch", type=int, default=8, help="images per forward")
    parser.add_argument("--device", choices=("cuda", "cpu"), default=None,
                        help="default: cuda where available (under torchrun: cuda:LOCAL_RANK), else cpu")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    parser.add_argument("--backend", default=None, help="pin a backend (fastdino.patch's backend=)")
    parser.add_argument("--precision", choices=("bf16",), default=None, help="fastdino.patch's precision=")
    parser.add_argument("--tune", action="store_true",
                        help="fastdino.tune each process's model on its first batch (into the timing cache)")
    parser.add_argument("--ray", action="store_true",
                        help="run as a Ray Data pipeline (pip install fastdino[ray])")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: running, else local)")
    parser.add_argument("--concurrency", type=int, default=None,
                        help="model actors (default: one per GPU of the cluster; 1 on CPU)")
    parser.add_argument("--dinov3-repo", default=None, help="a facebookresearch/dinov3 checkout, for the "
                                                            "official-* names")


def segment_main(args) -> int:
    paths = list_images(args.src)
    if not paths:
        print(f"fastdino segment: no images in {args.src}", file=sys.stderr)
        return 2
    kwargs = dict(model=args.model, out_dir=os.path.abspath(args.out), resolution=args.resolution,
                  device=args.device, dtype=args.dtype, backend=args.backend, precision=args.precision,
                  tune=args.tune, dinov3_repo=args.dinov3_repo)
    rank, world = _ranks()
    if args.ray:
        run_ray(paths, args.out, kwargs, args.resolution, args.batch, args.concurrency, args.address)
    elif world > 1:
        import torch.distributed as dist
        from torch.utils.data import DistributedSampler

        local = int(os.environ.get("LOCAL_RANK", 0))
        cuda = args.device != "cpu" and torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
            kwargs["device"] = f"cuda:{local}"
        dist.init_process_group("nccl" if cuda else "gloo")
        # in order, without the padding that evens out the ranks (it would label an image twice)
        sampler = DistributedSampler(paths, num_replicas=world, rank=rank, shuffle=False)
        mine = [paths[i] for pos, i in zip(range(rank, sampler.total_size, world), sampler)
                if pos < len(paths)]
        run_local(mine, args.out, Segmenter(**kwargs), args.resolution, args.batch, part=f"part-{rank}",
                  show=rank == 0)
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:
            return 0
    else:
        run_local(paths, args.out, Segmenter(**kwargs), args.resolution, args.batch)
    summary = summarize(args.out)
    print(f"fastdino segment: {summary['ok']} of {summary['images']} images labelled, "
          f"{summary['failed']} failed (outputs and results/ in {args.out}, summary.json)")
    for failure in summary["failures"]:
        print(f"  failed: {failure['path']}: {failure['error']}")
    return 0
