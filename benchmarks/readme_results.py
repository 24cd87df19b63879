"""Write README.md's "Results" section from the committed results files (never typed by hand).

python -m benchmarks.readme_results
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from benchmarks.class_shares import label
from benchmarks.common import REPO, RESULTS, machine_type, paired_test
from benchmarks.quality import table
from benchmarks.sweep_results import SAMPLE_SEED, SAMPLES, trial_tag
from distcl.config import PRESETS, Strategy
from distcl.rundir import REAL_DATA
from distcl.settings import choices
from distcl.sweep import load_sweep

README = REPO / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def section() -> str:
    parts = [START, "## Results", ""]
    quality = RESULTS / "quality.parquet"
    if quality.exists():
        df = pd.read_parquet(quality)
        presets = ", ".join(sorted(df.preset.unique()))
        parts += [
            f"Split Fashion-MNIST, preset `{presets}`, final task (all 10 classes): mean and standard error over "
            "the seeds done; FID on the evaluation CNN's features (not Inception: not comparable with the paper's "
            "numbers). From `benchmarks/results/quality.parquet` (`python -m benchmarks.quality`, "
            "`python -m benchmarks.sweep_results`). The sweeps' runs (tags with a `real data` row: real training "
            "images scored as samples, each metric's floor) label samples with a network trained at the model's "
            "16x16 (88.2 % there on the Intel machines, 88.4 % on the AMD one: each trains its own) and seed every "
            "evaluation sample by (seed, task, sample index). " + benchmark_gd_line() + older_runs(df),
            "",
            "To make them again: `distcl tune tuning/benchmark.yaml`, `distcl tune tuning/gd_lambda.yaml` and "
            "`distcl tune tuning/partial_uniform.yaml` (`--resume DIR` after any interruption), "
            "`python -m benchmarks.sweep_results DIR` for each sweep "
            "directory, then `python -m benchmarks.readme_results` (this section, its plots and "
            "`benchmarks/results/quality_by_task.md`). We ran each file in pieces, two at a time on the 2 cores: "
            "a piece is a copy of the file with fewer `params` values and the same `name` (a run's tag is the "
            "sweep's name and its params other than strategy and seed, so the pieces fold into the same rows). The "
            "older single-seed tags come from `python -m benchmarks.quality` (its docstring has their commands); the "
            "step-cost claim from `python -m benchmarks.step_cost`.",
            "",
            table(df),
            "",
            "`accuracy` and `forgetting` are the continual classifier's (`classifier.enabled`, replay images from "
            "the run's own generator; joint and finetune train the classifier the same way as the generator).",
            "",
            *machine_spread(df),
            *finding(df),
            *(claims(df, "benchmark", preset_gd_tag(df), step_cost()) if (df.tag == "benchmark").any() else []),
            *gd_settings(df),
            *class_share_finding(RESULTS / "class_shares.json"),
            *cause_finding(df, RESULTS / "class_shares.json"),
            *partial_finding(df),
            *sampler_finding(df),
            *figures(df),
            *by_task(df),
            "Machines: " + "; ".join(f"`{t}`: {' and '.join(m.unique())}" for t, m in df.groupby("tag").machine),
            "",
        ]
    fast = RESULTS / "fast_sampling.parquet"
    if fast.exists():
        df = pd.read_parquet(fast)
        wide = df.pivot_table(index=["method", "steps"], columns="metric", values="value").reset_index()
        train = df.groupby(["method", "steps"])[["iterations", "train_s"]].first().reset_index()
        wide = wide.merge(train, on=["method", "steps"])[
            ["method", "steps", "fid", "kld", "tv", "iterations", "train_s"]
        ]
        parts += [
            "Fast sampling (`python -m benchmarks.fast_sampling`, `benchmarks/results/fast_sampling.parquet`): the "
            f"teacher `{df.teacher.iloc[0]}` (the joint run's final model, all 10 classes) sampled by DDIM, by its "
            "progressive-distillation students (v, 16 -> 8 -> 4 -> 2 -> 1 steps, Fashion-MNIST images as x) and by "
            "its one-step PID student (data-free), all from the same x_T; FID and KLD against all 10 test classes. "
            "`iterations`: updates per PD stage (batch 64) or of the PID student (batch 32); `train_s`: distillation "
            "seconds per stage (PD) or in all (PID). "
            + (
                "Scored as the sweeps are (the network trained at 16x16); `real data`: real training images of "
                "all 10 classes scored as samples, the floor."
                if (df.method == REAL_DATA).any()
                else "Scored with the older evaluation (the 28x28 network, as the older single-seed runs above): "
                "comparable within this table, not with the sweeps' figures."
            ),
            "",
            wide.to_markdown(index=False, floatfmt=".3g"),
            "",
            *fast_finding(wide),
            "![FID against sampling steps](benchmarks/results/fast_sampling_fid.png)",
            "",
            f"Machine: {df.machine.iloc[-1]}",
            "",
        ]
    sweep = RESULTS / "sweep_quick.md"
    if sweep.exists():
        body = sweep.read_text().split("\n", 2)[2].strip()  # without its title
        parts += [
            "Sweep `tuning/quick.yaml` (`distcl tune`, Ray Train inside every trial; the smoke preset, 25 steps per "
            "task: it shows the machinery, its FIDs are those of barely trained models; run on 2026-11-22, scored "
            "by the older evaluation: the 28x28 network, no real-data row). From "
            "`benchmarks/results/sweep_quick.md` and `sweep_quick.parquet`:",
            "",
            body,
            "",
        ]
    throughput = RESULTS / "throughput.json"
    if throughput.exists():
        t = json.loads(throughput.read_text())
        need = t["samplers_needed"]
        parts += [
            "Throughput (`benchmarks/results/throughput.json`, `python -m benchmarks.throughput`), each a ratio "
            "measured side by side in one run:",
            "",
            "| figure | measured | goal |",
            "|---|---|---|",
            f"| p1: trainer step with gd replay from a sampler actor / finetune step on 2B items | "
            f"{t['p1_trainer_ratio']['actors']:.3f} | <= 1.05 |",
            f"| p1 (reference way): trainer step with gd replay made inline / finetune step | "
            f"{t['p1_trainer_ratio']['inline']:.3f} | - |",
            f"| p2: replay items/s, 2 sampler actors / 1 | {t['p2_sampler_scaling']['ratio']:.3f} | >= 1.8 |",
            f"| p3: wall time, Ray runtime / one process ({t['p3_ray_vs_inline']['run']}; before the thin driver, "
            "today's in the next table) | "
            f"{t['p3_ray_vs_inline']['ratio']:.3f} | <= 1.0 |",
            f"| object store put + get of one replay batch ({t['object_store_s']['batch_mb']:.2f} MB) | "
            f"{t['object_store_s']['put_get_median'] * 1000:.1f} ms | "
            f"next to a {t['step_s']['gd_actors'] * 1000:.0f} ms step |",
            "",
            f"Sampler actors one trainer needs for gd (teacher forward {need['teacher_forward_s'] * 1000:.0f} ms, "
            f"trainer step {need['trainer_step_s'] * 1000:.0f} ms, batch {t['batch_size']}, model `{t['model']}`): "
            f"{need['gd_2_steps']} with 2 teacher steps, {need['gd_10_steps']} with 10, "
            f"{need['gd_100_steps']} with 100.",
            "",
            f"Machine: {t['machine']}",
            "",
        ]
    thin = RESULTS / "thin_driver.json"
    if thin.exists():
        t = json.loads(thin.read_text())
        parts += [
            "Thin driver (`benchmarks/results/thin_driver.json`, `python -m benchmarks.thin_driver`), one run after "
            "the other, each Ray run on a new local cluster:",
            "",
            *thin_driver_table(t),
            "",
            thin_driver_note(t),
            "",
        ]
    parts.append(END)
    return "\n".join(parts)


def thin_driver_table(t: dict) -> list[str]:
    """The figures of benchmarks/results/thin_driver.json as a Markdown table, each with the machine and date it
    was measured on."""
    runs, ev, on = t["runs"], t["eval"], t.get("measured", {})

    def where(part: str) -> str:
        return on.get(part) or t.get("machine", "")

    threads = []
    if "threads" in t:
        th = t["threads"]
        walls = [th[f"worker_threads_{n}"]["wall_s"] for n in ("1", "2", "2_passive")]
        threads = [
            f"| Train worker torch threads ({th['run']}): wall time with 1 / 2 / 2 under OMP_WAIT_POLICY=PASSIVE | "
            + " / ".join(f"{w:.1f} s" for w in walls)
            + f" | - | {where('threads')} |"
        ]
    return [
        "| figure | measured | goal | machine |",
        "|---|---|---|---|",
        "| driver CPU seconds / the machine's busy CPU seconds: cpu preset gd (2 teacher steps) with the continual "
        "classifier, "
        f"2 tasks x 60 steps, simulated 3-node cluster (0-CPU head) | {t['driver_cpu_share']:.3f} "
        f"({runs['three_nodes']['driver_cpu_s']:.1f} s of {runs['three_nodes']['machine_cpu_s']:.1f} s) | <= 0.10 | "
        f"{where('nodes')} |",
        f"| smoke preset: wall time on Ray / inline | {t['smoke_ray_over_inline']:.2f} "
        f"({runs['smoke_ray']['wall_s']:.1f} s / {runs['smoke_inline']['wall_s']:.1f} s) | <= 1.3 | {where('smoke')} |",
        f"| p3, {t.get('p3_run', 'cpu preset, gd, 2 tasks x 60 steps')}: Ray / inline | "
        f"{t['p3_ray_over_inline']:.3f} ({runs['p3_ray']['wall_s']:.1f} s / {runs['p3_inline']['wall_s']:.1f} s) | "
        f"<= 1.0 | {where('p3')} |",
        *first_replay(runs["p3_ray"], where("p3")),
        f"| one evaluation at the `{ev['model']}` model size ({ev['samples']} samples x {ev['steps']} DDIM steps, "
        f"{ev['real_images']} test images, {ev['chunks']} chunks): 1 sampler actor / 2 | "
        f"{t['eval_scaling_2_over_1']:.2f} ({ev['one_sampler_s']:.1f} s / {ev['two_samplers_s']:.1f} s), FID "
        f"{ev['metrics_one']['fid']:.3f} and {ev['metrics_two']['fid']:.3f} | >= 1.8 | {where('eval')} |",
        *threads,
        *cores_rows(t, where("cores")),
    ]


def cores_rows(t: dict, machine: str) -> list[str]:
    """The rows of the ``cores`` part: a gd step as the Ray run's two processes take it and as the inline run does,
    and a first task's step on 1 and 2 threads (milliseconds)."""
    if "cores" not in t:
        return []
    c = t["cores"]

    def ms(key: str) -> str:
        return f"{1000 * c[key]:.0f}"

    turns = f"median step times, {c['rounds']} rounds of {c['window_s']:.0f} s windows taking turns"
    pipelined = max(c["beside_train_s"], c["beside_replay_s"])
    return [
        f"| one gd step ({c['run']}; {turns}): the Train worker's step on 1 thread alone / beside the sampler's "
        "replay on 1 thread; one replay batch alone / beside the step; the inline step (the replay batch, then the "
        f"step) in one process on 2 threads | {ms('train_alone_train_s')} / {ms('beside_train_s')} ms; "
        f"{ms('replay_alone_replay_s')} / {ms('beside_replay_s')} ms; {ms('inline_2_threads_inline_s')} ms: the two "
        f"processes take a step per {1000 * pipelined:.0f} ms, {pipelined / c['inline_2_threads_inline_s']:.2f} x "
        f"the inline step | - | {machine} |",
        f"| a first task's step (no replay; {turns}): 1 thread (the Train worker's) / 2 threads (the inline run's) | "
        f"{ms('first_task_1_thread_first_s')} / {ms('first_task_2_threads_first_s')} ms | - | {machine} |",
    ]


