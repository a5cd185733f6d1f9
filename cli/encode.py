"""`ghindex encode`: a thin wrapper over `ghindex.encode.encode`."""
from __future__ import annotations

import json

import click

from .output import echo_rows


@click.command("encode")
@click.option("--model", "-m", required=True, type=click.Path(dir_okay=False),
              help="Model file (.ghm) from `ghindex train`.")
@click.argument("data", type=click.Path())
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Code store to write (HDF5, e.g. codes.h5).")
@click.option("--protocol", default=None, help="Encode one split of a protocol (cifar10-I, cifar10-II) over DATA.")
@click.option("--split", type=click.Choice(["train", "query", "database"]), default=None,
              help="Split of --protocol to encode.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the protocol's split.")
@click.option("--root", type=click.Path(file_okay=False), default=None,
              help="Folder that list-file paths are relative to. [default: the list file's folder]")
@click.option("--ids-from", type=click.IntRange(min=1), default=None, metavar="COLUMN",
              help="Take ids from this column of a list file (1 = first column after the path). "
                   "[default: position in DATA]")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per forward pass.")
@click.option("--workers", type=click.IntRange(min=0), default=None,
              help="DataLoader processes decoding images while the model runs (0: decode in the main process). "
                   "[default: min(8, CPUs)]")
@click.option("--device", default="auto", show_default=True, help="auto (cuda if available), cpu, cuda, cuda:N.")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16", "fp16"]), default="auto", show_default=True,
              help="auto: exact fp32 on CPU, mixed precision (bf16, else fp16) on CUDA. bf16 is faster on CPUs "
                   "with bf16 units but flips bits whose value is near 0.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="Where the backbone runs. auto: ONNX Runtime on the CPU in fp32 when installed (the cpu extra; "
                   "several times faster, the same features to ~1e-6), else PyTorch; PyTorch on a GPU. The ONNX "
                   "export is made once per model and cached in $GHINDEX_CACHE/onnx (~/.cache/ghindex/onnx).")
@click.option("--views", type=click.IntRange(min=0, max=64), default=0, show_default=True,
              help="Make each code from the image and this many edited views of it (crops, colour, JPEG...): "
                   "image queries find its edited copies more often (0.940 of a copy set with 8 views, 0.908 "
                   "with none), at 1 + views forwards per image. For database images; `add` uses the store's.")
@click.option("--strict", is_flag=True, help="Stop at the first unreadable image instead of skipping it.")
@click.option("--resume", is_flag=True,
              help="Continue an interrupted run from its last checkpoint (starts one if there is none).")
@click.option("--append", is_flag=True, help="Add to an existing store (same bits and model).")
@click.option("--overwrite", is_flag=True, help="Replace an existing store and discard an interrupted run.")
@click.option("--paths/--no-paths", "with_paths", default=True, show_default=True,
              help="Store each code's image path.")
@click.option("--checkpoint-seconds", type=click.FloatRange(min=0), default=10.0, show_default=True,
              help="Checkpoint (journal + store flush) at least this often; --resume restarts from the last one.")
@click.option("--checkpoint-rows", type=click.IntRange(min=1), default=65536, show_default=True,
              help="Checkpoint at least every this many rows.")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bar on stderr.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="Output format of the summary on stdout.")
def encode(model, data, out, protocol, split, seed, root, ids_from, batch_size, workers, device, precision, runtime,
           views, strict, resume, append, overwrite, with_paths, checkpoint_seconds, checkpoint_rows, progress, fmt):
    """Encode DATA (image folder, list file, array file, or a protocol split) into a code store.

    The store is written as OUT.partial with a journal (OUT.partial.journal) and renamed to OUT
    when complete; after a crash or kill, rerun with --resume. Unreadable images are skipped and
    recorded in the store (see `ghindex info`). Each code is stored with how sure each of its bits is
    (bit confidences, 2 bits per bit), which image queries' re-ranking weighs. Prints a summary to stdout.

    Launched by torchrun (`torchrun --nproc_per_node=N -m ghindex_cli encode ...`), each process
    encodes a contiguous range of DATA into OUT.partR-of-N (crash-safe as above), then rank 0 merges
    the parts in order into OUT and removes them; --resume needs the same N.
    """
    from ghindex import distributed
    from ghindex.encode import encode as encode_fn

    summary = encode_fn(
        model, data, out, protocol=protocol, split=split, seed=seed, root=root, batch_size=batch_size,
        workers=workers, device=device, precision=precision, runtime=runtime, views=views, ids_from=ids_from,
        strict=strict, resume=resume, append=append, overwrite=overwrite, with_paths=with_paths,
        checkpoint_seconds=checkpoint_seconds,
        checkpoint_rows=checkpoint_rows, progress=progress,
    )
    if not distributed.is_main():
        return  # under torchrun, rank 0 reports the whole run
    if fmt == "json":
        click.echo(json.dumps(summary, sort_keys=True))
        return
    rows = [
        ("out", summary["out"]),
        ("status", summary["status"]),
        ("count", f"{summary['count']:,} of {summary['inputs']:,} inputs"),
        ("skipped", f"{summary['skipped']:,}"),
        ("store_rows", f"{summary['store_rows']:,} x {summary['bits']}-bit codes"),
        ("resumed_from", f"{summary['resumed_from']:,}"),
        ("seconds", f"{summary['seconds']:.1f}"),
        ("rate", f"{summary['rate']:,.1f} inputs/s overall, {summary['loop_rate']:,.1f} inputs/s after "
                 f"{summary['setup_seconds']:.1f} s of setup"),
        ("device", f"{summary['device']} ({summary['precision']}"
                   + (f", {summary['runtime']})" if summary.get("runtime") else ")")),
    ]
    echo_rows(rows)
    for item in summary["skipped_items"]:
        click.echo(f"skipped  {item['path']}: {item['reason']}")
    if summary["skipped"] > len(summary["skipped_items"]):
        click.echo(f"skipped  ... {summary['skipped'] - len(summary['skipped_items']):,} more (all are in the store)")
