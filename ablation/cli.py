"""``python -m ablation plan|run|collect --preset PRESET [--study STUDY] [--seeds N] [--runs-dir DIR]``.

* ``plan``: print every run of a study (one short line each; what runs share, once, above them), its cost and
  its power, with the assumptions behind them; without ``--study``, the whole preset's cost by study and its
  power. Runs nothing, writes nothing, imports no torch.
* ``run``: execute the runs not yet complete: locally one after another (``--jobs N``: N at a time), or
  ``--slurm`` (submitit), or ``--emit-sbatch FILE`` (an sbatch array script). Idempotent and safe to run
  concurrently. Without ``--study``: the four studies in order (single_freq, lowk, topk, botk).
* ``collect``: tables and figures of a study (without ``--study``: every study and the paper's claims) into
  ``<runs dir>/tables/`` (``--output DIR``: into DIR; ``--publish``: into the committed ``results/<preset>/``).

Run directories live under ``runs/ablation/<preset>/`` unless ``--runs-dir`` says otherwise. Errors are one
line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
from pathlib import Path
from collections.abc import Sequence

from engine.runlock import LockError

from .errors import AblationError
from .preset import MAX_SEEDS, REPO, available_presets
from .studies import FINETUNE_SCHEDULES, FREQ_SOURCES, RUN_ORDER, STUDIES, Plan, build_plan, default_runs_root
from .summaries import is_complete

CLAIMS = "claims"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def _number(convert, minimum, strict: bool, what: str, maximum=None):
    """An argparse type: ``convert(text)`` that must be > ``minimum`` (``strict``) or >= it, and <= maximum."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if (not (value > minimum if strict else value >= minimum) or value == float("inf")  # nan fails too
                or (maximum is not None and value > maximum)):
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_seed_count = _number(int, 1, False, f"an integer from 1 to {MAX_SEEDS}", MAX_SEEDS)
_positive_int = _number(int, 1, False, "a positive integer")
_nonneg_int = _number(int, 0, False, "a non-negative integer")
_positive_float = _number(float, 0.0, True, "a positive number")