def cores_finding(t: dict) -> str:
    """What the ``cores`` rows say of p3 (nothing when they were not measured)."""
    if "cores" not in t:
        return ""
    c = t["cores"]
    pipelined = max(c["beside_train_s"], c["beside_replay_s"]) / c["inline_2_threads_inline_s"]
    first = c["first_task_1_thread_first_s"] / c["first_task_2_threads_first_s"]
    return (
        f"Taken apart (the last two rows), the two processes' gd step is {pipelined:.2f} x the inline run's step on 2 "
        f"threads, a first task's step on one thread {first:.2f} x the inline one: the layout gains at most that in "
        "the gd tasks (in the whole runs' train logs the two runs' gd step medians overlap) and loses in task 0, "
        "and with the start-up's 20 to 25 s the ratio stays near 1, within this "
        "machine's drift of it. "
    )


def first_replay(run: dict, machine: str) -> list[str]:
    """The row of the p3 Ray run's first replay waits (a run measured before they were recorded has none)."""
    if "first_replay_wait_s" not in run:
        return []
    waits = " / ".join(f"{w:.2f}" for w in run["first_replay_wait_s"])
    figure = "p3 on Ray: the first step of each task after the first, waiting for its replay batch"
    return [f"| {figure} | {waits} s | - | {machine} |"]


def spread(values: list[float]) -> str:
    return f"{min(values):.2f} to {max(values):.2f}"


def smoke_floor(t: dict) -> str:
    """The smoke Ray run's CPU seconds spread over all the machine's cores: the least wall time it could take."""
    ray_run, inline_run = t["runs"]["smoke_ray"], t["runs"]["smoke_inline"]
    cores = int(re.search(r"(\d+) cores", t["measured"]["smoke"]).group(1))
    floor = ray_run["machine_cpu_s"] / cores
    return (
        f"the Ray run kept the machine busy for {ray_run['machine_cpu_s']:.1f} CPU s (the inline run "
        f"{inline_run['machine_cpu_s']:.1f}), which on {cores} cores take at least {floor:.1f} s, "
        f"{floor / inline_run['wall_s']:.2f} x the inline run's wall time; the "
        f"{ray_run['machine_cpu_s'] - inline_run['machine_cpu_s']:.1f} CPU s more go to Ray's own processes (GCS, "
        "raylet, dashboard and its agents, the Train controller and its helpers) and to the Train worker and the "
        "sampler actor each importing torch, diffusers and distcl again"
    )


