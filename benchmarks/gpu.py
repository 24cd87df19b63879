"""GPU benchmark at the `paper` model size (42.9 M UNet, 32x32): the three pieces of work a GPU run is made of,
each in fp32 and in bf16 (autocast, TF32), side by side in one process.

    python -m benchmarks.gpu                       # needs CUDA: refuses to run without it
    python -m benchmarks.gpu --device cpu --preset tiny --repeats 1 --out /tmp/gpu.json   # a check of the script

- train step: one gd training step of the student on B data + B replay items (forward, loss, backward, Adam);
- replay: gd replay items/s of one sampler (teacher DDIM with the preset's teacher steps, then its eps targets);
- evaluation: DDIM samples/s at the evaluation's steps (eval.batch_size samples per call).

Writes benchmarks/results/gpu.json (rows: work, precision, seconds per call, items/s; the machine and device).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

from benchmarks.common import RESULTS, machine
from distcl.config import load_config
from distcl.devices import configure_numerics
from distcl.evaluation import generate_indexed
from distcl.models import build_scheduler, build_unet
from distcl.replay import Teacher, indexed_replay
from distcl.seeding import seeded_generator
from distcl.training import continual_terms, make_optimizer, optimise


def timed(work: Callable[[], object], device: torch.device, repeats: int) -> float:
    """Seconds per call of ``work`` after one warm-up call (the device synchronised around the timing)."""
    work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        work()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--preset", default="paper", help="the run preset whose model, batch and steps are timed")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--out", default=str(RESULTS / "gpu.json"))
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print(
            "benchmarks.gpu: no CUDA device here (this benchmark measures a GPU; --device cpu only checks the script)",
            file=sys.stderr,
        )
        return 2
    cfg = load_config(preset=args.preset)
    B = cfg.train.batch_size
    scheduler = build_scheduler(cfg.model)
    torch.manual_seed(cfg.seed)
    student, teacher_unet = build_unet(cfg.model).to(device), build_unet(cfg.model).to(device).eval()
    teacher_unet.requires_grad_(False)
    size = student.config.sample_size
    x0 = torch.rand(B, 1, size, size, device=device) * 2 - 1
    rows = []
    for precision in ("fp32", "bf16"):
        configure_numerics(precision, deterministic=False)
        teacher = Teacher(teacher_unet, scheduler, cfg.train.teacher_steps, precision=precision)
        replay = indexed_replay(teacher, "gd", B, cfg.seed, 1, 0).to(device)
        optimizer, _ = make_optimizer(student, cfg.train)
        work = {
            "train step": (
                B,
                lambda: optimise(
                    student,
                    optimizer,
                    lambda step: continual_terms(
                        student,
                        x0,
                        replay,
                        task=1,
                        train_cfg=cfg.train,
                        scheduler=scheduler,
                        generator=seeded_generator(0),
                        precision=precision,
                    ),
                    1,
                    grad_clip=cfg.train.grad_clip,
                    progress=False,
                ),
            ),
            "replay (one sampler)": (B, lambda: indexed_replay(teacher, "gd", B, cfg.seed, 1, 0)),
            "evaluation samples": (
                cfg.eval.batch_size,
                lambda: generate_indexed(
                    teacher_unet, scheduler, cfg.eval.steps, cfg.eval.eta, cfg.seed, 1, 0, cfg.eval.batch_size
                ),
            ),
        }
        for name, (items, fn) in work.items():
            if name == "evaluation samples" and precision == "bf16":
                continue  # evaluation samples are drawn in fp32 (comparable metrics across runs)
            seconds = timed(fn, device, args.repeats)
            rows.append(
                {
                    "work": name,
                    "precision": precision,
                    "items": items,
                    "s_per_call": seconds,
                    "items_per_s": items / seconds,
                }
            )
    configure_numerics("fp32", deterministic=False)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    result = {
        "machine": machine(),
        "device": device_name,
        "preset": args.preset,
        "batch_size": B,
        "teacher_steps": cfg.train.teacher_steps,
        "eval_steps": cfg.eval.steps,
        "rows": rows,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{args.preset} preset on {device_name}, batch {B}")
    print(f"{'work':<22} {'precision':<9} {'s/call':>9} {'items/s':>10}")
    for r in rows:
        print(f"{r['work']:<22} {r['precision']:<9} {r['s_per_call']:>9.4f} {r['items_per_s']:>10.1f}")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
