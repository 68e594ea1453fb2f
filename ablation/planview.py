"""What ``plan`` prints: every run on a short line, what the runs share once, and the cost and power of the
design with the assumptions behind them (device, precision, model, seed count, spread)."""
from __future__ import annotations

import json
import textwrap
from collections.abc import Iterable

from engine.config import diff_configs

from . import stats as st
from .preset import Preset
from .studies import STUDY_METHOD, Plan, Run, format_value, stale_reason
from .summaries import is_complete

WIDTH = 100
SEED_CHOICES = (2, 3, 5, 8, 10, 20)
# Keys that vary from run to run; the rest of a run's overrides are printed once per group of runs.
PER_RUN = ("seed", "output_dir", "model.freq", "model.init_checkpoint", "train.epochs")


def wrap(text: str, first: str = "#   ", rest: str = "#   ") -> list[str]:
    return textwrap.wrap(text, WIDTH, initial_indent=first, subsequent_indent=rest, break_long_words=False,
                         break_on_hyphens=False)


def status(run: Run) -> str:
    if run.meta.get("pending"):
        return "pending"
    if stale_reason(run):
        return "stale"
    return "complete" if is_complete(run.run_dir, run.epochs) else "todo"


def hours(plan: Plan, runs: Iterable[Run], throughput: float) -> float:
    """Training hours of the distinct runs (a run shared with another study, or listed twice, counts once)."""
    seen = {r.run_dir: r for r in runs}
    return sum(plan.gpu_hours(r, throughput) for r in seen.values())


def unit(preset: Preset) -> str:
    return "CPU" if preset.hardware == "cpu" else "GPU"


def throughput_lines(preset: Preset, given: float | None) -> tuple[float, list[str]]:
    """The img/s behind the estimate and the comment lines that say what it assumes."""
    speed = preset.throughput
    if given is not None:
        return given, [f"# throughput: {given:g} img/s per {unit(preset)}, given with --throughput"]
    kind = "measured" if speed.measured else "ASSUMED, not measured (measure yours, pass --throughput)"
    text = (f"{speed.img_per_s:g} training img/s on {speed.device}, {speed.precision}, {speed.model}: {kind}"
            + (f"; {speed.source}" if speed.source else ""))
    return speed.img_per_s, wrap(text, "# throughput: ")


def power_lines(preset: Preset, seeds: int, comparisons: int, family: str) -> list[str]:
    """Minimal detectable differences of the design: per comparison and at the strictest Holm level."""
    sd = preset.power.paired_sd
    kind = "measured" if preset.power.measured else "ASSUMED"
    one, strict = st.mdd(sd, seeds), st.mdd(sd, seeds, comparisons)
    lines = wrap(f"paired t over {seeds} seed(s), two-sided alpha {st.ALPHA:g}, {st.POWER:.0%} power, sd of a "
                 f"paired difference {sd:g} points ({kind})", "# power: ")
    if preset.power.source:
        lines += wrap(f"({preset.power.source})")
    if one is None:
        return lines + ["#   minimal detectable difference: none with 1 seed (no paired spread): use --seeds 2 or more"]
    lines += wrap(f"minimal detectable difference {one:.2f} points per comparison; {strict:.2f} at the strictest "
                  f"Holm level of {comparisons} comparisons ({family})")
    choices = ", ".join(f"{n}: {st.mdd(sd, n):.2f}" for n in SEED_CHOICES)
    return lines + wrap(f"by seed count (points per comparison): {choices}")


def comparisons_of(preset: Preset, study: str) -> tuple[int, str]:
    if study == "single_freq":
        return preset.grid_size ** 2 - 1, "each frequency vs (0,0)"
    return len(preset.study(study).ks), "one claim over its k values"


def freq_text(run: Run) -> str:
    freqs = run.meta.get("frequencies")
    if run.meta.get("pending"):
        return f"freq=pending({run.meta['method']}{run.meta['k']})"
    if freqs is None:
        return ""
    if len(freqs) <= 2:
        return "freq=" + " ".join(f"({u},{v})" for u, v in freqs)
    return f"freq={run.point}"


