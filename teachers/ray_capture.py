"""`distill capture CONFIG --output-dir RUN --workers N`: the capture stage as N Ray tasks, e.g. one vLLM
replica per `teacher.tensor_parallel_size` GPUs across the nodes of a Ray cluster.

Each task is one data-parallel capture worker, `teachers.capture.capture(cfg, RUN, rank, N)`, the very
function torchrun starts: the workers share nothing but RUN/logits (which must therefore be on a filesystem
every node sees), and the last to finish writes the manifest. The driver then checks that every shard is in.
Ray retries a task whose worker process died, and a retried task resumes its own shards. Ray is optional
(the `dev` extra installs it): this module is imported only when `--workers` is given.
"""

from __future__ import annotations

from pathlib import Path

from core.config import InputError, RunConfig
from teachers.capture import capture, finish_capture


def capture_with_ray(cfg: RunConfig, run_dir: Path, workers: int) -> Path:
    """Run `workers` capture workers as Ray tasks and return RUN/logits once every shard verifies.

    Uses the Ray cluster already initialised in this process, else `ray.init()`: the cluster at RAY_ADDRESS
    when set, otherwise a new local one (shut down again at the end). A task asks for
    `teacher.tensor_parallel_size` GPUs when the cluster has GPUs, else for one CPU."""
    import ray

    if workers < 1:
        raise InputError(f"capture --workers: must be ≥ 1, got {workers}")
    own_cluster = not ray.is_initialized()
    if own_cluster:
        ray.init()
    try:
        gpus = ray.cluster_resources().get("GPU", 0) > 0
        resources = {"num_gpus": cfg.teacher.tensor_parallel_size} if gpus else {"num_cpus": 1}
        task = ray.remote(**resources)(_worker)
        ray.get([task.remote(cfg, str(run_dir), rank, workers) for rank in range(workers)])
    finally:
        if own_cluster:
            ray.shutdown()
    return finish_capture(cfg, Path(run_dir))


def _worker(cfg: RunConfig, run_dir: str, rank: int, world: int) -> str:
    """One Ray task: capture worker `rank` of `world`."""
    return str(capture(cfg, Path(run_dir), rank, world))
