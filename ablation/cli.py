"""``python -m ablation plan|run|collect --study STUDY --preset PRESET [--seeds N] [--output DIR]``.

* ``plan``: print every run (one per line: name, epochs, GPU-hours, config, overrides) and the estimated
  GPU-hours, saying whether the throughput behind them is measured or assumed; runs nothing. Lines starting
  with ``#`` are comments (header, dependencies, totals). Imports no torch, so it starts in well under a second.
* ``run``: execute the runs not yet complete: locally one after another (``--jobs N``: N at a time), or
  ``--slurm`` (submitit), or ``--emit-sbatch FILE`` (an sbatch array script). Idempotent and safe to run
  concurrently. ``--quiet``: one line per run with its result. A bad ``--base-checkpoint`` fails here, once.
* ``collect``: write ``<output>/<study>/table.md``, ``table.csv``, ``runs.csv`` and the PNG figures.

Run directories live under ``<output>/runs/`` when ``--output`` is given, else under ``runs/ablation/<preset>/``
(``--runs-dir`` overrides both). Errors are one line on stderr with exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .errors import AblationError
from .preset import MAX_SEEDS, REPO, available_presets
from .studies import FINETUNE_SCHEDULES, FREQ_SOURCES, STUDIES, Plan, build_plan, default_runs_root, stale_reason
from .summaries import is_complete

DEFAULT_THROUGHPUT_HELP = ("training images/s per GPU for the GPU-hours estimate (default: the preset's "
                           "'throughput', an assumption unless the preset says it was measured)")


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse's default prints usage too)
        sys.stderr.write(f"error: {message}\n")
        sys.exit(2)


def _number(convert, minimum, strict: bool, what: str):
    """An argparse type: ``convert(text)`` that must be > ``minimum`` (``strict``) or >= it."""
    def parse(text: str):
        try:
            value = convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        if not (value > minimum if strict else value >= minimum) or value == float("inf"):  # nan fails too
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 1, False, "a positive integer")


def _seed_count(text: str) -> int:
    value = _positive_int(text)
    if value > MAX_SEEDS:
        raise argparse.ArgumentTypeError(f"expected an integer from 1 to {MAX_SEEDS}, got {text!r}")
    return value
_nonneg_int = _number(int, 0, False, "a non-negative integer")
_positive_float = _number(float, 0.0, True, "a positive number")


def make_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="python -m ablation", description="FcaNet frequency ablations (Fig. 4, Tables 1, 5, 6)")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, help_text in (("plan", "print the runs of a study and their GPU-hours"),
                            ("run", "execute the incomplete runs of a study"),
                            ("collect", "write tables and figures from the runs' summaries")):
        p = sub.add_parser(name, help=help_text)
        p.add_argument("--study", required=True, help=f"one of {', '.join(STUDIES)}")
        p.add_argument("--preset", required=True,
                       help=f"one of {', '.join(available_presets())}, or the path of a preset .yaml file")
        p.add_argument("--seeds", type=_seed_count, default=None,
                       help="seeds per point: 0..N-1 (default: the preset's 'seeds')")
        p.add_argument("--output", type=Path, default=None,
                       help="results directory (default results/<preset>/); runs go to <output>/runs/")
        p.add_argument("--runs-dir", type=Path, default=None, help="run directories (overrides the default)")
        p.add_argument("--freq-source", choices=FREQ_SOURCES, default="auto",
                       help="Top-k/Bot-k frequency lists: 'measured' (our complete single_freq grid), "
                            "'published' (the authors' orders) or 'auto' (measured when complete; default)")
        p.add_argument("--base-checkpoint", default=None,
                       help="single_freq: fine-tune from this plain-ResNet checkpoint instead of training the base run")
        p.add_argument("--finetune-schedule", choices=FINETUNE_SCHEDULES, default="ours",
                       help="single_freq fine-tune lr schedule: 'ours' (warmup + cosine to 0 over the fine-tune's "
                            "epochs; default) or 'paper-code' (the authors' main.py length: 5 warmup + 95 cosine "
                            "epochs, of which the fine-tune runs the first ones); separate run directories")
        if name == "plan":
            p.add_argument("--throughput", type=_positive_float, default=None, help=DEFAULT_THROUGHPUT_HELP)
        if name == "run":
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
    return parser


def preset_name(preset: str) -> str:
    """``mini`` -> ``mini``; ``path/to/my.yaml`` -> ``my`` (the default results/runs folder name)."""
    return Path(preset).stem if preset.endswith((".yaml", ".yml")) else preset


def _plan(args) -> Plan:
    output = args.output
    runs_root = args.runs_dir if args.runs_dir is not None else default_runs_root(preset_name(args.preset), output)
    return build_plan(args.study, args.preset, seeds=args.seeds, runs_root=runs_root, freq_source=args.freq_source,
                      base_checkpoint=args.base_checkpoint, finetune_schedule=args.finetune_schedule)


def _output(args) -> Path:
    return args.output if args.output is not None else REPO / "results" / preset_name(args.preset)


def throughput_note(plan: Plan, given: Optional[float]) -> tuple[float, str]:
    """The img/s per GPU of the estimate, and where it comes from (an assumption unless measured or given)."""
    if given is not None:
        return given, "given with --throughput"
    speed = plan.preset.throughput
    if speed.measured:
        return speed.img_per_s, f"measured, see {plan.preset_path}"
    return speed.img_per_s, ("ASSUMED, not measured (the preset's 'throughput'); measure your GPU and "
                             "pass --throughput")


def cmd_plan(args) -> int:
    plan = _plan(args)
    throughput, source = throughput_note(plan, args.throughput)
    unit = "CPU process" if plan.preset.hardware == "cpu" else "GPU"
    print(f"# study {plan.study}, preset {plan.preset.name} ({plan.preset_path}), seeds {plan.seeds}, "
          f"runs in {plan.runs_root}")
    print(f"# throughput: {throughput:g} training img/s per {unit}: {source}")
    if plan.freq_source:
        print(f"# frequency source: {plan.freq_source}")
    if plan.study == "single_freq":
        print(f"# fine-tune schedule: {plan.finetune_schedule}")
    if plan.base_checkpoint:
        print(f"# base checkpoint: {plan.base_checkpoint} (no base run)")
    deps = sorted({d for r in plan.runs for d in r.depends})
    if deps:
        print(f"# the runs below depend on {', '.join(deps)} (trained first by `run`, listed as '# dependency:')")
    total_h, done, epochs = 0.0, 0, 0
    for run in plan.runs:
        hours = plan.gpu_hours(run, throughput)
        stale = stale_reason(run) is not None
        complete = is_complete(run.run_dir, run.epochs) and not stale
        done += complete
        total_h += hours
        epochs += run.epochs
        status = "stale" if stale else "complete" if complete else "todo"
        lead = "# dependency: " if run.point == "base" else ""  # not a point of the study's table
        print(f"{lead}{run.name}  epochs={run.epochs}  gpu_hours={hours:.3g}  status={status}  config={run.config}  "
              + "  ".join(run.override_args()))
    left = sum(plan.gpu_hours(r, throughput) for r in plan.runs if not is_complete(r.run_dir, r.epochs))
    npoints = sum(1 for r in plan.runs if r.point != "base")
    extra = f" + {len(plan.runs) - npoints} dependency" if len(plan.runs) > npoints else ""
    print(f"# total: {npoints} runs{extra} ({done} complete), {epochs} epochs x {plan.preset.train_images} "
          f"images, {total_h:.4g} {unit}-hours at {throughput:g} img/s/{unit} ({left:.4g} left; training only, "
          f"evaluation and start-up not included)")
    return 0


def cmd_run(args) -> int:
    from . import runner

    plan = _plan(args)
    prefix = runner.trainer_command(args.trainer_cmd, args.gpus)
    if args.emit_sbatch is not None:
        cli_args = ["--study", args.study, "--preset", args.preset, "--seeds", str(plan.seeds),
                    "--runs-dir", str(plan.runs_root), "--freq-source", plan.freq_source or args.freq_source,
                    "--quiet"]
        if args.base_checkpoint:
            cli_args += ["--base-checkpoint", args.base_checkpoint]
        if args.finetune_schedule != "ours":
            cli_args += ["--finetune-schedule", args.finetune_schedule]
        if args.trainer_cmd:
            cli_args += ["--trainer-cmd", args.trainer_cmd]
        text = runner.sbatch_script(plan, cli_args, args.gpus, args.slurm_partition, args.slurm_time,
                                    args.slurm_cpus_per_gpu)
        from .collect import write_atomic
        write_atomic(args.emit_sbatch, text)
        # sbatch does not create the --output directory; a job whose log cannot be opened fails to launch.
        (plan.runs_root / "slurm" / plan.study).mkdir(parents=True, exist_ok=True)
        print(f"wrote {args.emit_sbatch} ({len(plan.runs)} array tasks; see its header for the sbatch commands)")
        return 0
    if args.slurm:
        jobs = runner.submit_slurm(plan, prefix, args.gpus, args.slurm_partition, args.slurm_time,
                                   args.slurm_cpus_per_gpu, args.slurm_mem_gb, args.slurm_account,
                                   cluster=args.slurm_cluster, limit=args.limit,
                                   prepare=not (args.trainer_cmd or os.environ.get(runner.TRAINER_ENV)))
        for name, job_id in jobs:
            print(f"submitted {name}: job {job_id}")
        print(f"# {len(jobs)} jobs submitted; logs in {plan.runs_root / 'slurm' / plan.study}")
        return 0
    if args.jobs > 1:
        if args.index is not None or args.limit is not None:
            raise AblationError("--jobs N runs the whole plan: not with --index or --limit")
        rc = runner.run_parallel(args.argv, args.jobs)
        done = sum(is_complete(r.run_dir, r.epochs) for r in plan.runs)
        print(f"[ablation] {plan.study}/{plan.preset.name}: {args.jobs} runners finished; "
              f"{done}/{len(plan.runs)} runs complete")
        return rc
    launcher = args.launcher
    custom = bool(args.trainer_cmd or os.environ.get(runner.TRAINER_ENV))
    if launcher == "auto":
        launcher = "subprocess" if custom or args.gpus > 1 else plan.preset.launcher
    elif launcher == "fork" and (args.trainer_cmd or args.gpus > 1):
        raise AblationError("--launcher fork runs the repository's trainer in one process: not with "
                            "--trainer-cmd or --gpus > 1")
    outcome = runner.run_local(plan, prefix, limit=args.limit, index=args.index, quiet=args.quiet,
                               launcher=launcher, prepare=not custom)
    print(f"[ablation] {plan.study}/{plan.preset.name}: " + ", ".join(f"{k} {len(v)}" for k, v in outcome.items()))
    if outcome["failed"]:
        print(f"error: {len(outcome['failed'])} run(s) failed: {', '.join(outcome['failed'])}", file=sys.stderr)
        return 1
    return 0


def cmd_collect(args) -> int:
    from .collect import collect

    plan = _plan(args)
    written = collect(plan, _output(args))
    for path in written:
        print(f"wrote {path}")
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser().parse_args(argv)
    args.argv = [a for i, a in enumerate(argv) if not (a == "--jobs" or a.startswith("--jobs=")
                                                       or (i and argv[i - 1] == "--jobs"))]
    try:
        return {"plan": cmd_plan, "run": cmd_run, "collect": cmd_collect}[args.command](args)
    except AblationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