def run_line(plan: Plan, run: Run, throughput: float) -> str:
    lead = "# dependency: " if run.role == "base" and plan.study != "single_freq" else ""
    after = f"after {run.depends[0].split('/')[-1]}" if run.depends else ""
    shared = f"shared={run.meta['shared_with'].split('/')[-1]}" if run.meta.get("shared_with") else ""
    parts = [f"{lead}{run.name:<28}", f"epochs={run.epochs:<3}", f"{unit(plan.preset).lower()}_h="
             f"{plan.gpu_hours(run, throughput):<7.3g}", f"{status(run):<8}", freq_text(run), after, shared]
    return "  ".join(p for p in parts if p).rstrip()


def group_lines(plan: Plan, groups: dict[str, list[Run]], file_values) -> list[str]:
    """Each group of runs (same config and shared overrides): the overrides once, and what they change in
    the config file's own values."""
    lines = []
    for role, runs in groups.items():
        run = runs[0]
        shared = {k: v for k, v in run.overrides.items() if k not in PER_RUN}
        lines += [f"# {role} ({len(runs)} run(s)): {run.config}, with"]
        flat = {f"{k}.{sub}" if isinstance(v, dict) else k: (w if isinstance(v, dict) else v)
                for k, v in shared.items() for sub, w in (v.items() if isinstance(v, dict) else [(None, v)])}
        lines += wrap(" ".join(f"{k}={format_value(v)}" for k, v in flat.items()))
        base = file_values(run.config)
        if base is not None:
            own = {k: v for k, v in run.settings.items() if k != "env"}
            changed = [k for k in diff_configs(base, own) if k.split(".")[0] not in ("output_dir", "seed")
                       and k not in ("train.epochs", "model.freq", "model.init_checkpoint")]
            if "model.kwargs" in changed:  # name the keys inside the free-form mapping
                old_kw, new_kw = base["model"]["kwargs"], own["model"]["kwargs"]
                changed[changed.index("model.kwargs"):changed.index("model.kwargs") + 1] = [
                    f"model.kwargs.{k}" for k in sorted(set(old_kw) | set(new_kw)) if old_kw.get(k) != new_kw.get(k)]
            if changed:
                lines += wrap(f"changes to {run.config}: {', '.join(changed)}", "#   ")
    return lines


def shown(path) -> str:
    """A path relative to the repository when inside it (shorter lines), else as given."""
    from .preset import REPO
    try:
        return str(path.resolve().relative_to(REPO))
    except ValueError:
        return str(path)


def plan_lines(plan: Plan, given: float | None, file_values) -> list[str]:
    """The whole ``plan`` output of one study."""
    preset = plan.preset
    throughput, speed = throughput_lines(preset, given)
    lines = [f"# study {plan.study}, preset {preset.name} ({shown(plan.preset_path)}), {plan.seeds} seed(s)",
             f"# runs in {shown(plan.runs_root)}"] + speed
    if plan.freq_source:
        lines.append(f"# frequency source: {plan.freq_source}")
    if plan.pending:
        lines += wrap(f"frequencies pending: {plan.pending}. Listed below with the k they will have; `run` "
                      f"starts them once single_freq is complete", "# ")
    if plan.study == "single_freq":
        lines.append(f"# fine-tune schedule: {plan.finetune_schedule}" + schedule_note(plan))
    if plan.base_checkpoint:
        lines.append(f"# base checkpoint: {plan.base_checkpoint} (no base run)")
    groups: dict[str, list[Run]] = {}
    for run in plan.runs:
        groups.setdefault(run.role, []).append(run)
    lines += group_lines(plan, groups, file_values)
    lines += frequency_lists(plan)
    lines += degenerate_notes(plan)
    lines += [run_line(plan, run, throughput) for run in plan.runs]
    todo = [r for r in plan.runs if status(r) != "complete"]
    total, left = hours(plan, plan.runs, throughput), hours(plan, todo, throughput)
    epochs = sum(r.epochs for r in {r.run_dir: r for r in plan.runs}.values())
    u = unit(preset)
    lines += wrap(f"total: {len(plan.points)} table runs + {len(plan.runs) - len(plan.points)} base/control, "
                  f"{len(plan.runs) - len(todo)} complete; {epochs} epochs x {preset.train_images:,} images = "
                  f"{total:.4g} {u}-hours ({left:.4g} left) for {plan.seeds} seed(s); training only (evaluation "
                  f"and start-up not included)", "# ")
    m, family = comparisons_of(preset, plan.study)
    return lines + power_lines(preset, plan.seeds, m, family)