def thin_driver_note(t: dict) -> str:
    """Why the smoke and p3 goals are not met on 2 cores: the start-up chain (a profile), then the p3 run's CPU use
    (from thin_driver.json) and what was tried."""
    ray_run, inline_run = t["runs"]["p3_ray"], t["runs"]["p3_inline"]
    cores = int(re.search(r"(\d+) cores", t.get("measured", {}).get("p3") or t.get("machine", "")).group(1))

    def busy(run: dict) -> str:
        return f"{run['machine_cpu_s'] / (cores * run['wall_s']):.0%}"

    replay = ""
    if "first_replay_wait_s" in ray_run:
        replay = (
            f", {spread(ray_run['first_replay_wait_s'])} s in this measurement (the row above; the inline run makes "
            f"its replay inside the step: {spread(inline_run['first_replay_wait_s'])} s)"
        )
    return (
        "Smoke: not met; the Ray run spends about 20 to 25 s that the inline run does not (`ray_fixed_s`), and they "
        "are a chain, one step after another, with one of the 2 cores mostly idle along it (a per-process CPU "
        "profile of `distcl run --preset smoke`, 2026-12-03): `ray.init` about 8 s, 6 of them waiting for the raylet "
        "to register while its Python agents start; then Ray Train V2's controller starts its helper actors one after"
        " another (an autoscaling coordinator, a placement-group cleaner, a synchronization actor: a new Python "
        "process each), and the Train worker's process comes 8 to 10 s after the cluster is up; the worker then "
        "takes 8 s or more on one core to its first step: torch and Ray Train's torch backend, then distcl and "
        "diffusers (whose UNet module alone imports torch._dynamo and scipy.stats), then building the task. Ray "
        "Train has no setting that skips its helpers, and the 1.3 goal leaves 7 to 9 s for all of it: not reachable "
        f"with Ray Train on 2 cores. Nor would a perfect schedule reach it: {smoke_floor(t)}. "
        f"P3 (the whole cpu preset): {t['p3_ray_over_inline']:.3f} in this measurement; "
        "this machine's speed drifts by more than 10 % within an hour (the same measurement gave 1.049, 1.117 and "
        f"1.083 on 2026-12-03). The Ray run uses {ray_run['machine_cpu_s']:.0f} CPU s against the inline run's "
        f"{inline_run['machine_cpu_s']:.0f} but keeps the {cores} cores busy {busy(ray_run)} of its wall time (the "
        f"inline run {busy(inline_run)}): the Train worker's gd step (median about 290 ms on its one thread in the "
        "train logs of 2026-12-03, its replay arriving within 3 ms) has about twice the sampler's work by a count of"
        " forwards (the student's forward and backward, a backward taken as two forwards, on B data and B replay "
        "items against the teacher's 2 DDIM steps and target on B), so the sampler's core idles once its replay is "
        "ahead and the evaluation is done, and in task 0 (no teacher) the worker trains alone. "
        f"{cores_finding(t)}Tried by hand on "
        "2026-12-03 and not kept: the Train worker on 2 threads in task 0 only, 830 to 1000 items/s against 850 on "
        "1 (no clear gain), and again in one-task runs of the cpu preset (500 steps, 1 and 2 threads taking turns, "
        "two runs each): median step 146 and 143 ms against 161 and 165 ms, about 10 s of a whole run's 750 (not "
        "worth a Train worker borrowing the sampler's CPU); 2 threads throughout, slower (the `threads` row); "
        "two Train workers of half a CPU each "
        "beside the sampler (three one-thread processes on the 2 cores; 2 tasks x 150 steps, with a one-worker "
        "baseline run just before): 120.6 s against 104.3 s, 208.9 against 151.4 CPU s (the second worker's "
        "start-up, DDP's all-reduce, half batches); two Train workers of 1 CPU each, each making its own replay "
        "beside its student (the sampler actor only evaluating; the same replay batches; 2 tasks x 150 steps, "
        "one after the other with a one-worker run, 2026-12-03): 94.2 s against 89.3 s, 169.0 against 137.7 CPU s: "
        "two workers take a task-0 step in 0.107 s against one's 0.140 (1.31 x for twice the cores: half batches of "
        "a 0.3 M-parameter UNet, and DDP's all-reduce), and a gd step in 0.315 s, 0.097 s of it making the "
        "replay, against 0.277 s. Since commit d77262f the first replay batch of a task no longer "
        "waits for the evaluation of the task before (the evaluation runs on its own thread at a lower priority): "
        "8.2 to 9.1 s a task before it (train logs of a hand-run pair of whole Ray runs, its parent then d77262f: "
        f"782.6 s and 743.8 s, the same metrics){replay}."
    )


CLAIMS = [  # (the paper's claim, metric, better strategy, other strategy, lower is better)
    ("gd's final FID is far below gr's (gr loses its denoising ability)", "fid", "gd", "gr", True),
    ("gd's classifier accuracy is above gr's", "accuracy", "gd", "gr", False),
    ("gaussian distillation beats lwf-style distillation on FID", "fid", "gaussian", "lwf", True),
    ("gd beats finetune on FID", "fid", "gd", "finetune", True),
    ("gd beats finetune on KLD", "kld", "gd", "finetune", True),
]


VERDICT = {1: "holds", -1: "does not hold at this scale", 0: "within noise", None: "one seed: no verdict"}


def verdict(gaps: pd.Series) -> str:
    """VERDICT of per-seed gaps (positive: the claim's way); within noise says how many seeds went the claim's
    way."""
    found = paired_test(gaps)
    return f"within noise ({(gaps > 0).sum()} of {len(gaps)} seeds the paper's way)" if found == 0 else VERDICT[found]


