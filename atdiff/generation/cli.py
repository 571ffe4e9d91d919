"""``atdiff sample``: images from a pipeline folder into PNGs, a grid (PNG or JPEG) or an ADM npz.

Under ``accelerate launch`` every process samples its share of the images (``folder``); the files
are the same as one process writes. A grid or npz is assembled from a complete ``OUT.partial/``
folder, by the main process, once every image exists; a rerun of a killed command resumes it.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import check_device, process_state
from ..errors import UsageError, writing_to
from ..files import check_writable, remove_temp
from ..limits import check_disk, check_memory
from .drawing import labels_of
from .folder import OUTPUT_FIX, SampleRecord, image_bytes, process_device, sample_into_folder
from .loading import check_pipeline_dir, load_pipeline, sampling_for
from .outputs import check_existing_file, output_kind, write_grid, write_npz
from .settings import add_sampling_arguments, sampling_overrides


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pipeline_dir", metavar="PIPELINE_DIR", help="folder written by `atdiff train` (or save_pretrained)")
    parser.add_argument("--num-images", type=int, required=True, help="images to generate")
    parser.add_argument("--out", required=True, help="DIR (one PNG per image, 000000.png ...), FILE.png or FILE.jpg (a grid) "
                        "or FILE.npz (the ADM evaluator's layout: uint8 NHWC in arr_0, labels in arr_1)")
    parser.add_argument("--batch-size", type=int, default=64, help="images per model call and process (does not change the images)")
    add_sampling_arguments(parser)
    parser.add_argument("--class-labels", type=int, nargs="+", metavar="LABEL", help="labels cycled over the images; default: image index %% num_classes")
    parser.add_argument("--device", help="torch device; default: this process's (cuda if available; under accelerate launch, each process's own)")


def check_positive(args: argparse.Namespace) -> None:
    for flag in ("num_images", "batch_size"):
        if getattr(args, flag) < 1:
            raise UsageError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")


def run(args: argparse.Namespace) -> int:
    check_positive(args)
    if args.device is not None:
        check_device(args.device)
    pipeline_dir, out = Path(args.pipeline_dir), Path(args.out)
    check_pipeline_dir(pipeline_dir)
    kind = output_kind(out)
    sampling = sampling_for(pipeline_dir, sampling_overrides(args))
    # A grid or npz is made of exactly --num-images images; a folder can be filled further later.
    record = SampleRecord(str(pipeline_dir.resolve()), sampling, args.class_labels, None if kind == "dir" else args.num_images)
    state = process_state()
    if kind != "dir" and out.exists():
        check_existing_file(out, record.flat())
        if state.is_main_process:
            print(f"{out} already holds these {args.num_images} images; nothing to sample")
        return 0
    check_writable(out)
    folder = out if kind == "dir" else out.with_name(out.name + ".partial")

    pipe = load_pipeline(pipeline_dir, sampling.scheduler, process_device(args.device, state))
    if kind == "grid":  # assembled in memory: the images, then the grid
        check_memory(f"--out {out}: a grid of {args.num_images} images", 2 * args.num_images * image_bytes(pipe), "cpu",
                     "write them to a folder (--out DIR) or an npz")
    elif kind == "npz":  # streamed: the disk holds the PNGs and, for a moment, the npz beside them
        check_disk(f"--out {out}: {args.num_images} images", args.num_images * image_bytes(pipe), out.parent, "free space or write elsewhere")
    sampled, seconds = sample_into_folder(pipe, folder, record, args.num_images, args.batch_size)

    if not state.is_main_process:
        return 0
    if kind != "dir":
        with writing_to(out, OUTPUT_FIX):
            if kind == "grid":
                write_grid(folder, args.num_images, out, record.flat())
            else:
                labels = labels_of(range(args.num_images), args.class_labels, pipe.num_classes)
                write_npz(folder, args.num_images, labels, out, record.flat())
        remove_temp(folder)  # a link in its place is removed, never what it points to
    if sampled:
        processes = f" on {state.num_processes} processes" if state.num_processes > 1 else ""
        print(f"sampled {sampled} images in {seconds:.1f} s{processes}: {sampled / seconds:.2f} images/s -> {out}")
    else:
        print(f"all {args.num_images} images already in {out}; nothing to sample")
    return 0
