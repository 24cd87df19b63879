import math

import pytest
import torch

from distcl.config import ModelConfig, TrainConfig
from distcl.data import DataStream
from distcl.models import build_scheduler
from distcl.replay import InlineReplay, Teacher
from distcl.seeding import derive_seed
from distcl.training import NonFiniteLossError, make_optimizer, steps_per_task, train_task
from tests.conftest import tiny_unet

IMAGES = torch.rand(20, 1, 8, 8) * 2 - 1


def run(strategy, steps=4, seed=0, images=IMAGES, task=1, precision="fp32", **train):
    cfg = TrainConfig(strategy=strategy, batch_size=4, log_every=2, **train)
    student = tiny_unet(seed)
    scheduler = build_scheduler(ModelConfig())
    teacher = Teacher(tiny_unet(seed + 1).requires_grad_(False), scheduler, steps=2, precision=precision)
    replay = InlineReplay(teacher, strategy, 4, seed, task) if strategy in ("gr", "gd") else None
    optimizer, ema = make_optimizer(student, cfg)
    rows = train_task(
        student,
        optimizer,
        DataStream(images, 4, seed, task),
        replay,
        task=task,
        steps=steps,
        train_cfg=cfg,
        scheduler=scheduler,
        noise_seed=(seed, "noise", task),
        device=torch.device("cpu"),
        ema=ema,
        lwf_teacher=teacher if strategy == "lwf" else None,
        progress=False,
        precision=precision,
    )
    return student, rows


def params(model):
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_training_is_deterministic_and_logs():
    a, rows = run("gd")
    b, _ = run("gd")
    c, _ = run("gd", seed=1)
    assert torch.equal(params(a), params(b)) and not torch.equal(params(a), params(c))
    assert [r["step"] for r in rows] == [0, 2, 3]  # every log_every steps and the last
    for r in rows:
        assert r["task"] == 1 and r["loss_replay"] > 0 and 0 <= r["replay_wait_s"] < r["step_s"]
        w = 0.5  # task 1
        assert r["loss"] == pytest.approx((1 - w) * r["loss_data"] + w * r["loss_replay"], rel=1e-5)


@pytest.mark.parametrize("strategy", ["finetune", "gr", "lwf"])
def test_strategies_train(strategy):
    student, rows = run(strategy, steps=2)
    assert not torch.equal(params(student), params(tiny_unet(0)))
    assert (rows[0]["loss_replay"] > 0) == (strategy != "finetune")


@pytest.mark.parametrize("strategy", ["gd", "lwf"])  # the teacher's replay, its targets on the data
def test_bf16_autocast_trains_close_to_fp32(strategy):
    full, rows = run(strategy)
    half, rows_bf16 = run(strategy, precision="bf16")
    assert not torch.equal(params(full), params(half))  # the forward really ran in bfloat16
    assert all(p.dtype == torch.float32 for p in half.parameters())  # weights and Adam stay fp32
    for a, b in zip(rows, rows_bf16):
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05)


def test_ema_weights_are_copied_in():
    plain, _ = run("finetune", steps=3)
    ema, _ = run("finetune", steps=3, ema_decay=0.5)
    assert not torch.equal(params(plain), params(ema))


def test_non_finite_loss_names_task_and_its_first_step():
    images = IMAGES.clone()
    images[:] = float("nan")
    with pytest.raises(NonFiniteLossError, match="at task 2 step 0"):
        run("finetune", images=images, task=2)
    images = IMAGES.clone()
    images[DataStream(images, 4, 0, 1).indices(3)[0]] = float("nan")  # one item of step 3's batch
    with pytest.raises(NonFiniteLossError, match="at task 1 step 3$"):  # read at logged step 4, not at each step
        run("finetune", images=images, steps=5)


def test_data_stream_epochs_shards_and_purity():
    images = torch.arange(10.0).view(10, 1, 1, 1)
    stream = DataStream(images, 4, seed=0, task=1)
    epoch = torch.cat([stream.batch(s) for s in range(2)]).flatten()
    assert len(set(epoch.tolist())) == 8  # no repeats within an epoch; the short batch is dropped
    later = stream.batch(5)  # epoch 2, batch 1
    assert torch.equal(DataStream(images, 4, seed=0, task=1).batch(5), later)  # a pure function of the step
    assert not torch.equal(torch.cat([stream.batch(2), stream.batch(3)]), torch.cat([stream.batch(0), stream.batch(1)]))
    shards = [DataStream(images, 2, 0, 1, rank=r, world=2) for r in range(2)]
    assert set(shards[0].images.flatten().tolist()) == {0, 2, 4, 6, 8}
    assert set(shards[1].batch(0).flatten().tolist()) <= {1, 3, 5, 7, 9}


def test_resumed_training_is_identical():
    """Steps 0..5 in one go equal steps 0..2, then 3..5 with the optimizer state carried over."""
    full, _ = run("gd", steps=6)
    cfg = TrainConfig(strategy="gd", batch_size=4, log_every=2)
    scheduler = build_scheduler(ModelConfig())
    teacher = Teacher(tiny_unet(1).requires_grad_(False), scheduler, steps=2)
    student = tiny_unet(0)
    optimizer, _ = make_optimizer(student, cfg)
    kwargs = dict(
        task=1,
        steps=6,
        train_cfg=cfg,
        scheduler=scheduler,
        noise_seed=(0, "noise", 1),
        device=torch.device("cpu"),
        progress=False,
    )
    data, replay = DataStream(IMAGES, 4, 0, 1), InlineReplay(teacher, "gd", 4, 0, 1)
    first = train_task(student, optimizer, data, replay, **{**kwargs, "steps": 3})
    state = optimizer.state_dict()
    optimizer2, _ = make_optimizer(student, cfg)
    optimizer2.load_state_dict(state)
    rest = train_task(student, optimizer2, DataStream(IMAGES, 4, 0, 1), replay, start_step=3, **kwargs)
    assert [r["step"] for r in first + rest] == [0, 2, 4, 5]
    assert torch.equal(params(student), params(full))


def test_steps_per_task():
    assert steps_per_task(1000, TrainConfig(epochs=2.0, batch_size=128)) == math.ceil(2000 / 128)
    assert steps_per_task(1000, TrainConfig(epochs=2.0, batch_size=128, max_steps=5)) == 5


def test_derive_seed_depends_on_every_part():
    assert derive_seed(42, "replay", 1, 0) == derive_seed(42, "replay", 1, 0)
    assert len({derive_seed(42, "replay", k, i) for k in range(3) for i in range(3)}) == 9
