"""The Ray runtime on a real local cluster: determinism over sampler counts, killed actors and drivers, resume
(jobs on an autoscaling cluster, a lost sampler node with replay in flight, a PID replay sampler on the sampler
actors: test_twin.py)."""

import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import ray
import torch
from diffusers import DDIMPipeline
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
from ray.util.state import list_actors
from safetensors.torch import load_file

from distcl.backend import InlineBackend, inline_image_replay
from distcl.config import DataConfig, load_config
from distcl.continual import run_continual
from distcl.data import DEBIAN_DIR, build_scenario, cache_dir, load_dataset, read_idx_source, read_image, to_model_range
from distcl.evaluation import Evaluator, metrics_from_chunks
from distcl.models import load_unet
from distcl.rundir import load_classifier, task_dir
from distcl.runtime import cluster as cluster_module
from distcl.runtime import pipeline
from distcl.runtime.channel import WorkChannel
from distcl.runtime.samplers import AFTER_TASK_NICE, RemoteReplay, SamplerPool, classifier_replay
from distcl.runtime.stream import ShardStream, ingest_options, task_dataset
from distcl.settings import ConfigError
from distcl.teachers import TeacherFiles
from distcl.training import steps_per_task
from tests.image_data import write_folder
from tests.references import inline_beside

pytestmark = pytest.mark.slow

# on the CPU, whatever the machine has: the bitwise claims are the CPU's (README, Determinism)
SHORT = [
    "data.num_tasks=2",
    "data.train_per_class=40",
    "data.test_per_class=20",
    "train.batch_size=8",
    "train.max_steps=12",
    "eval.num_samples=20",
    "eval.steps=2",
    "runtime.checkpoint_every=4",
    "runtime.num_samplers=1",
    "device=cpu",
    "runtime.use_gpu=false",
]


def config(*extra):
    return load_config(preset="smoke", overrides=SHORT + list(extra))


def weights(out, k):
    return load_file(task_dir(out, k) / "unet" / "diffusion_pytorch_model.safetensors")


def same_weights(a, b, atol=0.0):
    """Bitwise equal (atol 0), or equal up to float reordering (thread counts differ between processes)."""
    return a.keys() == b.keys() and all(torch.allclose(a[key], b[key], rtol=0, atol=atol) for key in a)


def keep_task_0(src, dst):
    """A copy of run ``src`` as it was after task 0 (saved and evaluated): a run to resume at task 1."""
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("task_1", "ray_train"))
    for table in ("metrics.parquet", "train_log.parquet"):
        df = pd.read_parquet(dst / table)
        df[df.task == 0].to_parquet(dst / table)


@pytest.fixture(scope="module")
def cluster():
    yield ray.init(address="local", num_cpus=4, num_gpus=0, include_dashboard=True)  # the State API needs it
    ray.shutdown()


@pytest.fixture(scope="module")
def inline_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("inline") / "run"
    run_continual(config("runtime.backend=inline"), out, progress=False, log=lambda _: None)
    return out


def test_a_ray_run_with_the_classifier_equals_inline_overlapping_tasks_its_actors_started_once(cluster, tmp_path):
    """Three tasks with the continual classifier: on Ray the classifier and the evaluation of task k run in the
    driver's second thread (on the sampler actors) while task k+1 trains, and the run ends with the inline run's
    metrics and classifiers; one Train worker group and one sampler pool serve all its tasks (Ray's State API)."""
    extra = ["data.num_tasks=3", "classifier.enabled=true", "classifier.replay_steps=2", "runtime.num_samplers=2"]
    inline = tmp_path / "inline"
    run_continual(config("runtime.backend=inline", *extra), inline, progress=False, log=lambda _: None)
    threads = []

    class Recording(pipeline.RayBackend):
        def train_classifier(self, spec):
            threads.append(("classifier", spec.task, threading.current_thread().name))
            return super().train_classifier(spec)

        def evaluate(self, job, progress):
            threads.append(("evaluate", job.task, threading.current_thread().name))
            return super().evaluate(job, progress)

    def started(cls: str) -> set[str]:
        actors = list_actors(f"http://{cluster.dashboard_url}", filters=[("class_name", "=", cls)], limit=10_000)
        return {a.actor_id for a in actors}

    before = {cls: started(cls) for cls in ("TeacherSampler", "RayTrainWorker")}
    out, reported = tmp_path / "ray", []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline, "RayBackend", Recording)
        pipeline.run(config(*extra), out, progress=False, log=lambda _: None, on_task=lambda k, m: reported.append(k))
    assert reported == [0, 1, 2]
    after_task = "distcl-after-task_0"  # the driver's second thread
    assert sorted(threads) == [(step, k, after_task) for step in ("classifier", "evaluate") for k in range(3)]
    assert {cls: len(started(cls) - ids) for cls, ids in before.items()} == {"TeacherSampler": 2, "RayTrainWorker": 1}
    for k in range(3):
        ours, theirs = (load_classifier(run, k) for run in (out, inline))
        assert same_weights(ours, theirs, atol=1e-5), (k, max((ours[n] - theirs[n]).abs().max() for n in ours))
    got, want = (pd.read_parquet(run / "metrics.parquet").set_index(["task", "metric"]).value for run in (out, inline))
    assert len(got) == len(want) and got.to_dict() == pytest.approx(want.to_dict(), rel=1e-4)


