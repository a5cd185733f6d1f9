"""`encode()`: run a model over a data source and write its codes to an HDF5 code store, crash-safely,
in one process or, launched by torchrun, in several.

This module is only the public entry point; it chooses between the two runs and depends on both:

    ghindex.encode ──► ghindex.sharded_encode ──► ghindex.local_encode ──► journal, encode_state, batching
          └────────────────────────────────────────────┘

- `ghindex.local_encode.encode_local`: the single-process run (journal, resume, the loop); how a run
  survives being killed is described there;
- `ghindex.sharded_encode.encode_sharded`: each torchrun process runs `encode_local` on its range of
  the inputs, then rank 0 merges the parts.

Neither imports this module, so there is no import cycle. `Journal` and `pack_signs` stay importable
from here; the packing used by a run is this module's `pack_signs`, looked up at each call.
"""
from __future__ import annotations

import os
from typing import Any

from . import distributed
from .hashing import pack_signs
from .journal import Journal
from .local_encode import encode_local
from .sharded_encode import encode_sharded

__all__ = ["Journal", "encode", "encode_local", "encode_sharded"]


def encode(
    model: str | os.PathLike,
    data: str | os.PathLike,
    out: str | os.PathLike,
    protocol: str | None = None,
    split: str | None = None,
    seed: int = 0,
    root: str | os.PathLike | None = None,
    batch_size: int = 64,
    workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    runtime: str = "auto",
    ids_from: int | None = None,
    strict: bool = False,
    resume: bool = False,
    append: bool = False,
    overwrite: bool = False,
    with_paths: bool = True,
    checkpoint_seconds: float = 10.0,
    checkpoint_rows: int = 65536,
    progress: bool = True,
    views: int = 0,
    _shard: tuple[int, int] | None = None,
) -> dict[str, Any]:
    """Encode every input of `data` with the model file `model` into the code store `out`.

    `data` is an image folder, a list file or an array file (`load_data`), or with `protocol` and
    `split` a protocol split (`load_split`). Ids are each input's position in `data` (in the pooled
    folder for protocol splits; after the store's largest id when appending), or column `ids_from`
    of a list file. Labels and paths (unless `with_paths=False`) are stored with the codes, and each code's
    bit confidences (`ghindex.database_views.code_confidences`, packed by `ghindex.hashing.pack_confidences`),
    which image queries' re-ranking weighs (copies found: 0.908 -> 0.962, benchmarks/RESULTS.md "Copies",
    run 11); an append to a store made before them adds none.

    Bad images are skipped and recorded in the store and the summary; `strict=True` raises
    ImageError at the first one instead (rows before it stay resumable). `resume=True` continues an
    interrupted run (or starts one if there is none); `append=True` adds to an existing store of
    the same bits and model; `overwrite=True` replaces OUT and discards any interrupted run.

    `runtime`: where the backbone runs (`ghindex.runtime`): ``auto`` (ONNX Runtime on the CPU in fp32
    when onnxruntime is installed, the `cpu` extra; else PyTorch), ``torch`` or ``onnx``. Both give the
    same features to about 1e-6 of their range, so codes agree except for bits whose value is that close
    to 0.

    `views`: each code from the image and that many edited views of it (`ghindex.database_views`): an edited
    copy of the image, searched for by an image query, lands nearer it (copies found: 0.962 with 0 views, 0.978
    with 4, 0.980 with 8, benchmarks/RESULTS.md "Copies", run 11), at 1 + views backbone forwards per image. For database images;
    queries need none. Recorded in the store: appends (and `add`) must use the same.

    Returns a summary: count (rows this data contributed), skipped, skipped_items, store_rows,
    seconds, rate (inputs/s processed by this call), resumed_from, device, precision, runtime, out.

    Launched by torchrun with several processes, each encodes a contiguous range of the inputs
    into its own part and rank 0 merges them into `out` (`ghindex.sharded_encode`).
    """
    options = dict(
        batch_size=batch_size, workers=workers, precision=precision, runtime=runtime, views=views, strict=strict,
        with_paths=with_paths,
        checkpoint_seconds=checkpoint_seconds, checkpoint_rows=checkpoint_rows, pack=pack_signs,
    )
    if _shard is None and distributed.is_distributed():
        return encode_sharded(
            model, data, out, protocol=protocol, split=split, seed=seed, root=root, ids_from=ids_from,
            device=device, resume=resume, append=append, overwrite=overwrite, progress=progress, **options,
        )
    return encode_local(
        model, data, out, protocol=protocol, split=split, seed=seed, root=root, ids_from=ids_from,
        device=device, resume=resume, append=append, overwrite=overwrite, progress=progress, shard=_shard,
        **options,
    )
