"""`ghindex backbones`: a thin wrapper over `ghindex.backbones.list_backbones`."""
from __future__ import annotations

import dataclasses
import json

import click


@click.command("backbones")
@click.argument("names", nargs=-1)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json (one object per line) for programs.")
@click.option("--cached", is_flag=True, help="Only backbones whose ImageNet weights are in the local cache.")
def backbones(names, fmt, cached):
    """List the backbones `ghindex train --backbone` takes (or only NAMES): feature size, parameters,
    ImageNet weights and whether they are already in the local torch hub cache.

    Every image classification model of torchvision works; its ImageNet head is removed and the
    penultimate layer is the feature vector (alexnet and vgg16: fc7, as in the paper). Sizes come from
    a dry forward pass on PyTorch's meta device, so nothing is downloaded or allocated (listing all
    takes a while: each architecture is built). acc@1 and GFLOPS are torchvision's numbers for the
    ImageNet weights at their input size. Weights live in $TORCH_HOME/hub/checkpoints (default
    ~/.cache/torch/hub/checkpoints); `--weights FILE` takes a copy from anywhere.
    """
    from ghindex.backbones import list_backbones, weights_cache_dir

    rows = [r for r in list_backbones(list(names) or None) if r.cached or not cached]
    if fmt == "json":
        for r in rows:
            click.echo(json.dumps(dataclasses.asdict(r), sort_keys=True))
        return
    table = [("name", "features", "params", "size", "acc@1", "GFLOPS", "ImageNet weights", "cached")]
    for r in rows:
        table.append((
            r.name, "data" if r.feature_dim is None else str(r.feature_dim),
            "-" if not r.parameters else f"{r.parameters / 1e6:.1f}M",
            "-" if r.image_size is None else str(r.image_size),
            "-" if r.acc1 is None else f"{r.acc1:.1f}", "-" if r.gflops is None else f"{r.gflops:.2f}",
            r.weights or "-", "-" if r.weights is None else ("yes" if r.cached else "no"),
        ))
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        click.echo("  ".join(cell.ljust(w) if i in (0, 6) else cell.rjust(w)
                             for i, (cell, w) in enumerate(zip(row, widths))).rstrip())
    click.echo(f"weights cache: {weights_cache_dir()}", err=True)