def test_the_work_channel_passes_items_and_results_on_without_importing_torch(cluster):
    """The actor between the driver and the Train workers imports Ray alone: the items (configs, refs) and the
    results (tensors) go through it unpickled, so its process starts in about a second."""
    channel = WorkChannel.remote()
    try:
        payload = ray.put((same_weights, {"cfg": config(), "init": torch.ones(3)}))
        seq = ray.get(channel.post.remote("task_0", [payload]))
        taken, name, (ref,) = ray.get(channel.next.remote(-1))
        fn, item = ray.get(ref)
        assert (taken, name, fn) == (seq, "task_0", same_weights) and torch.equal(item["init"], torch.ones(3))
        ray.get(channel.finish.remote(seq, pickle.dumps({"model": torch.zeros(2)})))
        assert torch.equal(pickle.loads(ray.get(channel.result.remote(seq)))["model"], torch.zeros(2))
        loaded = ray.get(channel.__ray_call__.remote(lambda _: sorted({"torch", "diffusers"} & set(sys.modules))))
        assert loaded == []
    finally:
        ray.kill(channel)


def test_classifier_replay_images_come_from_the_samplers(cluster, inline_run, tmp_path):
    cfg = config("classifier.enabled=true", "classifier.batch_size=4", "classifier.replay_steps=2")
    pool = SamplerPool(config("runtime.sampler_threads=2"), batch_size=8)  # more threads than its CPU: the same images
    try:
        assert ray.get(pool.actors[0].__ray_call__.remote(lambda _: torch.get_num_threads())) == 2
        remote = classifier_replay(pool.actors, cfg, 1, [ray.put(TeacherFiles.read(cfg, task_dir(inline_run, 0)))], 3)
        got = [remote.get(s) for s in range(3)]
    finally:
        pool.stop()
    inline = inline_image_replay(cfg, 1, task_dir(inline_run, 0), steps=3)
    for step, images in enumerate(got):
        assert images.shape == (4, 1, 16, 16)
        assert torch.allclose(images, inline.get(step), atol=1e-4)


def evaluation_job(cfg, run, k):
    """The evaluation job of task ``k`` of ``run`` (16x16), and the test split it scores against."""
    splits = read_idx_source(DEBIAN_DIR)
    test = build_scenario(splits, cfg.data, cfg.seed, 16).test_split(k)
    evaluator = Evaluator(cfg.eval, splits, 16, cache_dir(), torch.device("cpu"), progress=False)
    return evaluator.job(k, cfg.seed, cfg.model, load_unet(task_dir(run, k), cfg.model).state_dict(), test, 16), test


def test_evaluation_on_1_and_2_samplers_equals_inline_and_survives_a_killed_sampler(cluster, inline_run):
    cfg = config("data.test_per_class=50", "eval.num_samples=160", "eval.batch_size=40")  # 4 + 5 chunks
    job, test = evaluation_job(cfg, inline_run, 1)
    inline, inline_grid = metrics_from_chunks(InlineBackend(torch.device("cpu")).evaluate(job, False), test.labels, 10)
    for n in (1, 2):
        pool = SamplerPool(config(f"runtime.num_samplers={n}"), batch_size=8)
        try:
            chunks = pool.evaluate(job)
            got = [next(chunks)]
            pid = ray.get(pool.actors[-1].where.remote())["pid"]
            if n == 2:  # its process killed at once (ray.kill is asynchronous): its chunks are retried on the new one
                os.kill(pid, signal.SIGKILL)
            got += list(chunks)
            assert (ray.get(pool.actors[-1].where.remote())["pid"] != pid) == (n == 2)
        finally:
            pool.stop()
        assert sorted((r.chunk.kind, r.chunk.start) for r in got) == sorted((c.kind, c.start) for c in job.chunks())
        metrics, grid = metrics_from_chunks(got, test.labels, 10)
        assert metrics == pytest.approx(inline, rel=1e-4) and (grid.int() - inline_grid.int()).abs().max() <= 1


