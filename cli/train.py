"""`ghindex train`: a thin wrapper over `ghindex.train.train`."""
from __future__ import annotations

import json

import click

from ghindex.backbones import BACKBONES
from ghindex.data import PROTOCOLS


@click.command("train")
@click.argument("data", type=click.Path(exists=True))
@click.option("--bits", type=int, default=64, show_default=True, help="Code length in bits (multiple of 8).")
@click.option("--backbone", type=click.Choice(sorted(BACKBONES)), default=None,
              help="Feature extractor. [default: identity for feature arrays, alexnet for images]")
@click.option("--weights", default="none", show_default=True,
              help="Backbone weights: none (random), imagenet (torchvision download), or a state-dict file.")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (.ghm); MODEL.ckpt, MODEL.log.jsonl and MODEL.splits.npz go next to it.")
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="Folder that list-file paths are relative to. [default: the list file's folder]")
@click.option("--unsupervised", is_flag=True,
              help="Cosine-preservation objective on frozen backbone features; labels unused.")
@click.option("--multi-label", is_flag=True, help="Binary cross-entropy on multi-hot labels.")
@click.option("--protocol", type=click.Choice(PROTOCOLS),
              help="Train on this protocol's training split of a CIFAR-style folder (train/, test/).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split, initialisation and shuffling.")
@click.option("--freeze-backbone/--finetune-backbone", default=None,
              help="Keep backbone weights fixed (features cached once). [default: frozen for --unsupervised, "
                   "fine-tuned otherwise]")
@click.option("--epochs", type=int, default=50, show_default=True, help="Passes over the training set.")
@click.option("--lr", type=float, default=None, help="SGD learning rate. [default: 1e-3 supervised, 1e-4 unsupervised]")
@click.option("--lr-step", type=int, default=None,
              help="Multiply the learning rate by 0.1 every this many epochs; 0 = never. [default: 60% of --epochs]")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True, help="SGD weight decay.")
@click.option("--batch-size", type=int, default=32, show_default=True, help="Images per step.")
@click.option("--alpha", type=float, default=0.1, show_default=True,
              help="Weight of the quantization penalty mean(|H - sgn(H)|^3) (the paper: 0.1 CIFAR, 1 ImageNet).")
@click.option("--image-size", type=int, default=224, show_default=True, help="Inputs are resized to SIZE x SIZE pixels.")
@click.option("--center/--no-center", default=True, show_default=True,
              help="Unsupervised: centre features (mean of the training set) for the cosine target and the projection.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random horizontal flips while fine-tuning (not used with a frozen backbone).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]; mixed precision on CUDA.")
@click.option("--workers", type=int, default=None, help="DataLoader processes decoding images. [default: min(4, CPUs)]")
@click.option("--resume", is_flag=True, help="Continue from MODEL.ckpt with the same arguments (--epochs may grow).")
@click.option("--overwrite", is_flag=True,
              help="Start over even if --out or its checkpoint exists (otherwise an error: use --resume).")
@click.option("--progress/--no-progress", default=True, show_default=True, help="Progress bars on stderr.")
def train(data, out, **kwargs):
    """Train a GreedyHash encoder on DATA and write it to --out.

    DATA is an image folder (one sub-folder per class), a list file (`path label` or `path 0 1 0 ...`
    multi-hot), a .npz/.h5 array of `features` (+ `labels`) for the identity backbone, or with
    --protocol a CIFAR-10 folder. One summary line per epoch goes to stderr (and MODEL.log.jsonl);
    stdout gets one JSON line describing the result.

    Launched by torchrun (`torchrun --nproc_per_node=N -m ghindex_cli train ...`) it trains with
    DistributedDataParallel, one process per GPU; --batch-size is the batch of all N processes
    together, and rank 0 alone writes the model, checkpoint and log.
    """
    from ghindex import distributed
    from ghindex.train import output_paths, train as train_fn

    model = train_fn(data, out=out, **kwargs)
    if not distributed.is_main():
        return  # under torchrun, rank 0 reports
    info = model.config.extra.get("training", {})
    click.echo(json.dumps({
        "model": out, "bits": model.bits, "backbone": model.config.backbone, "objective": info.get("objective"),
        "epochs": info.get("epochs"), "final": info.get("final"),
        "files": {k: v for k, v in output_paths(out).items() if k != "splits" or info.get("splits_file")},
    }, sort_keys=True))