def claims(df: pd.DataFrame, tag: str, tuned: str | None = None, cost: dict | None = None) -> list[str]:
    """The paper's claims, one row each, from the final task of the runs tagged ``tag``: means ± standard errors
    and a verdict from a paired t-test over the seeds both sides have (benchmarks.common.paired_test, 95 %):
    holds, does not hold at this scale, within noise, one seed, or not tested (a strategy missing); the step
    cost from ``cost`` (benchmarks/results/step_cost.json). With ``tuned`` (the tag of gd's
    runs at the ``cpu`` preset's setting) the claims about gd again, gd's runs taken from there."""
    last = df[df.task == df.task.max()]
    per = last.pivot_table(index=["tag", "strategy", "seed"], columns="metric", values="value")

    def seeds(strategy: str, metric: str, gd_tag: str) -> pd.Series:
        """The strategy's value of ``metric`` per seed (gd's from ``gd_tag``)."""
        key = (gd_tag if strategy == "gd" else tag, strategy)
        return per.loc[key, metric].dropna() if key in per.index.droplevel("seed") else pd.Series(dtype=float)

    def shown(name: str, values: pd.Series) -> str:
        return f"{name} {values.mean():.3f}{pm(values.sem(), '.3f')} ({len(values)})"

    def versus(metric: str, better: str, other: str, lower: bool, gd_tag: str) -> tuple[str, str]:
        a, b = seeds(better, metric, gd_tag), seeds(other, metric, gd_tag)
        if a.empty or b.empty:
            return "", "not tested"
        gaps = (b - a if lower else a - b).dropna()  # paired by seed
        return f"{shown(better, a)}, {shown(other, b)}", verdict(gaps)

    def near_joint(gd_tag: str) -> tuple[str, str]:
        """gd nearer joint than finetune on FID: d = (finetune - gd) - (gd - joint) > 0, paired by seed."""
        gd, joint, finetune = (seeds(s, "fid", gd_tag) for s in ("gd", "joint", "finetune"))
        if gd.empty or joint.empty or finetune.empty:
            return "", "not tested"
        d = (finetune + joint - 2 * gd).dropna()
        return (
            f"{shown('gd', gd)}, {shown('joint', joint)}, {shown('finetune', finetune)}: (finetune - gd) - "
            f"(gd - joint) = {d.mean():.1f}{pm(d.sem(), '.1f')}",
            verdict(d),
        )

    def step_cost() -> tuple[str, str]:
        """What making gd's replay costs over gr's, in teacher forwards of the batch, seed by seed on one machine
        (benchmarks/step_cost.py; the rest of the step is the same computation for both): holds when it is
        significantly between 0.5 and 1.5 forwards, does not hold when significantly outside (paired tests)."""
        if cost is None:
            return "not measured (`python -m benchmarks.step_cost`)", "not tested"
        rows = pd.DataFrame(cost["seeds"])
        forwards = (rows.gd_replay_s - rows.gr_replay_s) / rows.teacher_forward_s
        step_ms = (rows.gd_step_s - rows.gr_step_s) * 1000
        measured = (
            f"making the replay, gd - gr: {forwards.mean():.2f}{pm(forwards.sem(), '.2f')} teacher forwards of the "
            f"batch ({len(rows)} seeds; one forward {rows.teacher_forward_s.median() * 1000:.1f} ms); the whole "
            f"step, gd - gr: {step_ms.mean():.1f}{pm(step_ms.sem(), '.1f')} ms ({cost['run']}; "
            f"`benchmarks/results/step_cost.json`, {machine_type(cost['machine'])})"
        )
        above_half, above_one_and_half = paired_test(forwards - 0.5), paired_test(forwards - 1.5)
        if above_half is None:
            return measured, "one seed: no verdict"
        if above_half == 1 and above_one_and_half == -1:
            return measured, "holds"
        if above_half == -1 or above_one_and_half == 1:
            return measured, "does not hold at this scale"
        return measured, "within noise"

    rows = [(text, lambda g, c=claim: versus(*c, g), "gd" in claim[1:3]) for text, *claim in CLAIMS]
    rows.append(("gd comes close to joint training (nearer joint than finetune on FID)", near_joint, True))
    cells = [
        (text, " | ".join(fn(tag)), " | ".join(fn(tuned)) if about_gd and tuned is not None else "- | -")
        for text, fn, about_gd in rows
    ]
    cells.append(
        (
            "gd costs about one teacher forward per replay item more than gr (step time)",
            " | ".join(step_cost()),
            "- | - (gr ran with 2 teacher steps)",
        )
    )
    rule = (
        "A verdict is a two-sided paired t-test over the seeds (95 %, n - 1 degrees of freedom: with 3 seeds the "
        'mean difference must exceed 4.3 standard errors); "within noise" says 3 seeds cannot tell, not that the '
        "claim fails. The step cost holds when gd's extra replay cost is significantly between 0.5 and 1.5 "
        "teacher forwards of the batch."
    )
    if tuned is None:
        header = ["| claim (Masip et al.) | measured | verdict |", "|---|---|---|"]
        lines = [f"| {text} | {first} |" for text, first, _ in cells]
        intro = f"The paper's claims, runs tagged `{tag}` (final task, mean ± standard error (seeds)). {rule}"
    else:
        header = [
            "| claim (Masip et al.) | measured, gd as in the paper | verdict | measured, gd as the `cpu` preset | "
            "verdict |",
            "|---|---|---|---|---|",
        ]
        lines = [f"| {text} | {first} | {second} |" for text, first, second in cells]
        preset = PRESETS["cpu"]["train"]
        lam, steps = benchmark_gd()
        intro = (
            f"The paper's claims, runs tagged `{tag}` (final task, mean ± standard error (seeds)). Their gd has "
            f"the paper's lambda {lam:g} with {steps} teacher steps; the last two columns take gd's runs from "
            f"`{tuned}` instead (the `cpu` preset's gd since the sweep: lambda {preset['replay_lambda']:g} with "
            f"{preset['teacher_steps']} steps, the same seeds and evaluation; chosen as the best of the sweep on "
            f"these seeds, so its figures lean optimistic). {rule}"
        )
    return [intro, "", *header, *lines, ""]


def benchmark_gd_line() -> str:
    lam, steps = benchmark_gd()
    return (
        f"The `benchmark` tag's gd has the paper's lambda {lam:g} with {steps} teacher steps "
        "(`tuning/benchmark.yaml`); the `gd_lambda-...` tags are the lambda sweep's. "
    )


def benchmark_gd() -> tuple[float, int]:
    """(lambda, teacher steps) of gd in the ``benchmark`` sweep (tuning/benchmark.yaml)."""
    train = load_sweep(TUNING / "benchmark.yaml").trial_config({"train.strategy": "gd"}).train
    return train.replay_lambda, train.teacher_steps


TUNING = REPO / "tuning"
GD_TAG = re.compile(r"gd_lambda-replay_lambda=(?P<lam>[\d.]+)-teacher_steps=(?P<steps>\d+)")


def strategy_runs(df: pd.DataFrame) -> list[tuple[str, str, str]]:
    """(tag, strategy, name) of the figures: every strategy of the ``benchmark`` sweep, and gd at the ``cpu``
    preset's setting."""
    order = {s: i for i, s in enumerate(choices(Strategy))}
    bench = sorted(df[df.tag == "benchmark"].strategy.unique(), key=lambda s: order.get(s, len(order)))
    lam, steps = benchmark_gd()
    gd = f"gd (lambda {lam:g}, {steps} steps)"
    runs = [("benchmark", s, gd if s == "gd" else s) for s in bench if s != REAL_DATA]
    tuned = preset_gd_tag(df)
    if tuned is not None:
        preset = PRESETS["cpu"]["train"]
        runs.append((tuned, "gd", f"gd (lambda {preset['replay_lambda']:g}, {preset['teacher_steps']} steps)"))
    return runs