def thread_nices(pid: int) -> dict[int, int]:
    """The nice value of each thread of process ``pid`` (/proc/PID/task/TID/stat, field 19)."""
    return {
        int(t.name): int((t / "stat").read_text().rsplit(")", 1)[1].split()[16])
        for t in Path(f"/proc/{pid}/task").iterdir()
    }


def test_a_replay_request_is_answered_while_the_sampler_evaluates(cluster, inline_run):
    """Evaluation chunks run on their own thread at a lower CPU priority: replay asked for meanwhile does not wait
    for them (it did: the first replay batch of every task waited for the chunks of the task before)."""
    cfg = config("eval.num_samples=400", "eval.batch_size=400", "eval.steps=20")  # one chunk: seconds
    job, _ = evaluation_job(cfg, inline_run, 0)
    teacher = [ray.put(TeacherFiles.read(cfg, task_dir(inline_run, 0)))]
    pool = SamplerPool(cfg, batch_size=8)
    try:
        (actor,) = pool.actors
        pid = ray.get(actor.where.remote())["pid"]
        chunk = next(c for c in job.chunks() if c.kind == "generated")
        evaluating = actor.evaluate.remote([ray.put(job)], chunk)
        replay = actor.make.remote(1, teacher, 0)  # asked after the chunk (the old default group: served after it)
        first, _ = ray.wait([evaluating, replay], num_returns=1)
        assert first == [replay] and not ray.wait([evaluating], timeout=0)[0]
        base = os.getpriority(os.PRIO_PROCESS, pid)
        lowered = min(19, base + AFTER_TASK_NICE)
        assert thread_nices(pid)[pid] == base
        deadline = time.monotonic() + 10
        while max(thread_nices(pid).values()) != lowered and time.monotonic() < deadline:
            time.sleep(0.05)
        assert max(thread_nices(pid).values()) == lowered  # the evaluation's thread
        ray.get(evaluating)
    finally:
        pool.stop()


def test_a_raising_sampler_is_a_clear_error(cluster, inline_run, tmp_path):
    pool = SamplerPool(config(), batch_size=8)
    try:
        stream = RemoteReplay(
            pool.actors, 1, [ray.put(TeacherFiles("task_0", {}))], 0, 1, steps=4, depth=2, timeout_s=60
        )
        with pytest.raises(Exception, match="no diffusers checkpoint at .*task_0"):
            stream.get(0)
    finally:
        pool.stop()
    with pytest.raises(FileNotFoundError, match="no diffusers checkpoint at .*no-teacher"):  # read in the driver
        TeacherFiles.read(config(), tmp_path / "no-teacher")


def test_layout_larger_than_the_cluster_is_refused(cluster):
    with pytest.raises(ConfigError, match=r"runtime: the layout needs 9 CPU but the cluster has 4 .*num_samplers=8"):
        pipeline.check_layout(pipeline.connect(config("runtime.num_samplers=8")))
    for gpus in ("runtime.use_gpu=true", "runtime.sampler_gpus=1"):  # this cluster has no GPU
        assert pipeline.connect(config(gpus)).runtime.use_gpu is (gpus == "runtime.use_gpu=true")
        with pytest.raises(ConfigError, match=r"needs 1 GPU but the cluster has 0"):
            pipeline.check_layout(pipeline.connect(config(gpus)))
    assert pipeline.connect(config("runtime.use_gpu=null")).runtime.use_gpu is False


