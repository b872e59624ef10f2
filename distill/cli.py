"""`distill` — the command line, one verb per step of the workflow.

    distill run CONFIG [key=value ...] --output-dir RUN       all stages; recomputes what changed
        [--dry-run] [--rerun STAGE] [--stop-after STAGE]       (key=value overrides may stand anywhere)
    distill data|synth|capture|student|train|anneal CONFIG [key=value ...] --output-dir RUN [--rerun STAGE]
    distill capture CONFIG --output-dir RUN --workers N        capture as N data-parallel Ray tasks
    distill eval CONFIG --output-dir RUN                       gap report of a run
    distill eval MODEL_DIR... --teacher T --output-dir OUT     gap report of any HF folders
    distill publish [RUN_DIR [OUT_DIR]] [--output-dir RUN] [--push-to-hub REPO] [--verify-vllm]
    distill verify RUN                                         check every artifact, one verdict per stage
    distill average CKPT... --output OUT                       uniform average of checkpoints
    distill sizes [--teacher T]                                named student sizes with parameter counts
"""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from core.artifacts import ArtifactError
from core.config import EvalConfig, InputError, RunStopped, load_config
from distill import pipeline
from distill.averaging import average_checkpoints
from distill.heldout import default_heldout
from distill.pipeline import STAGE_NAMES
from distill.verify import verify_run
from evaluation.suite import eval_cli
from students.configs import print_sizes
from students.publish import publish
from teachers.ray_capture import capture_with_ray
from teachers.resolve import resolve_teacher

STAGE_VERBS = ("data", "synth", "capture", "student", "train", "anneal")


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", help="pipeline YAML, e.g. configs/quickstart.yaml")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4 data.seq_len=512")
    p.add_argument("--output-dir", "-o", required=True, type=Path, help="the run directory")
    p.add_argument("--rerun", action="append", default=[], metavar="STAGE",
                   help="recompute STAGE (and what depends on it) even if up to date; needed to discard a "
                        "finished synth, data or capture artifact whose settings changed")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="distill", description="Teacher → distilled, measured, published student.")
    verbs = parser.add_subparsers(dest="verb", required=True)

    p = verbs.add_parser("run", help="run every stage (resumes; skips complete stages)")
    _add_config_args(p)
    p.add_argument("--stop-after", choices=STAGE_NAMES, help="stop after this stage")
    p.add_argument("--dry-run", action="store_true", help="print what would run and why; change nothing")
    for verb in STAGE_VERBS:
        p = verbs.add_parser(verb, help=f"run the {verb} stage")
        _add_config_args(p)
        if verb == "capture":
            p.add_argument("--workers", type=int, metavar="N",
                           help="capture with N data-parallel Ray tasks (one teacher replica each; "
                                "RAY_ADDRESS joins a cluster, else a local one starts)")

    p = verbs.add_parser("eval", help="gap report: a run (CONFIG) or any HF model folders (--teacher)")
    p.add_argument("targets", nargs="+", help="CONFIG [overrides] of a run, or MODEL_DIR... with --teacher")
    p.set_defaults(overrides=[])
    p.add_argument("--teacher", help="teacher model (embedded alias, folder or hub id) when evaluating folders")
    p.add_argument("--tasks", help="comma-separated task names (default: the config's / all)")
    p.add_argument("--limit", type=int, default=None, help="items per task (0: all; default: the config's, or 20)")
    p.add_argument("--generation-backend", choices=("transformers", "vllm"), default="transformers",
                   help="engine for generative tasks when evaluating folders (a run's config says its own)")
    p.add_argument("--output-dir", "-o", required=True, type=Path)
    p.add_argument("--rerun", action="append", default=[], metavar="STAGE", help="recompute eval even if up to date")

    p = verbs.add_parser("publish", help="write the final student as a Hugging Face folder with a model card")
    p.add_argument("run_dir", nargs="?", type=Path)
    p.add_argument("out_dir", nargs="?", type=Path, help="default: RUN_DIR/publish")
    p.add_argument("--output-dir", "-o", type=Path, help="the run directory (same as RUN_DIR)")
    p.add_argument("--push-to-hub", metavar="REPO")
    p.add_argument("--verify-vllm", action="store_true", help="also reload the folder in vLLM and compare logits")

    p = verbs.add_parser("verify", help="check every artifact of a run; one verdict line per stage")
    p.add_argument("run_dir", type=Path)

    p = verbs.add_parser("average", help="uniform average of checkpoints into one model folder")
    p.add_argument("checkpoints", nargs="+", type=Path)
    p.add_argument("--output", "-o", "--output-dir", dest="output", required=True, type=Path)

    p = verbs.add_parser("sizes", help="list the named student sizes with parameter counts")
    p.add_argument("--teacher", default=None, help="teacher whose vocab and widths the students inherit")
    return parser


_OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[\w]+)+=")  # section.key=value (never a flag or a path)


def parse_args(argv: list[str]) -> argparse.Namespace:
    """Parse the command line; `section.key=value` overrides may stand anywhere in it (they are pulled out
    first and appended, in order, to the config's overrides)."""
    overrides = [a for a in argv if _OVERRIDE.match(a)]
    args = build_parser().parse_args([a for a in argv if not _OVERRIDE.match(a)])
    if overrides:
        if not hasattr(args, "overrides"):
            build_parser().error(f"distill {args.verb}: takes no key=value overrides, got {overrides[0]!r}")
        args.overrides = list(args.overrides) + overrides
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        return _dispatch(args)
    except (InputError, ArtifactError, FileNotFoundError) as err:
        # What the user can fix: one line. Anything else is a bug and keeps its traceback.
        print(f"distill {args.verb}: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        # Stopped on purpose, what was written is kept and the message says what to do: one line, own status.
        print(f"distill {args.verb}: stopped: {err}", file=sys.stderr)
        return 3


def _dispatch(args: argparse.Namespace) -> int:
    if args.verb == "run":
        cfg = load_config(args.config, args.overrides)
        pipeline.run_all(cfg, args.output_dir, stop_after=args.stop_after, rerun=set(args.rerun),
                         dry_run=args.dry_run)
        return 0
    if args.verb in STAGE_VERBS:
        cfg = load_config(args.config, args.overrides)
        runner = None
        if args.verb == "capture" and args.workers is not None:
            def runner(cfg, run_dir):
                return capture_with_ray(cfg, run_dir, args.workers)

        print(pipeline.run_stage(args.verb, cfg, args.output_dir, rerun=set(args.rerun), runner=runner))
        return 0
    if args.verb == "verify":
        return verify_run(args.run_dir)
    if args.verb == "eval":
        return _eval(args)
    if args.verb == "publish":
        run_dir = args.run_dir or args.output_dir
        if run_dir is None:
            raise InputError("publish: give RUN_DIR or --output-dir")
        print(publish(run_dir, args.out_dir, push_to_hub=args.push_to_hub, verify_vllm=args.verify_vllm))
        return 0
    if args.verb == "average":
        print(average_checkpoints(args.checkpoints, args.output))
        return 0
    if args.verb == "sizes":
        print_sizes(args.teacher)
        return 0
    raise AssertionError(args.verb)


def _eval(args: argparse.Namespace) -> int:
    first = Path(args.targets[0])
    tasks = args.tasks.split(",") if args.tasks else None
    if first.suffix in (".yaml", ".yml"):
        overrides = args.targets[1:] + args.overrides
        if tasks:
            overrides.append(f"eval.tasks=[{','.join(tasks)}]")
        if args.limit is not None:
            overrides.append(f"eval.limit={args.limit}")
        cfg = load_config(first, overrides)
        print(pipeline.run_stage("eval", cfg, args.output_dir, rerun=set(args.rerun)))
        return 0
    if args.overrides:
        raise InputError(f"eval: overrides {args.overrides} apply to a run's CONFIG, not to model folders")
    if not args.teacher:
        raise InputError("eval: evaluating model folders needs --teacher (an embedded alias, folder or hub id)")

    tasks = tasks or EvalConfig().tasks
    # Plain folders have no run data: the built-in corpora's held-out split, in the teacher's tokenizer.
    heldout = default_heldout(resolve_teacher(args.teacher)) if "intrinsic" in tasks else None
    eval_cli(args.targets, args.teacher, tasks, 20 if args.limit is None else args.limit, args.output_dir,
             generation_backend=args.generation_backend, heldout=heldout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