def schedule_note(plan: Plan) -> str:
    if plan.finetune_schedule != "paper-code":
        return ""
    from .studies import PAPER_CODE_LENGTH, PAPER_CODE_WARMUP, paper_code_schedule
    sched = paper_code_schedule(plan.preset)
    length, warm = sched["train.schedule_epochs"], sched["train.warmup_epochs"]
    return (f" (the authors' {PAPER_CODE_WARMUP} + {PAPER_CODE_LENGTH - PAPER_CODE_WARMUP} epochs scaled to the "
            f"base's {length}: {warm:g} + {length - warm:g}; the fine-tune runs the first "
            f"{plan.preset.studies.single_freq.epochs})")


def frequency_lists(plan: Plan) -> list[str]:
    if plan.study not in STUDY_METHOD or plan.pending:
        return []
    lines, seen = [], set()
    for run in plan.points:
        if run.point not in seen and len(run.meta["frequencies"]) > 2:
            seen.add(run.point)
            lines += wrap(f"{run.point}: " + " ".join(f"({u},{v})" for u, v in run.meta["frequencies"]))
    return (["# frequencies (u, v), in channel-group order:"] + lines) if lines else []


def degenerate_notes(plan: Plan) -> list[str]:
    notes = []
    cells = plan.preset.grid_size ** 2
    if plan.study in STUDY_METHOD and cells in plan.preset.study(plan.study).ks:
        notes += wrap(f"k={cells} is the whole {plan.preset.grid_size}x{plan.preset.grid_size} grid: Top-, Low- "
                      f"and Bot-{cells} hold the same frequencies in other orders (flagged, left out of the "
                      f"claims)", "# note: ")
    shared = [r for r in plan.runs if r.meta.get("shared_with")]
    if shared:
        notes += wrap(f"{len(shared)} run(s) are single_freq fine-tunes with the same trainer config (same "
                      f"start, recipe and seed): trained once, flagged in the tables", "# note: ")
    return notes


def preset_lines(plans: list[Plan], given: float | None) -> list[str]:
    """``plan`` without --study: the whole preset's cost by study, and its power, with their assumptions."""
    preset = plans[0].preset
    throughput, speed = throughput_lines(preset, given)
    u = unit(preset)
    lines = [f"# preset {preset.name} ({shown(plans[0].preset_path)}): all four studies, {plans[0].seeds} seed(s)",
             *wrap(f"{preset.description}; data: {preset.dataset}", "# ")] + speed
    lines.append(f"{'study':<12} {'table runs':>10} {'other':>6} {'epochs':>7} {u + '-hours':>10}  note")
    every: dict = {}
    for plan in plans:
        distinct = {r.run_dir: r for r in plan.runs if r.run_dir not in every}
        every.update(distinct)
        note = "frequencies pending (after single_freq)" if plan.pending else ""
        lines.append(f"{plan.study:<12} {len(plan.points):>10} {len(plan.runs) - len(plan.points):>6} "
                     f"{sum(r.epochs for r in distinct.values()):>7} "
                     f"{hours(plan, distinct.values(), throughput):>10.4g}  {note}".rstrip())
    total = hours(plans[0], every.values(), throughput)
    lines.append(f"{'total':<12} {'':>10} {'':>6} {sum(r.epochs for r in every.values()):>7} {total:>10.4g}  "
                 f"distinct runs (shared bases and runs count once)")
    lines += wrap(f"training only (evaluation and start-up not included); {plans[0].seeds} seed(s) multiply every "
                  f"run: one seed is {total / plans[0].seeds:.4g} {u}-hours", "# ")
    m, family = comparisons_of(preset, "single_freq")
    return lines + power_lines(preset, plans[0].seeds, m, family)


def config_file_values(config: str) -> dict | None:
    """A trainer config file's own resolved values (to say what a preset changes), or None if unreadable."""
    from engine.config import ConfigError, load_config

    from .preset import REPO
    try:
        return json.loads(json.dumps(load_config(REPO / config).to_dict()))
    except (ConfigError, OSError):
        return None