def test_under_an_autoscaler_the_layout_is_checked_against_the_node_types(cluster, monkeypatch):
    """cluster.yaml's shape: a 0-CPU head, GPU trainer nodes, sampler nodes; none of them up yet. (Reading the node
    types from the autoscaler's own config, on the twin of cluster.yaml: test_twin.py.)"""
    types = (
        ({"CPU": 0}, 1),
        ({"CPU": 8, "GPU": 1, "trainer_slot": 1}, 4),
        ({"CPU": 4, "GPU": 1, "sampler_slot": 4}, 2),
    )
    monkeypatch.setattr(cluster_module, "autoscaling_node_types", lambda gcs_address: (types, 5))
    on_types = ["runtime.worker_resource=trainer_slot", "runtime.sampler_resource=sampler_slot"]
    cfg = pipeline.connect(config(*on_types, "runtime.use_gpu=null", "runtime.num_samplers=8"))
    assert cfg.runtime.use_gpu is True  # from the node types: this cluster has no GPU up
    pipeline.check_layout(cfg)  # 8 samplers: 2 sampler nodes of 4 slots, once the autoscaler starts them
    with pytest.raises(ConfigError, match=r"needs 9 sampler_slot but the cluster's node types can start at most 8"):
        pipeline.check_layout(pipeline.connect(config(*on_types, "runtime.num_samplers=9")))
    with pytest.raises(
        ConfigError,
        match=r"a Train worker needs \{'CPU': 9.0, 'trainer_slot': 1\} on one node but no "
        r"node type has that",
    ):
        pipeline.check_layout(pipeline.connect(config(*on_types, "runtime.cpus_per_worker=9", "runtime.use_gpu=false")))
    monkeypatch.setattr(cluster_module, "autoscaling_node_types", lambda gcs_address: (types, 1))  # max_workers 1
    with pytest.raises(ConfigError, match=r"needs 9 CPU but the cluster's node types can start at most 8 "):
        pipeline.check_layout(pipeline.connect(config(*on_types, "runtime.num_samplers=8")))


def test_the_capacity_is_read_inside_a_placement_group_as_in_a_tune_trial(cluster):
    """A Tune trial's placement group captures the tasks it starts: the head lookup must leave it."""
    group = placement_group([{"CPU": 1}])
    ray.get(group.ready())
    try:
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_capture_child_tasks=True)
        total = ray.get(remote_capacity.options(scheduling_strategy=strategy).remote(), timeout=60)
    finally:
        remove_placement_group(group)
    assert total["CPU"] == 4


@ray.remote(num_cpus=1)
def remote_capacity() -> dict:
    return cluster_module.cluster_capacity().total


def test_a_streamed_task_gives_its_images_in_a_seeded_order_and_resumes_at_any_step(cluster, tmp_path):
    folder = write_folder(tmp_path / "colours", per_class=30)
    data = load_dataset(DataConfig(source="image_folder", data_dir=str(folder), stream=True), None, 8)
    scenario = build_scenario(data, config("data.tasks=[[red, blue], [green]]").data, 42, 8)
    files = scenario.train_images(0)
    in_memory = torch.stack([read_image(p, 3, 8) for p in files.paths])

    def stream(seed=42):
        dataset = task_dataset(files, 3, 8, seed, 0, cpus=0)
        dataset.context.execution_options = ingest_options()  # as the run's TorchTrainer sets them
        shard = dataset.streaming_split(1, equal=True)[0]  # what get_dataset_shard hands a single worker
        return ShardStream(shard, len(files.paths), 6, 8, seed, 0, rank=0, world=1)

    first = stream()
    epochs = [torch.cat([first.batch(e * first.per_epoch + i) for i in range(first.per_epoch)]) for e in range(2)]
    assert first.per_epoch == len(files.paths) // 6 and epochs[0].shape[1:] == (3, 8, 8)
    as_read = to_model_range(in_memory, 8)  # an epoch: the task's images, each once (the short batch dropped)
    rows = {tuple(x.flatten().tolist()) for x in as_read}
    assert all(tuple(x.flatten().tolist()) in rows for x in epochs[0]) and len(epochs[0]) == 6 * first.per_epoch
    assert not torch.equal(epochs[0], epochs[1])  # a new shuffle each epoch
    again = stream()
    resumed_at = first.per_epoch + 2  # a resumed worker's first batch: epoch 1, batch 2
    assert torch.equal(again.batch(resumed_at), epochs[1][12:18])
    assert not torch.equal(stream(seed=7).batch(0), epochs[0][:6])