def _indices(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ablation", description="FcaNet frequency ablations (Fig. 4, Tables 1, 5, 6)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (("plan", "print the runs of a study, their cost and the design's power"),
                            ("run", "execute the incomplete runs of a study (or of all four)"),
                            ("collect", "write tables and figures from the runs' summaries")):
        p = sub.add_parser(name, help=help_text)
        studies = STUDIES + ((CLAIMS,) if name == "collect" else ())
        p.add_argument("--study", choices=studies, default=None,
                       help=f"one of {', '.join(studies)} (default: all"
                            + (", then the claims table)" if name == "collect" else ")"))
        p.add_argument("--preset", required=True,
                       help=f"one of {', '.join(available_presets())}, or the path of a preset .yaml file")
        p.add_argument("--seeds", type=_seed_count, default=None,
                       help=f"seeds 0..N-1, each a whole replicate with its own base (default: the preset's "
                            f"'seeds'; at most {MAX_SEEDS})")
        p.add_argument("--runs-dir", type=Path, default=None,
                       help="where the run directories live (default runs/ablation/<preset>/)")
        p.add_argument("--freq-source", choices=FREQ_SOURCES, default="auto",
                       help="Top-k/Bot-k frequency lists: 'measured' (our complete single_freq grid), "
                            "'published' (the authors' orders, 7x7 only) or 'auto' (measured when complete; "
                            "default)")
        p.add_argument("--base-checkpoint", default=None,
                       help="single_freq: fine-tune every seed from this plain-ResNet checkpoint instead of "
                            "training a base per seed")
        p.add_argument("--finetune-schedule", choices=FINETUNE_SCHEDULES, default="ours",
                       help="single_freq fine-tune lr schedule: 'ours' (warmup + cosine to 0 over the fine-tune; "
                            "default) or 'paper-code' (the authors' 5 warmup + 95 cosine epochs, scaled to the "
                            "base's length, of which the fine-tune runs the first ones); own run directories")
        if name == "plan":
            p.add_argument("--throughput", type=_positive_float, default=None,
                           help="training images/s per GPU (CPU presets: per process) for the cost estimate "
                                "(default: the preset's, an assumption unless it says measured)")
        if name == "collect":
            out = p.add_mutually_exclusive_group()
            out.add_argument("--output", type=Path, default=None,
                             help="write the tables into DIR/<study>/ (default: <runs dir>/tables/); runs are "
                                  "still read from the runs dir")
            out.add_argument("--publish", action="store_true",
                             help="write into results/<preset>/, the committed reference tables")
            p.add_argument("--allow-mixed-machines", action="store_true",
                           help="merge runs from different machines or torch builds into one table (flagged)")
        if name == "run":
            _run_options(p)
    return parser


def _run_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--gpus", type=_positive_int, default=1, help="GPUs per run (>1: torchrun)")
    p.add_argument("--trainer-cmd", default=None,
                   help="replace 'python train_imagenet.py' (also env FCANET_ABLATION_TRAINER)")
    p.add_argument("--limit", type=_nonneg_int, default=None, help="start at most N runs, then stop")
    p.add_argument("--index", type=_nonneg_int, default=None,
                   help="run only the plan's run number I (0-based; used by sbatch arrays)")
    p.add_argument("--quiet", action="store_true",
                   help="one line per run with its result; trainer output only to <run_dir>/train.log")
    p.add_argument("--jobs", type=_positive_int, default=1,
                   help="runs trained at the same time (N runner processes sharing the plan's locks; "
                        "CPU presets: up to the core count)")
    p.add_argument("--launcher", choices=("auto", "subprocess", "fork"), default="auto",
                   help="'subprocess': a fresh trainer process per run; 'fork': fork this process, which "
                        "imports the trainer once (CPU presets; saves the start-up per run); 'auto' "
                        "(default): the preset's choice, 'subprocess' with --trainer-cmd or --gpus > 1")
    p.add_argument("--slurm", action="store_true", help="submit each incomplete run as a Slurm job (submitit)")
    p.add_argument("--slurm-partition", default=None)
    p.add_argument("--slurm-account", default=None)
    p.add_argument("--slurm-time", type=_positive_int, default=24 * 60, help="minutes per job (default 1440)")
    p.add_argument("--slurm-cpus-per-gpu", type=_positive_int, default=10)
    p.add_argument("--slurm-mem-gb", type=_positive_int, default=None)
    p.add_argument("--slurm-cluster", default=None, help=argparse.SUPPRESS)  # submitit 'local'/'debug' tests
    p.add_argument("--emit-sbatch", type=Path, default=None,
                   help="write an sbatch array script for the study to this file instead of running")
    # --jobs N: the runner processes it starts get their rotation and the runs they may start
    p.add_argument("--runner-index", type=_nonneg_int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--only", type=_indices, default=None, help=argparse.SUPPRESS)


def preset_name(preset: str) -> str:
    """``mini`` -> ``mini``; ``path/to/my.yaml`` -> ``my`` (the default runs folder name)."""
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def runs_root(args) -> Path:
    return args.runs_dir if args.runs_dir is not None else default_runs_root(preset_name(args.preset))


def _plan(args, study: str | None = None) -> Plan:
    return build_plan(study or args.study, args.preset, seeds=args.seeds, runs_root=runs_root(args),
                      freq_source=args.freq_source, base_checkpoint=args.base_checkpoint,
                      finetune_schedule=args.finetune_schedule)


def cmd_plan(args) -> int:
    from .planview import config_file_values, plan_lines, preset_lines

    if args.study is None:
        if args.base_checkpoint or args.finetune_schedule != "ours":
            raise AblationError("--base-checkpoint and --finetune-schedule apply to --study single_freq")
        lines = preset_lines([_plan(args, s) for s in RUN_ORDER], args.throughput)
    else:
        lines = plan_lines(_plan(args), args.throughput, config_file_values)
    print("\n".join(lines))
    return 0


def cmd_run(args) -> int:
    if args.slurm and args.slurm_cluster is None and shutil.which("sbatch") is None:
        raise AblationError("--slurm: sbatch not found on PATH (no Slurm here); nothing was submitted or started. "
                            "Run locally without --slurm, or write a script with --emit-sbatch")
    if args.study is None:
        if args.slurm or args.emit_sbatch or args.index is not None or args.base_checkpoint \
                or args.finetune_schedule != "ours":
            raise AblationError("--slurm, --emit-sbatch, --index, --base-checkpoint and --finetune-schedule need "
                                "--study (a whole-preset run goes study by study, each after the one before)")
        rc = 0
        for study in RUN_ORDER:
            rc = max(rc, run_study(args, study))
            if rc:
                break
        return rc
    return run_study(args, args.study)


def run_study(args, study: str) -> int:
    from . import runner

    plan = _plan(args, study)
    if plan.pending:
        raise AblationError(f"{study}: frequencies pending: {plan.pending}")
    prefix = runner.trainer_command(args.trainer_cmd, args.gpus)
    custom = bool(args.trainer_cmd or os.environ.get(runner.TRAINER_ENV))
    if args.emit_sbatch is not None:
        return emit_sbatch(args, plan)
    if args.slurm:
        jobs = runner.submit_slurm(plan, prefix, args.gpus, args.slurm_partition, args.slurm_time,
                                   args.slurm_cpus_per_gpu, args.slurm_mem_gb, args.slurm_account,
                                   cluster=args.slurm_cluster, limit=args.limit, prepare=not custom)
        for name, job_id in jobs:
            print(f"submitted {name}: job {job_id}")
        print(f"# {len(jobs)} jobs submitted; logs in {plan.runs_root / 'slurm' / plan.study}")
        return 0
    if args.jobs > 1:
        if args.index is not None:
            raise AblationError("--jobs N shares the plan between N runners: not with --index")
        only = None
        if args.limit is not None:  # the first N incomplete runs, shared by the runners
            only = [i for i, r in enumerate(plan.runs) if not is_complete(r.run_dir, r.epochs)][:args.limit]
        rc = runner.run_parallel(child_argv(args.argv, study, only), args.jobs)
        done = sum(is_complete(r.run_dir, r.epochs) for r in plan.runs)
        print(f"[ablation] {plan.study}/{plan.preset.name}: {args.jobs} runners finished; "
              f"{done}/{len(plan.runs)} runs complete")
        return rc
    launcher = args.launcher
    if launcher == "auto":
        launcher = "subprocess" if custom or args.gpus > 1 else plan.preset.launcher
    elif launcher == "fork" and (args.trainer_cmd or args.gpus > 1):
        raise AblationError("--launcher fork runs the repository's trainer in one process: not with "
                            "--trainer-cmd or --gpus > 1")
    outcome = runner.run_local(plan, prefix, limit=args.limit, index=args.index, quiet=args.quiet,
                               launcher=launcher, prepare=not custom, only=args.only, rotate=args.runner_index)
    print(f"[ablation] {plan.study}/{plan.preset.name}: " + ", ".join(f"{k} {len(v)}" for k, v in outcome.items()))
    if outcome["failed"]:
        print(f"error: {len(outcome['failed'])} run(s) failed: {', '.join(outcome['failed'])}", file=sys.stderr)
        return 1
    return 0


def child_argv(argv: Sequence[str], study: str, only: list[int] | None) -> list[str]:
    """The arguments of a ``--jobs`` runner: this command's, for one study, without --jobs / --limit."""
    drop = {"--jobs", "--limit", "--study"}
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in drop:
            skip = True
            continue
        if any(arg.startswith(d + "=") for d in drop):
            continue
        out.append(arg)
    out += ["--study", study]
    if only is not None:
        out += ["--only", ",".join(map(str, only)) or ","]
    return out


def emit_sbatch(args, plan: Plan) -> int:
    from . import runner
    from .output import write_files

    cli_args = ["--study", plan.study, "--preset", args.preset, "--seeds", str(plan.seeds),
                "--runs-dir", str(plan.runs_root), "--freq-source", plan.freq_source or args.freq_source, "--quiet"]
    if args.base_checkpoint:
        cli_args += ["--base-checkpoint", args.base_checkpoint]
    if args.finetune_schedule != "ours":
        cli_args += ["--finetune-schedule", args.finetune_schedule]
    if args.trainer_cmd:
        cli_args += ["--trainer-cmd", args.trainer_cmd]
    text = runner.sbatch_script(plan, cli_args, args.gpus, args.slurm_partition, args.slurm_time,
                                args.slurm_cpus_per_gpu)
    write_files({args.emit_sbatch: text})
    # sbatch does not create the --output directory; a job whose log cannot be opened fails to launch.
    (plan.runs_root / "slurm" / plan.study).mkdir(parents=True, exist_ok=True)
    print(f"wrote {args.emit_sbatch} ({len(plan.runs)} array tasks; see its header for the sbatch commands)")
    return 0


def output_dir(args) -> Path:
    """Where collect writes: --output, --publish (results/<preset>/), or <runs dir>/tables/."""
    if args.output is not None:
        return args.output
    if args.publish:
        return REPO / "results" / preset_name(args.preset)
    return runs_root(args) / "tables"


def cmd_collect(args) -> int:
    from .collect import collect, collect_claims

    out = output_dir(args)
    studies = STUDIES if args.study is None else (() if args.study == CLAIMS else (args.study,))
    written = []
    for study in studies:
        written += collect(_plan(args, study), out, allow_mixed=args.allow_mixed_machines)
    if args.study in (None, CLAIMS):
        plans = {s: _plan(args, s) for s in ("topk", "lowk", "botk")}
        written += collect_claims(plans, out, allow_mixed=args.allow_mixed_machines)
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    args.argv = argv
    try:
        return {"plan": cmd_plan, "run": cmd_run, "collect": cmd_collect}[args.command](args)
    except (AblationError, LockError) as exc:  # LockError: a lock file could not be written (full disk, ...)
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