def figures(df: pd.DataFrame) -> list[str]:
    """quality_fid.png (FID against task, mean ± standard error over seeds) and quality_samples.png (the final
    sample grids of seed SAMPLE_SEED) of :func:`strategy_runs`, with their README lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = strategy_runs(df)
    if not runs:
        return []
    fid = df[df.metric == "fid"]
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for tag, strategy, name in runs:
        per = fid[(fid.tag == tag) & (fid.strategy == strategy)].groupby("task").value
        mean, se = per.mean(), per.sem().fillna(0)
        ax.plot(mean.index, mean, marker="o", label=f"{name} ({per.count().max()})")
        ax.fill_between(mean.index, mean - se, mean + se, alpha=0.15)
    floor = fid[(fid.tag == "benchmark") & (fid.strategy == REAL_DATA)].groupby("task").value.mean()
    ax.plot(floor.index, floor, "k--", label="real data (the floor)")
    ax.set(xlabel="task", ylabel="FID (evaluation CNN features)", xticks=sorted(fid.task.unique()))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title="strategy (seeds)", title_fontsize=8)
    fig.tight_layout()
    fig.savefig(RESULTS / "quality_fid.png", dpi=120)
    plt.close(fig)
    lines = [
        "FID after every task, mean ± standard error over the seeds (the `benchmark` sweep"
        + (", gd also at the `cpu` preset's setting" if preset_gd_tag(df) is not None else "")
        + "; the dashed line: real training images of the seen classes scored as samples):",
        "",
        "![FID against task](benchmarks/results/quality_fid.png)",
        "",
    ]
    grids = [(name, SAMPLES / f"{tag}-{strategy}.png") for tag, strategy, name in runs]
    found = [(name, grid) for name, grid in grids if grid.is_file()]
    if found:
        fig, axes = plt.subplots(1, len(found), figsize=(2.4 * len(found), 2.8), squeeze=False)
        for ax, (name, grid) in zip(axes[0], found):
            ax.imshow(plt.imread(grid), cmap="gray")
            ax.set_title(name, fontsize=8)
            ax.axis("off")
        fig.suptitle(f"samples after the last task, seed {SAMPLE_SEED}", fontsize=9)
        fig.tight_layout()
        fig.savefig(RESULTS / "quality_samples.png", dpi=120)
        plt.close(fig)
        missing = [name for name, grid in grids if not grid.is_file()]
        lines += [
            f"Samples of seed {SAMPLE_SEED} after the last task"
            + (
                f" (not shown: {', '.join(missing)}: no grid of theirs under `{SAMPLES.relative_to(REPO)}`)"
                if missing
                else ""
            )
            + ":",
            "",
            "![final samples](benchmarks/results/quality_samples.png)",
            "",
        ]
    return lines


def step_cost() -> dict | None:
    """benchmarks/results/step_cost.json (None before benchmarks.step_cost has run)."""
    path = RESULTS / "step_cost.json"
    return json.loads(path.read_text()) if path.exists() else None


BY_TASK = RESULTS / "quality_by_task.md"


def by_task(df: pd.DataFrame) -> list[str]:
    """BY_TASK: each metric after every task, mean ± standard error over seeds, of :func:`strategy_runs` and the
    real-data floor; the README line that links it."""
    runs = strategy_runs(df)
    if not runs:
        return []
    runs.append(("benchmark", REAL_DATA, REAL_DATA))
    tasks = sorted(df.task.unique())
    presets = ", ".join(sorted(df[df.tag == "benchmark"].preset.unique()))
    parts = [
        f"# Split Fashion-MNIST, preset `{presets}`: every metric after every task",
        "",
        "Mean ± standard error over seeds (the number of seeds in parentheses); written by "
        "`python -m benchmarks.readme_results` from `quality.parquet`.",
    ]
    for metric in ["fid", "kld", "tv", "accuracy", "forgetting"]:
        rows = []
        for tag, strategy, name in runs:
            per = df[(df.tag == tag) & (df.strategy == strategy) & (df.metric == metric)].groupby("task").value
            if per.count().sum() == 0:
                continue
            mean, se, n = per.mean(), per.sem(), per.count()
            cells = [f"{mean[k]:.3f}{pm(se[k], '.3f')} ({n[k]})" if k in mean else "" for k in tasks]
            rows.append(f"| {name} | " + " | ".join(cells) + " |")
        parts += [
            "",
            f"## {metric}",
            "",
            "| strategy | " + " | ".join(f"task {k}" for k in tasks) + " |",
            "|---" * (len(tasks) + 1) + "|",
            *rows,
        ]
    BY_TASK.write_text("\n".join(parts) + "\n")
    return [
        f"Every metric after every task, mean ± standard error: [`{BY_TASK.relative_to(REPO)}`]"
        f"({BY_TASK.relative_to(REPO)}).",
        "",
    ]


def machine_spread(df: pd.DataFrame) -> list[str]:
    """How far the machine types' metrics of one model recipe lie apart: task 0 trains the same model for every
    strategy of a seed, so its FID and KLD differ only by the machine (CPU float paths and the evaluation network,
    trained and cached on each machine); over the sweeps' runs (those with a real-data row)."""
    sweeps = set(df[df.strategy == REAL_DATA].tag) - {DATA_BUDGET_TAGS[1]}  # that one trains on other data
    first = df[(df.task == 0) & df.metric.isin(["fid", "kld"]) & (df.strategy != REAL_DATA) & df.tag.isin(sweeps)]
    first = first[~first.machine.str.contains(" then ")]  # a trial resumed on another machine type: neither
    first = first.assign(host=first.machine.map(machine_type))
    per = first.groupby(["seed", "metric", "host"]).value
    if ((per.max() - per.min()) / per.max().abs()).max() > 1e-4:
        return []  # one machine scored a seed's task 0 differently across runs: not the comparison described here
    spread = per.first().groupby(["seed", "metric"]).agg(lambda v: v.max() - v.min()).unstack("metric")
    hosts = first.groupby("seed").host.nunique()
    spread = spread[hosts > 1]
    if spread.empty:
        return []
    seeds = ", ".join(f"{fid:.2f} (seed {seed})" for seed, fid in spread.fid.items())
    return [
        "Machines: task 0 trains the same model for every strategy of a seed, and one machine type scores it the "
        f"same in every run (to 1e-4, relative); across the {first.host.nunique()} machine types the sweeps ran on, "
        "its FID differs by "
        f"{seeds} and its KLD by at most {spread.kld.max():.3f} (CPU float paths, and the evaluation network, "
        "which each machine trains and caches for itself): small next to the gaps between strategies, but runs of "
        "one table row are not all scored by the same network (their machines are listed below).",
        "",
    ]


def preset_gd_tag(df: pd.DataFrame) -> str | None:
    """The tag of the gd_lambda sweep's runs at the ``cpu`` preset's gd setting, if any are folded."""
    preset, sweep = PRESETS["cpu"]["train"], load_sweep(TUNING / "gd_lambda.yaml")
    setting = {"train.replay_lambda": float(preset["replay_lambda"]), "train.teacher_steps": preset["teacher_steps"]}
    tag = trial_tag(sweep.name, setting, list(sweep.params))
    return tag if (df.tag == tag).any() else None


def pm(se: float, fmt: str) -> str:
    """`` ± se``; nothing for one seed (no standard error)."""
    return "" if pd.isna(se) else f" ± {se:{fmt}}"


