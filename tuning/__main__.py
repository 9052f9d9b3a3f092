"""``python -m tuning``: tune the attention kernels' launch configs for this GPU and write the JSON files.

See ``tuning/README.md``. Arguments are parsed before torch or triton is imported, because ``--dry-run``
must set ``TRITON_INTERPRET=1`` before any kernel is defined.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m tuning",
        description="Search tile sizes, warps and pipeline stages of the prefill and decode kernels per shape "
                    "bucket on this GPU, check each winner against the float64 reference, and write "
                    "<out>/<family>__<gpu>.json (the files cascade_kernels.configs loads).")
    p.add_argument("--families", default="prefill,decode",
                   help="comma-separated kernel families to tune (default: prefill,decode)")
    p.add_argument("--space", choices=("default", "full"), default="default",
                   help="default: the common serving buckets, an estimated 8 minutes on an H200 with 16 CPU "
                        "cores (two runs with --resume at the default budget); full: every head dim 64/128/256 "
                        "x group 1/4/8 x page 1/16/256 x bf16/fp16 (several runs with --resume)")
    p.add_argument("--out", default=None,
                   help="folder for the config files (default: the package's cascade_kernels/configs; with "
                        "--dry-run a new temporary folder); progress and log go to <out>/tuning_state/")
    p.add_argument("--resume", action="store_true",
                   help="continue from <out>/tuning_state/progress__<gpu>.json, skipping finished buckets")
    p.add_argument("--time-budget", type=float, default=480.0, metavar="S",
                   help="stop starting new candidates after S seconds from launch and keep what is done "
                        "(default: 480)")
    p.add_argument("--dry-run", action="store_true",
                   help="run the whole loop on a tiny space on the CPU under the Triton interpreter, timing by "
                        "wall clock, writing to a temporary folder (or --out)")
    p.add_argument("--commit", default=None,
                   help="the repository commit to record in the files' meta (default: git rev-parse HEAD, "
                        "with +dirty for local changes; 'unknown' outside a git checkout)")
    p.add_argument("--list", action="store_true", help="print the buckets and candidate counts, then exit")
    p.add_argument("--jobs", type=int, default=None, metavar="N",
                   help="processes that compile the candidates in parallel before the timing starts (default: "
                        "the CPU cores but two, at most 14; 1: compile each candidate when it is first timed)")
    p.add_argument("--no-bar", action="store_true", help="a printed counter instead of the tqdm progress bar")
    args = p.parse_args(argv)
    families = tuple(f.strip() for f in args.families.split(",") if f.strip())
    bad = [f for f in families if f not in ("prefill", "decode")]
    if bad or not families:
        p.error(f"--families takes prefill and/or decode, got {args.families!r}")
    args.families = families
    if args.time_budget <= 0:
        p.error("--time-budget must be positive")
    if args.jobs is not None and args.jobs < 1:
        p.error("--jobs must be at least 1")
    return args


def main(argv=None) -> int:
    start = time.monotonic()  # the time budget counts from here, imports included
    args = parse_args(argv)
    if args.dry_run:
        os.environ["TRITON_INTERPRET"] = "1"  # before torch/triton define any kernel

    import torch

    from cascade_kernels import configs

    from . import measure, precompile, search, space

    space_name = "tiny" if args.dry_run else args.space
    tasks = space.tasks(space_name, args.families)
    cands = space.tiny_candidates if args.dry_run else space.candidates
    if args.list:
        for t in tasks:
            batches = "/".join(map(str, t.batches))
            print(f"{t.family:8s} {t.key:32s} batch {batches:>11s}  {len(cands(t)):3d} candidates")
        print(f"{len(tasks)} buckets, {len({(t.shape_class, c) for t in tasks for c in cands(t)})} distinct "
              f"(shape class, config) compilations at least")
        return 0

    if args.dry_run:
        device = torch.device("cpu")
        timer = measure.wall_timer
        healthy = lambda: True  # noqa: E731
        cleanup = lambda: None  # noqa: E731
    else:
        if not torch.cuda.is_available():
            print("python -m tuning: no CUDA device; use --dry-run to run the loop on the CPU", file=sys.stderr)
            return 2
        if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
            print("python -m tuning: TRITON_INTERPRET is set; unset it to tune compiled kernels", file=sys.stderr)
            return 2
        device = torch.device("cuda")
        timer = measure.gpu_timer

        def healthy() -> bool:
            try:
                torch.cuda.synchronize()
                return True
            except Exception:
                return False

        def cleanup() -> None:
            torch.cuda.empty_cache()

    jobs = args.jobs or precompile.default_jobs()
    # the interpreter compiles nothing: a dry run precompiles only when asked (it tests the workers)
    compile_ahead = jobs > 1 and (not args.dry_run or args.jobs is not None)

    out = args.out or (tempfile.mkdtemp(prefix="ck_tuning_dry_") if args.dry_run else str(configs.PACKAGE_DIR))
    gpu = configs.device_name(device)
    meta = search.environment(gpu)
    if args.commit:
        meta["commit"] = args.commit
    try:
        summary = search.run(
            tasks, out=out, device=device, candidates=cands, make_problem=measure.timed_problem, timer=timer,
            check=measure.check_config, deadline=start + args.time_budget, resume=args.resume, meta=meta,
            healthy=healthy, cleanup=cleanup, bar=not args.no_bar, refine=space.refinements,
            precompile=precompile.Precompiler(jobs, device.type) if compile_ahead else None)
    except ValueError as e:  # a progress file that cannot be resumed
        print(f"python -m tuning: {e}", file=sys.stderr)
        return 2
    except search.DeviceLost as e:
        print(f"python -m tuning: {e}; the files hold every bucket finished before it", file=sys.stderr)
        return 3
    print(f"{summary.tuned} buckets tuned, {summary.no_config} without a config, {summary.skipped} done before; "
          f"{time.monotonic() - start:.0f} s")
    for f in sorted(summary.files):
        print(f"wrote {f}")
    if summary.stopped_by_budget:
        print("stopped by --time-budget before every bucket was done: rerun with --resume to continue")
    return 0


if __name__ == "__main__":
    sys.exit(main())