def test_a_streamed_folder_trains_on_ray_every_step_of_the_in_memory_run(cluster, tmp_path):
    """The training images stream from their files to the Train worker (get_dataset_shard): as many steps as the
    in-memory run's, RGB checkpoints that diffusers samples; the batches themselves: the test above."""
    folder = write_folder(tmp_path / "colours", per_class=30)
    cfg = config(
        "data.source=image_folder",
        f"data.data_dir={folder}",
        "data.tasks=[[red, blue], [green]]",
        "data.stream=true",
        "train.max_steps=null",
        "train.epochs=1.0",
    )
    logs = []
    pipeline.run(cfg, tmp_path / "streamed", progress=False, log=logs.append)
    in_memory = build_scenario(load_dataset(replace(cfg.data, stream=False), None, 16), cfg.data, cfg.seed, 16)
    steps = pd.read_parquet(tmp_path / "streamed" / "train_log.parquet").groupby("task").step.max() + 1
    assert steps.tolist() == [steps_per_task(len(in_memory.train_images(k)), cfg.train) for k in (0, 1)] == [7, 4]
    assert sorted(pd.read_parquet(tmp_path / "streamed" / "metrics.parquet").task.unique()) == [0, 1]
    images = DDIMPipeline.from_pretrained(tmp_path / "streamed" / "task_1")(
        batch_size=1, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (1, 16, 16, 3)


def test_mismatched_teacher_checkpoint_is_refused(inline_run):
    with pytest.raises(ValueError, match="another architecture than model.preset 'small'.*sample_size 16"):
        load_unet(task_dir(inline_run, 0), config("model.preset=small").model)
    with pytest.raises(FileNotFoundError, match="no diffusers checkpoint"):
        load_unet(inline_run / "nope", config().model)


def test_a_ray_run_through_a_killed_driver_trains_the_inline_student_bitwise(cluster, inline_run, tmp_path):
    """Task 1 on Ray, from the inline run's task-0 model, by a driver that joins the cluster (as a Ray job's does)
    with 1 sampler actor, is killed mid-task, and is run again with 2 sampler actors: it trains the student of the
    inline run, bitwise (both compute with 1 thread). (A fault in a Train worker, which restarts the worker group
    from the same checkpoints: test_distill_ray.py.)"""
    long = ["train.max_steps=40", "runtime.checkpoint_every=10"]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    for run in (reference, out):
        keep_task_0(inline_run, run)  # task 0 as the run's (the config's diff is max_steps alone)
        (run / "config.yaml").unlink()
    cmd = [sys.executable, "-m", "distcl.cli", "run", "--preset", "smoke", "--out", str(out), "--no-progress"]
    cmd += [arg for o in SHORT + long for arg in ("--set", o)]
    env = {**os.environ, "RAY_ADDRESS": ray.get_runtime_context().gcs_address}
    # SIGKILL, as a lost node or an OOM kill: a driver joining a cluster starts no process of its own
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    beside = inline_beside(config("runtime.backend=inline", *long), reference)  # while the driver starts
    deadline = time.time() + 240
    snapshot = out / "ray_train" / "workers" / "checkpoint_manager_snapshot.json"  # a checkpoint is registered
    while not snapshot.exists() and time.time() < deadline:
        assert driver.poll() is None, "the driver ended before its first checkpoint"
        time.sleep(0.2)
    killed_at = time.time()
    driver.kill()
    driver.wait()
    assert not task_dir(out, 1).exists()
    resumed = subprocess.run(
        [*cmd, "--set", "runtime.num_samplers=2"], capture_output=True, text=True, timeout=300, env=env
    )
    assert resumed.returncode == 0, resumed.stderr
    print(f"driver killed, resumed run finished {time.time() - killed_at:.1f}s later")
    assert "task 0" not in resumed.stdout.replace("task 0 (", "")  # task 0 not redone
    recoveries = re.findall(r"task 1: recovered at step (\d+)", resumed.stdout)
    assert len(recoveries) == 1 and int(recoveries[0]) in (10, 20, 30), resumed.stdout[-4000:]  # at a checkpoint
    beside.result()
    assert same_weights(weights(out, 1), weights(reference, 1))
    assert not same_weights(weights(out, 1), weights(out, 0), atol=1e-4)
    assert not (out / "ray_train").exists() or not any((out / "ray_train").iterdir())
    task_1 = pd.read_parquet(reference / "train_log.parquet").query("task == 1")
    on_ray = pd.read_parquet(out / "train_log.parquet").query("task == 1")
    assert on_ray.step.tolist() == task_1.step.tolist()  # no duplicated rows
    assert (on_ray.replay_wait_s < on_ray.step_s).all() and (on_ray.replay_wait_s > 0).any()  # waits are timed