def gd_setting_table(df: pd.DataFrame) -> pd.DataFrame:
    """gd's final FID and KLD (mean, standard error, seeds) per lambda and teacher steps: the gd_lambda sweep's
    tags, and the ``benchmark`` sweep's gd at its setting; sorted by teacher steps, then lambda."""
    last = df[(df.strategy == "gd") & (df.task == df.task.max()) & df.metric.isin(["fid", "kld"])]
    rows = []
    for tag, runs in last.groupby("tag"):
        match = GD_TAG.fullmatch(tag)
        if match is None and tag != "benchmark":
            continue
        lam, steps = (float(match["lam"]), int(match["steps"])) if match else benchmark_gd()
        per = runs.pivot_table(index="seed", columns="metric", values="value")
        rows.append(
            {
                "lambda": lam,
                "teacher steps": steps,
                "seeds": len(per),
                **per.mean().to_dict(),
                "fid_se": per.fid.sem(),
                "kld_se": per.kld.sem(),
            }
        )
    return pd.DataFrame(rows).sort_values(["teacher steps", "lambda"]) if rows else pd.DataFrame()


def gd_settings(df: pd.DataFrame, seeds: int = 3) -> list[str]:
    """gd's lambda x teacher steps (sweep ``gd_lambda``; lambda 3 with 2 steps: the ``benchmark`` sweep's gd), the
    final task's FID and KLD, mean ± standard error; the settings with ``seeds`` seeds ranked by the sum of their
    ranks on mean FID and on mean KLD (ties: the lower FID)."""
    table = gd_setting_table(df)
    if table.empty:
        return []
    done = table[table.seeds >= seeds]
    rank = (done.fid.rank() + done.kld.rank()).rename("rank sum")
    table = table.join(rank)
    best = table.loc[rank.index].sort_values(["rank sum", "fid"]).iloc[0] if len(rank) else None
    lines = [
        f"| {r['lambda']:g} | {r['teacher steps']:.0f} | {r.seeds:.0f} | {r.fid:.1f}{pm(r.fid_se, '.1f')} | "
        f"{r.kld:.3f}{pm(r.kld_se, '.3f')} | {'' if pd.isna(r['rank sum']) else format(r['rank sum'], 'g')} |"
        for _, r in table.iterrows()
    ]
    floor = df[(df.strategy == REAL_DATA) & (df.task == df.task.max()) & df.tag.str.fullmatch(GD_TAG.pattern)]
    floor = floor[floor.metric.isin(["fid", "kld"])].pivot_table(
        index=["tag", "seed"], columns="metric", values="value"
    )
    if len(floor):  # the metrics' floor: the same real images for every setting of a seed
        per_seed = floor.groupby(level="seed").mean()
        lines.append(
            f"| real data | - | {len(per_seed)} | {per_seed.fid.mean():.1f}{pm(per_seed.fid.sem(), '.1f')} | "
            f"{per_seed.kld.mean():.3f}{pm(per_seed.kld.sem(), '.3f')} | |"
        )
    missing = table[table.seeds < seeds]
    verdict = (
        f"Best of the settings with {seeds} seeds by mean final FID and KLD together (the sum of the two ranks): "
        f"lambda {best['lambda']:g} with {best['teacher steps']:.0f} teacher steps"
        if best is not None
        else f"No setting has {seeds} seeds yet."
    )
    preset = PRESETS["cpu"]["train"]
    chosen = (preset["replay_lambda"], preset["teacher_steps"])
    if best is not None:
        tied = table[(table["rank sum"] == best["rank sum"]) & (table.fid > best.fid)]
        verdict += (
            " (tied on the rank sum with "
            + " and ".join(f"lambda {r['lambda']:g} / {r['teacher steps']:.0f} steps" for _, r in tied.iterrows())
            + ": the lowest mean FID breaks the tie)."
            if len(tied)
            else "."
        )
        same = chosen == (best["lambda"], best["teacher steps"])
        which = "this one" if same else "not this one"
        verdict += f" The `cpu` preset's gd: lambda {chosen[0]:g} with {chosen[1]} steps ({which})."
    sweep = load_sweep(TUNING / "gd_lambda.yaml").params
    grid = [(lam, steps) for lam in sweep["train.replay_lambda"] for steps in sweep["train.teacher_steps"]]
    unrun = [g for g in grid if not ((table["lambda"] == g[0]) & (table["teacher steps"] == g[1])).any()]
    if unrun:
        verdict += " Not run yet: " + ", ".join(f"lambda {lam:g} / {steps} steps" for lam, steps in unrun) + "."
    if len(missing):
        verdict += (
            " Not yet ranked (fewer seeds): "
            + ", ".join(
                f"lambda {r['lambda']:g} / {r['teacher steps']:.0f} steps ({r.seeds:.0f})"
                for _, r in missing.iterrows()
            )
            + "."
        )
    return [
        "gd's lambda and teacher DDIM steps (sweep `tuning/gd_lambda.yaml`; lambda 3 with 2 steps: the "
        "`benchmark` sweep's gd), final task, mean ± standard error over seeds:",
        "",
        "| lambda | teacher steps | seeds | final FID | final KLD | rank sum |",
        "|---|---|---|---|---|---|",
        *lines,
        "",
        verdict,
        "",
    ]


def older_runs(df: pd.DataFrame) -> str:
    """What sets the tags without a `real data` row apart (the first single-seed runs)."""
    older = sorted(set(df.tag) - set(df[df.strategy == "real data"].tag))
    if not older:
        return ""
    return (
        f"The older single-seed runs ({', '.join(f'`{t}`' for t in older)}) were evaluated before that: one "
        "generator per batch of 500 samples, labels from the 28x28 evaluation network (90.5 % at 28x28, 75.9 % on "
        "real test images taken through the 16x16 pipeline; perfect samples would score KLD 0.353): their values "
        "are not comparable with the sweeps'."
    )


def finding(df: pd.DataFrame) -> list[str]:
    """The lambda finding, its numbers read from the results (only when both gd variants are there)."""
    last = df[(df.task == df.task.max()) & (df.strategy.isin(["gd", "finetune"]))]
    fid = last[last.metric == "fid"].groupby(["tag", "strategy"]).value.mean()
    if ("lambda1", "gd") not in fid or ("default", "gd") not in fid:
        return []
    return [
        "In the first single-seed runs (tags `default` and `lambda1`, the older evaluation) gd with the paper's "
        f"lambda 3 ended with a worse FID than finetune "
        f"({fid['default', 'gd']:.1f} against {fid['default', 'finetune']:.1f}): with w = 0.8 at task 4 the replay "
        "term outweighs the new data 12 to 1; with lambda 1 gd reached FID "
        f"{fid['lambda1', 'gd']:.1f}, better than both. One seed each: the three-seed answer is in the `benchmark` "
        "rows, the claims table and the lambda table below. gr's samples collapse to noise, as the paper "
        "reports. Wall times include other work sharing the 2 cores during some runs.",
        "",
    ]


