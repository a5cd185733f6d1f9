"""`ghindex demo`: a thin wrapper over `ghindex.demo.demo`."""
from __future__ import annotations

import json

import click

from ghindex.demo import DEFAULT_DATA


@click.command("demo")
@click.option("--out", "-o", default="demo-out", show_default=True, type=click.Path(file_okay=False),
              help="Folder for the model, code stores, index, report and PNGs (previous demo files are replaced).")
@click.option("--data", default=DEFAULT_DATA, show_default=True, type=click.Path(file_okay=False),
              help="Folder with database/<class>/ (also the training set) and query/<class>/ images.")
@click.option("--bits", type=int, default=32, show_default=True, help="Code length in bits (multiple of 8).")
@click.option("--backbone", default="smallcnn", show_default=True, help="Backbone, trained from scratch.")
@click.option("--epochs", type=click.IntRange(min=1), default=6, show_default=True, help="Training epochs.")
@click.option("--lr", type=float, default=0.01, show_default=True, help="SGD learning rate (from scratch).")
@click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True, help="Images per step.")
@click.option("--image-size", type=click.IntRange(min=8), default=32, show_default=True,
              help="Inputs are resized to SIZE x SIZE pixels.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for initialisation and shuffling.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--workers", type=int, default=None, help="DataLoader processes. [default: min(4, CPUs)]")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True,
              help="table for people, json for scripts.")
def demo(fmt, **kwargs):
    """Train, encode, build, query and evaluate on the shipped CIFAR-10 subset (CPU, no download).

    Writes the retrieval grid (grid.png) and the precision-recall curve (eval-pr.png) into --out and
    prints the timings, the mAP, and the mAP of random codes for comparison.
    """
    from ghindex.demo import demo as demo_fn
    from ghindex.demo import format_summary

    summary = demo_fn(**kwargs)
    click.echo(json.dumps(summary, sort_keys=True) if fmt == "json" else format_summary(summary))
