"""GPU helpers: how many GPUs FAISS sees, the gpu='auto'|'on'|'off' choice, copies of flat indexes to GPUs.

Constructing a GPU index on a machine without one aborts the process: call the copy helpers only when
`gpu_count() > 0` (`_resolve_gpu` says so).
"""
from __future__ import annotations

import logging

import faiss

from ..errors import ConfigError

log = logging.getLogger(__name__)

#: Largest k GpuIndexBinaryFlat can return.
GPU_MAX_K = 2048


def gpu_count() -> int:
    """GPUs FAISS can use (0 with faiss-cpu)."""
    get = getattr(faiss, "get_num_gpus", None)
    return int(get()) if get is not None else 0


def _resolve_gpu(gpu: str, what: str) -> bool:
    """'auto' | 'on' | 'off' -> use a GPU? Never True unless FAISS reports one."""
    if gpu not in ("auto", "on", "off"):
        raise ConfigError(f"gpu must be 'auto', 'on' or 'off', got {gpu!r}")
    if gpu == "off":
        return False
    if gpu_count() > 0:
        return True
    if gpu == "on":
        raise ConfigError(
            "gpu='on' but FAISS sees no GPU (faiss.get_num_gpus() == 0; faiss-gpu and a CUDA device are "
            "needed); use gpu='auto' or 'off'"
        )
    log.info("no GPU visible to FAISS: %s on CPU", what)
    return False


def _to_gpu(flat: faiss.IndexBinaryFlat, shard: bool):
    """Copy a CPU IndexBinaryFlat to all GPUs (replicas, or shards with successive ids).

    Returns (gpu_index, resources); the resources must outlive the index. Only call when gpu_count() > 0.
    """
    ngpu = gpu_count()
    resources = [faiss.StandardGpuResources() for _ in range(ngpu)]
    options = faiss.GpuMultipleClonerOptions()
    options.shard = bool(shard)
    gpu_index = faiss.index_cpu_to_gpu_multiple_py(resources, flat, options, list(range(ngpu)))
    return gpu_index, resources


def _gpu_clustering_index(dim: int):
    """A float L2 index on all GPUs for IVF k-means: (index, resources), both to be kept alive while
    training. Only call when gpu_count() > 0."""
    ngpu = gpu_count()
    resources = [faiss.StandardGpuResources() for _ in range(ngpu)]
    return faiss.index_cpu_to_gpu_multiple_py(resources, faiss.IndexFlatL2(dim), None, list(range(ngpu))), resources