def cause_finding(df: pd.DataFrame, shares_path: Path) -> list[str]:
    """Why gd with the paper's lambda 3 seemed to lose the newest task (#14's question), candidate by candidate,
    its numbers from the results (only when the older evaluation's and the sweep's gd and finetune runs, and the
    class shares of the paper's and the preset's gd, are all there)."""
    last = df[(df.task == df.task.max()) & (df.metric == "kld")]
    per = last.groupby(["tag", "strategy"]).value
    mean, se, n = per.mean(), per.sem(), per.count()
    runs = [(tag, s) for tag in ("default", "benchmark") for s in ("gd", "finetune")]
    preset = PRESETS["cpu"]["train"]
    paper, tuned = benchmark_gd(), (preset["replay_lambda"], preset["teacher_steps"])
    shares = gd_share_means(json.loads(shares_path.read_text())["runs"]) if shares_path.exists() else None
    if any(r not in mean for r in runs) or shares is None or not {paper, tuned} <= set(shares.index):
        return []

    def kld(tag: str, strategy: str) -> str:
        return f"{mean[tag, strategy]:.3f}{pm(se[tag, strategy], '.3f')} ({n[tag, strategy]} seed(s))"

    table = gd_setting_table(df)
    best = table[table.seeds == table.seeds.max()].sort_values("fid").iloc[0]
    return [
        f"Why gd with the paper's lambda {paper[0]:g} seemed to lose the newest task, candidate by candidate. The "
        f"metric, in part: gd's final KLD was {kld('default', 'gd')} labelled by the 28x28 network (`default`) and "
        f"is {kld('benchmark', 'gd')} labelled by the network trained at 16x16 (`benchmark`), while finetune's "
        f"went from {kld('default', 'finetune')} to {kld('benchmark', 'finetune')}"
        f"{both_networks(json.loads(shares_path.read_text())['runs'])}. The replay weight, for what "
        f"remains: at lambda {paper[0]:g} ({paper[1]} steps) the first task's classes take "
        f"{shares.loc[paper, 'first']:.2f} of the final samples and the newest task's "
        f"{shares.loc[paper, 'newest']:.2f}; at lambda {tuned[0]:g} ({tuned[1]} steps) "
        f"{shares.loc[tuned, 'first']:.2f} and {shares.loc[tuned, 'newest']:.2f} (0.2 each in the test images), "
        f"and of the lambda table's settings with the most seeds lambda {best['lambda']:g} with "
        f"{best['teacher steps']:.0f} steps has the lowest mean final FID. {data_budget(df)} A fresh Adam per "
        "task: not tested (distcl starts a new Adam at every task, as the reference does: Avalanche 0.3.1, which it "
        "pins, resets the optimizer at each experience).",
        "",
    ]


DATA_BUDGET_TAGS = ("paper-gd-2000", "paper-gd-6000")  # benchmarks.quality runs: the paper's gd, 2,000 / 6,000 a class


def data_budget(df: pd.DataFrame) -> str:
    """The paper's gd with the ``cpu`` preset's 2,000 training images a class against all 6,000 (the same 500 steps
    a task), final FID and KLD per seed, from DATA_BUDGET_TAGS (one machine, side by side)."""
    last = df[(df.task == df.task.max()) & df.tag.isin(DATA_BUDGET_TAGS) & (df.strategy == "gd")]
    per = last[last.metric.isin(["fid", "kld"])].pivot_table(index=["seed", "tag"], columns="metric", values="value")
    seeds = [seed for seed in per.index.get_level_values("seed").unique() if len(per.loc[seed]) == 2]
    if not seeds:
        return "2,000 images per class (against all 6,000): not tested."
    few, all_ = DATA_BUDGET_TAGS
    pairs = ", ".join(
        f"seed {seed}: FID {per.loc[(seed, few), 'fid']:.1f} against {per.loc[(seed, all_), 'fid']:.1f}, KLD "
        f"{per.loc[(seed, few), 'kld']:.3f} against {per.loc[(seed, all_), 'kld']:.3f}"
        for seed in seeds
    )
    return (
        "2,000 images per class against all 6,000 (the paper's gd, 500 steps a task either way, tags "
        f"`{few}` and `{all_}`, run side by side on one machine): {pairs}"
        f"{' (one seed: no verdict)' if len(seeds) == 1 else ''}."
    )


def both_networks(runs: list[dict]) -> str:
    """The same final samples' KLD by the network trained at 16x16 and by the older 28x28 one, mean ± se per
    setting of the class-shares runs that have both (benchmarks.class_shares); empty when none has."""
    both = pd.DataFrame([{**r, "setting": label(r).rsplit(" seed ", 1)[0]} for r in runs if "kld_28" in r])
    if both.empty:
        return ""
    parts = [
        f"{setting} {g.kld.mean():.3f}{pm(g.kld.sem(), '.3f')} against {g.kld_28.mean():.3f}"
        f"{pm(g.kld_28.sem(), '.3f')} ({len(g)} seed(s))"
        for setting, g in both.groupby("setting", sort=False)
    ]
    return (
        "; and the same final samples scored both ways (`benchmarks.class_shares`), KLD by the 16x16 network "
        "against the 28x28 one: " + ", ".join(parts)
    )


def partial_finding(df: pd.DataFrame) -> list[str]:
    """Partial generation's two forms side by side: the ``benchmark`` sweep's (``train.partial_t: grid``) and the
    reference's (tag ``partial_uniform``), final FID and KLD with a paired verdict per metric (lower is better)."""
    last = df[(df.task == df.task.max()) & (df.strategy == "partial_generation") & df.metric.isin(["fid", "kld"])]
    per = last.pivot_table(index=["tag", "seed"], columns="metric", values="value")
    if not {"benchmark", "partial_uniform"} <= set(per.index.get_level_values("tag")):
        return []
    grid, uniform = per.loc["benchmark"], per.loc["partial_uniform"]

    def metric(name: str) -> str:
        gaps = (grid[name] - uniform[name]).dropna()  # positive: the reference's form is better
        found = {1: "the reference's form is better", -1: "the grid form is better", 0: "within noise"}
        return (
            f"{name.upper()} {uniform[name].mean():.3f}{pm(uniform[name].sem(), '.3f')} ({len(uniform)}) against "
            f"{grid[name].mean():.3f}{pm(grid[name].sem(), '.3f')} ({len(grid)}): "
            f"{found.get(paired_test(gaps), 'one seed: no verdict')}"
        )

    return [
        "Partial generation as in the reference (`train.partial_t: uniform`, tag `partial_uniform`) against "
        "distcl's grid form (`benchmark`), final task, paired by seed: "
        f"{metric('fid')}; {metric('kld')}.",
        "",
    ]


