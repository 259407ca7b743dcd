"""The subject-extraction entry point (tools/extract_subjects.py, `python -m hcustom_mc.extract_subjects`): flags parsed
(and --help answered) before torch loads, then hcustom_mc/data/subjects.py cuts the identity images. An entry point
like hcustom_mc/preprocess.py, whose input its output manifest is."""

from __future__ import annotations

import os

from hcustom_mc import console


def parse_args(argv=None):
    p = console.ArgumentParser(
        prog="tools/extract_subjects.py",
        description="Cut identity images for the subjects named in a manifest from a later part of each video than "
                    "the training clip (the paper: train on the first 5 s, crop from the following 15 s). A subject "
                    "with a box is cropped as given; one without is found by an open-vocabulary detector. Writes OUT/"
                    "manifest.jsonl (the input of tools/preprocess.py), the crops, the training clips and OUT/report."
                    "json, which names every subject not found and why. Run under torchrun or `python -m "
                    "hcustom_mc.launch` for many GPUs; rerunning the same command resumes.")
    io = p.add_argument_group("input and output")
    io.add_argument("--manifest", required=True,
                    help="input manifest.jsonl: subjects without an image are extracted; such a subject's `box` is in "
                         "video pixels, with an optional `frame` (the video's frame index) (required)")
    io.add_argument("--out", required=True, help="output folder (created; rerunning resumes) (required)")
    io.add_argument("--replace-images", action="store_true",
                    help="also extract the subjects that already have an image, ignoring it and its box "
                         "(switch; default: off)")
    seg = p.add_argument_group("segments (seconds; the crop segment must not overlap the training one)")
    seg.add_argument("--train-start", type=float, default=0.0, help="training clip start (default: 0)")
    seg.add_argument("--train-end", type=float, default=5.0,
                     help="training clip end; [start, end) becomes the sample's new video (default: 5)")
    seg.add_argument("--crop-start", type=float, default=5.0, help="crop segment start (default: 5)")
    seg.add_argument("--crop-end", type=float, default=20.0,
                     help="crop segment end, cut at the video's end (default: 20)")
    det = p.add_argument_group("finding and cutting subjects")
    det.add_argument("--margin", type=float, default=0.1,
                     help="the crop grows the box by this fraction of its width (height) on each side (default: 0.1)")
    det.add_argument("--detector", default=None,
                     help="local OWLv2 or Grounding DINO folder (transformers), for subjects without a box "
                          "(default: none; needed when such a subject exists)")
    det.add_argument("--box-threshold", type=float, default=None,
                     help="a detection counts when its score is above this (give a negative value as "
                          "--box-threshold=-1) (default: 0.2 for OWLv2, 0.35 for Grounding DINO)")
    det.add_argument("--detect-frames", type=int, default=8,
                     help="frames spread evenly over the crop segment that the detector looks at (default: 8)")
    det.add_argument("--segmenter", default=None,
                     help="local SAM folder (transformers SamModel): the crop's background outside the subject's mask "
                          "becomes white (default: none, the crop is kept as it is)")
    con = p.add_argument_group("console")
    con.add_argument("--no-progress", action="store_true", help="no progress bar (switch; default: off)")
    con.add_argument("--verbose", action="store_true",
                     help="show third-party warnings and every rank's log (switch; default: off)")
    return p.parse_args(argv)


def settings_from(args):
    from pathlib import Path

    from hcustom_mc.data.subjects import ExtractionSettings, Segments

    return ExtractionSettings(
        segments=Segments(args.train_start, args.train_end, args.crop_start, args.crop_end), margin=args.margin,
        detect_frames=args.detect_frames, detector=Path(args.detector) if args.detector else None,
        segmenter=Path(args.segmenter) if args.segmenter else None, box_threshold=args.box_threshold,
        replace_images=args.replace_images)


def main(argv=None) -> int:
    console.setup(console.verbose_requested(argv))  # before torch and transformers are imported
    args = parse_args(argv)
    import torch
    import torch.distributed as dist

    from hcustom_mc.data.subjects import check_inputs, extract_subjects
    from hcustom_mc.device import local_cuda_index, uses_cuda

    settings = settings_from(args)
    check_inputs(args.manifest, settings, args.out)  # every problem, before a process group or a model
    if uses_cuda():  # one GPU per rank
        torch.cuda.set_device(local_cuda_index())
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("gloo")  # only barriers: each rank extracts its own samples
    try:
        extract_subjects(args.manifest, args.out, settings, progress=not args.no_progress)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


# what tools/extract_subjects.py reports as the user's to fix (ConfigError is a ValueError), once for all ranks, exit 2
USER_ERRORS = (ValueError, FileNotFoundError)


if __name__ == "__main__":
    console.run_entry_point(main, lambda: USER_ERRORS)
