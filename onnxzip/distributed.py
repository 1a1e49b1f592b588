"""The calibration pass sharded over the workers of a Ray cluster (`--ray`, `pip install 'onnxzip[distributed]'`).

What the source models give a merge (feature statistics, the refit's target rows, the references verification
compares with) are sums and lists over the calibration samples, so the samples can be cut into shards, each run by
a worker (onnxruntime on its own CPU or GPU), and the results combined:

- shards are contiguous runs of whole batches, so every batch is the one the single process runs, and the rows
  drawn in it (seeded by the index of its first sample) are the same;
- `FeatureStats` combine exactly (Chan's pairwise update): the statistics equal the single process's to float64
  rounding; rows and outputs are put back in sample order.

The matching, surgery and refit then run in this process on the combined results, as without Ray.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from .calibration import CalibrationData, SourceRun, run_sources
from .errors import InstallError, UsageError

log = logging.getLogger("onnxzip")


def import_ray():
    try:
        import ray
    except ImportError as exc:
        raise InstallError("--ray needs Ray, which is not installed: pip install 'onnxzip[distributed]' "
                           f"({exc})") from exc
    return ray


def connect(address: str, workers: int | None = None):
    """Ray, connected: 'local' starts a private local cluster (with `workers` CPUs, default all), 'auto' joins the
    cluster Ray finds (RAY_ADDRESS or one running on this machine) or starts a local one, anything else is a
    cluster address (ray://host:port or host:port)."""
    ray = import_ray()
    if ray.is_initialized():
        return ray
    kwargs = {"include_dashboard": False, "log_to_driver": False, "logging_level": logging.WARNING}
    try:
        if address == "local":
            ray.init(num_cpus=workers, **kwargs)
        elif address == "auto":
            ray.init(**kwargs)
        else:
            ray.init(address=address, **kwargs)
    except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError, ...
        raise UsageError(f"--ray {address}: cannot connect to a Ray cluster: {str(exc).splitlines()[0]}") from exc
    return ray


def shard_bounds(num_samples: int, shards: int, batch_size: int) -> list:
    """(start, stop) of up to `shards` contiguous runs of whole batches covering `num_samples` samples."""
    batches = -(-num_samples // batch_size)
    shards = max(1, min(shards, batches))
    cuts = [round(k * batches / shards) * batch_size for k in range(shards + 1)]
    return [(lo, min(hi, num_samples)) for lo, hi in zip(cuts, cuts[1:]) if lo < min(hi, num_samples)]


def _shard_pass(models, requests, fit, fit_first, held, held_first, fit_total, options):
    """One worker's share (a Ray task): `run_sources` on its samples, numbered as in the whole pass."""
    return run_sources([onnx.load_from_string(m) for m in models], requests, fit, first=(fit_first, held_first),
                       fit_total=fit_total, held=held, **options)


def _part(data: CalibrationData, lo: int, hi: int) -> CalibrationData:
    return CalibrationData(data.path, {k: np.ascontiguousarray(v[lo:hi]) for k, v in data.arrays.items()}, data.specs)


def run_sources_sharded(address: str, workers: int | None, models: list, requests: list, data: CalibrationData,
                        batch_size: int = 64, device: str = "auto", *, rows=(), held: CalibrationData | None = None,
                        outputs: bool = False, seed: int = 0, sampling=None, logger=None) -> SourceRun:
    """`calibration.run_sources` with the samples (and the held-back ones) cut into one shard per worker."""
    logger = logger or log
    ray = connect(address, workers)
    shards = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    unit = data._fixed_batch() or batch_size  # a model with a fixed batch dimension runs batches of that size
    fit_bounds = shard_bounds(data.num_samples, shards, unit)
    held_bounds = (shard_bounds(held.num_samples, len(fit_bounds), unit)
                   if held is not None and held.num_samples else [])
    # a worker runs onnxruntime on a GPU where the cluster has them (Ray hides GPUs from tasks that ask for none)
    gpus = float(ray.cluster_resources().get("GPU", 0))
    per_task = 0 if device == "cpu" or not gpus else min(1.0, gpus / len(fit_bounds))
    if device == "cuda" and not gpus:
        raise UsageError(f"--device cuda --ray {address}: the Ray cluster has no GPU")
    task = ray.remote(num_cpus=1, num_gpus=per_task)(_shard_pass)
    blobs = ray.put([m.SerializeToString() for m in models])
    options = dict(batch_size=batch_size, device=device, rows=list(rows), outputs=outputs, seed=seed,
                   sampling=sampling)
    futures = []
    for k, (lo, hi) in enumerate(fit_bounds):
        held_part, held_lo = (_part(held, *held_bounds[k]), held_bounds[k][0]) if k < len(held_bounds) else (None, 0)
        futures.append(task.remote(blobs, list(requests), _part(data, lo, hi), lo, held_part, held_lo,
                                   data.num_samples, options))
    logger.info("calibrating on %d Ray worker(s): %d + %d shard(s)", shards, len(fit_bounds), len(held_bounds))
    try:
        runs = ray.get(futures)
    except ray.exceptions.RayTaskError as exc:
        raise exc.as_instanceof_cause() from None
    return combine(runs)


def combine(runs: list) -> SourceRun:
    """One SourceRun from the shards' runs, in sample order."""
    first = runs[0]
    stats = {}
    for run in runs:
        for key, value in run.stats.items():
            if key in stats:
                stats[key].merge_from(value)
            else:
                stats[key] = value
    rows = {key: {held: [entry for run in runs for entry in run.rows[key][held]] for held in (False, True)}
            for key in first.rows}
    outputs = None
    if first.outputs is not None:
        outputs = []
        for m in range(len(first.outputs)):
            parts = [run.outputs[m] for run in runs if run.outputs is not None and run.outputs[m]]
            outputs.append({name: np.concatenate([p[name] for p in parts], axis=0) for name in parts[0]}
                           if parts else {})
    return SourceRun(stats, rows, dict(first.fractions), outputs, first.seed)