def class_share_finding(path: Path) -> list[str]:
    """Which tasks' classes the final generators draw (benchmarks/results/class_shares.json), one row a run."""
    if not path.exists():
        return []
    runs = json.loads(path.read_text())["runs"]
    tasks = max(len(r["shares"]) for r in runs)
    header = "| run | " + " | ".join(f"task {k}" for k in range(tasks)) + " | FID | KLD | KLD, 28x28 network |"
    rows = [
        f"| {label(r)} | "
        + " | ".join(f"{s['generated']:.3f} ({', '.join(s['classes'])})" for s in r["shares"])
        + f" | {r['fid']:.1f} | {r['kld']:.3f} | {format(r['kld_28'], '.3f') if 'kld_28' in r else '-'} |"
        for r in runs
    ]
    floors = {r["seed"]: r for r in runs if "test_labelled" in r["shares"][0]}  # one run of each seed is enough
    rows += [
        f"| test images, labelled by the network, seed {seed} ({machine_type(r['machine']).split(',')[0]}) | "
        + " | ".join(f"{s['test_labelled']:.3f} ({', '.join(s['classes'])})" for s in r["shares"])
        + " | - | - | - |"
        for seed, r in sorted(floors.items())
    ]
    return [
        "Which classes the final generators draw (`python -m benchmarks.class_shares`, "
        "`benchmarks/results/class_shares.json`): the share of each run's final evaluation samples that the "
        "evaluation network labels as each task's classes (the test images: 0.2 each; as the network labels them, "
        "through the same 16x16 pipeline: the `test images` rows, the floor); the same seeded samples "
        "as the run's metrics, whose FID and KLD it recomputes equal (the last column: the same samples' KLD by the "
        "older evaluation's network, trained at 28x28; `-`: not measured). gd with the paper's lambda 3 does not "
        "so much lose the newest task as over-keep the first: with the replay term weighted lambda w / (1 - w) = 3 k "
        "against the new data at task k, each new task gets a small share and the first task's classes keep "
        "about half of the samples; finetune draws the last task's classes and nearly nothing else.",
        "",
        *lambda_shares(runs),
        header,
        "|---|" + "---|" * (tasks + 3),
        *rows,
        "",
    ]


def gd_share_means(runs: list[dict]) -> pd.DataFrame:
    """gd's first and newest task's shares of the final samples, means over the seeds measured (``seeds``), per
    (lambda, teacher steps) of the class-shares runs."""
    gd = pd.DataFrame(
        [
            {
                "lambda": r["replay_lambda"],
                "steps": r["teacher_steps"],
                "first": r["shares"][0]["generated"],
                "newest": r["shares"][-1]["generated"],
            }
            for r in runs
            if r["strategy"] == "gd"
        ],
        columns=["lambda", "steps", "first", "newest"],
    )
    return gd.groupby(["lambda", "steps"]).agg(
        first=("first", "mean"), newest=("newest", "mean"), seeds=("first", "size")
    )


def lambda_shares(runs: list[dict]) -> list[str]:
    """gd's first and newest task's shares by lambda (means over the seeds there), or what is missing."""
    means = gd_share_means(runs)
    if means.index.get_level_values("lambda").nunique() < 2:
        return ["The lambda sweep (`tuning/gd_lambda.yaml`) measures what a smaller lambda gives: not run yet.", ""]
    parts = [
        f"lambda {lam:g} ({steps} steps): first task {m['first']:.3f}, newest {m['newest']:.3f} "
        f"({int(m['seeds'])} seed(s))"
        for (lam, steps), m in means.iterrows()
    ]
    return ["gd's final shares by lambda, means over the seeds done: " + "; ".join(parts) + ".", ""]


REPLAY_SAMPLERS = {  # tag -> what the sampler is (gd at the cpu preset's setting, seed 42, benchmarks.quality)
    "replay-progressive2": "a 2-step progressive student (2 + 1 forwards per replay item)",
    "replay-pid": "a one-step PID student (1 + 1 forwards per replay item)",
}


def sampler_finding(df: pd.DataFrame) -> list[str]:
    """The fast replay sampler rows (tags replay-*, scored as the sweeps are) against the ``cpu`` preset's gd with
    the teacher's own DDIM, seed 42; empty until both are folded."""
    last = df[(df.task == df.task.max()) & (df.strategy == "gd")]
    tuned = preset_gd_tag(df)
    replay = [tag for tag in REPLAY_SAMPLERS if tag in set(last.tag)]
    if not replay or tuned is None:
        return []
    seed = 42
    runs = last[last.seed == seed]
    wide = runs.pivot_table(index="tag", columns="metric", values="value")
    wall = (runs.groupby("tag").wall_s.first() / 60).to_dict()
    preset = PRESETS["cpu"]["train"]
    base = wide.loc[tuned]
    lines = [
        f"Fast replay samplers (`replay_sampler.method`) in the `cpu` preset's gd (lambda "
        f"{preset['replay_lambda']:g}), seed {seed}: x0_hat drawn by a student distilled data-free from each "
        f"teacher after its task, the targets still by the teacher. Against the teacher's own "
        f"{preset['teacher_steps']}-step DDIM ({preset['teacher_steps']} + 1 forwards per item; FID "
        f"{base.fid:.1f}, KLD {base.kld:.3f}, classifier accuracy {base.accuracy:.3f}, "
        f"{wall.get(tuned, float('nan')):.1f} min):",
        "",
    ]
    for tag in replay:
        r = wide.loc[tag]
        lines.append(
            f"- `{tag}`, {REPLAY_SAMPLERS[tag]}: FID {r.fid:.1f}, KLD {r.kld:.3f}, accuracy {r.accuracy:.3f}, "
            f"{wall.get(tag, float('nan')):.1f} min (distillation included)."
        )
    return lines + ["", "One seed each; wall times include other work sharing the 2 cores.", ""]


def fast_finding(wide: pd.DataFrame) -> list[str]:
    """What the fast-sampling table says, each comparison read from it."""
    fid = wide.set_index(["method", "steps"]).fid
    if ("pid", 1) not in fid or ("progressive", 1) not in fid:
        return []
    steps = [k for k in fid["progressive"].index if k in fid["ddim"].index]
    wins = [k for k in steps if fid["progressive", k] < fid["ddim", k]]
    beat = "at every step count" if len(wins) == len(steps) else f"at {len(wins)} of {len(steps)} step counts"

    def against(a: float, b: float) -> str:
        return "match" if abs(a - b) <= 0.1 * b else "beat" if a < b else "fall short of"

    pid, ddim1, ddim2, pd1 = fid["pid", 1], fid["ddim", 1], fid["ddim", 2], fid["progressive", 1]
    better = [name for name, v in (("two DDIM steps", ddim2), ("the one-step PD student", pd1)) if pid < v]
    worse = [name for name, v in (("two DDIM steps", ddim2), ("the one-step PD student", pd1)) if pid >= v]
    return [
        f"The progressive students beat the teacher's DDIM {beat}: one step {fid['progressive', 1]:.1f} against "
        f"{ddim1:.1f}, two steps {fid['progressive', 2]:.1f} against {ddim2:.1f}, and four PD steps "
        f"({fid['progressive', 4]:.1f}) {against(fid['progressive', 4], fid['ddim', 8])} eight DDIM steps "
        f"({fid['ddim', 8]:.1f}). The one-step PID student ({pid:.1f}) is "
        f"{'better' if pid < ddim1 else 'worse'} than one DDIM step"
        + (f", better than {' and '.join(better)}" if better else "")
        + (f", not as good as {' or '.join(worse)}" if worse else "")
        + ". Unlike PD here it sees no data, and it trains with L2 in place of LPIPS (whose weights cannot be had "
        "here) on a small budget. In its paper, PID with LPIPS (CIFAR-10 FID 3.92) beats one-step PD (9.12)"
        + ("; we have not reproduced that ordering at this scale." if pid >= pd1 else "; so it does here."),
        "",
    ]


def main() -> None:
    text = README.read_text()
    new = section()
    if START in text:
        text = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: new, text, flags=re.S)
    else:
        text = text.rstrip() + "\n\n" + new + "\n"
    README.write_text(text)
    print(new)


if __name__ == "__main__":
    main()
