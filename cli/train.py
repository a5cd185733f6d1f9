"""`ghindex train`: a thin wrapper over `ghindex.train.train`."""
from __future__ import annotations

import json

import click

from ghindex.data import PROTOCOLS


@click.command("train")
@click.argument("data", type=click.Path(exists=True))
@click.option("--bits", type=int, default=64, show_default=True, help="Code length in bits (multiple of 8).")
@click.option("--backbone", default=None, metavar="NAME",
              help="Feature extractor: any torchvision classification model, smallcnn or identity (`ghindex "
                   "backbones` lists them). [default: identity for feature arrays, efficientnet_b0 for images]")
@click.option("--weights", default=None,
              help="Backbone weights: imagenet (torchvision's; from the torch hub cache, else downloaded), none "
                   "(random init), or a state-dict file. [default: imagenet where torchvision has them, else none]")
@click.option("--out", "-o", required=True, type=click.Path(dir_okay=False),
              help="Model file to write (.ghm); MODEL.ckpt, MODEL.log.jsonl and MODEL.splits.npz go next to it.")
@click.option("--root", type=click.Path(exists=True, file_okay=False),
              help="Folder that list-file paths are relative to. [default: the list file's folder]")
@click.option("--unsupervised", is_flag=True,
              help="Unsupervised training on frozen backbone features (--objective); labels unused. On images it "
                   "records the model's copy radius (see `ghindex info`).")
@click.option("--objective", type=click.Choice(["similarity", "views"]), default=None,
              help="Unsupervised objective: views (images only: codes keep the un-edited images' feature cosines, "
                   "and the codes of an image's edited copies agree and differ from other images'; finds copies and "
                   "semantic neighbours) or similarity (the feature cosines alone). [default: views for images; "
                   "similarity for feature arrays, under torchrun and with --preset paper]")
@click.option("--views", type=int, default=8, show_default=True,
              help="--objective views: edited views per training image, their features extracted once (8 found more "
                   "copies than 4 on a validation split, for twice the extraction time).")
@click.option("--similarity-weight", type=float, default=None,
              help="--objective views: weight of the un-edited images' codes keeping their pooled features' cosines "
                   "(0: none). [default: 3]")
@click.option("--consistency-weight", type=float, default=None,
              help="--objective views: weight of the codes of two edited views of an image agreeing "
                   "(1 - their cosine). [default: 0.7]")
@click.option("--contrast-weight", type=float, default=None,
              help="--objective views: weight of NT-Xent between two views' codes (an image's agree, different "
                   "images' differ). [default: 0.1]")
@click.option("--contrast-spare", type=float, default=None,
              help="--objective views: the share of a batch, in [0, 1), that NT-Xent spares for each image: its most "
                   "similar other images (by their features) are not pushed apart from it; 0 finds more copies and ranks "
                   "semantic neighbours worse. [default: 0.1]")
@click.option("--detail-layer", default="auto", show_default=True, metavar="auto|none|LAYER",
              help="A backbone layer whose output, pooled to a 2x2 grid, joins the features (recorded in the model): "
                   "auto adds the backbone's own for --objective views (mobilenet_v2: 0.13, its features[13]) and "
                   "nothing otherwise; none; or a layer name.")
@click.option("--multi-label", is_flag=True, help="Binary cross-entropy on multi-hot labels.")
@click.option("--protocol", type=click.Choice(PROTOCOLS),
              help="Train on this protocol's training split of a CIFAR-style folder (train/, test/).")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed for the split, initialisation and shuffling.")
@click.option("--freeze-backbone/--finetune-backbone", default=None,
              help="Keep backbone weights fixed (features cached once). [default: frozen for --unsupervised, "
                   "fine-tuned otherwise]")
@click.option("--preset", type=click.Choice(["default", "paper"]), default="default", show_default=True,
              help="Where unset --epochs/--lr/--batch-size/--alpha/--center/--hash-hidden/--balance/--backbone-lr-scale come from: "
                   "default (chosen by measurement, see README) or paper (GreedyHash's published settings).")
@click.option("--epochs", type=int, default=None, help="Passes over the training set. [default: by --preset]")
@click.option("--lr", type=float, default=None, help="SGD learning rate of the hash layer. [default: by --preset]")
@click.option("--lr-step", type=int, default=None,
              help="Multiply the learning rate by 0.1 every this many epochs; 0 = never. [default: 60% of --epochs; never with --preset paper --unsupervised]")
@click.option("--momentum", type=float, default=0.9, show_default=True, help="SGD momentum.")
@click.option("--weight-decay", type=float, default=5e-4, show_default=True, help="SGD weight decay.")
@click.option("--batch-size", type=int, default=None, help="Items per step. [default: by --preset]")
@click.option("--alpha", type=float, default=None,
              help="Weight of the quantization penalty mean(|H - sgn(H)|^3). [default: by --preset]")
@click.option("--image-size", type=int, default=224, show_default=True, help="Inputs are resized to SIZE x SIZE pixels (a JPEG of 4 x SIZE or more on both sides is first decoded "
                   "at 1/2, 1/4 or 1/8 scale, keeping 2 x SIZE: the model records it as reduced_decode).")
@click.option("--center/--no-center", default=None,
              help="Unsupervised: the hash layers read centred features (mean of the training set) and the "
                   "cosine target is shifted so the average pair's is 0. [default: by --preset: centred, paper: not]")
@click.option("--init", type=click.Choice(["pca", "random", "lda"]), default=None,
              help="Unsupervised, with --hash-hidden 0: start the hash layer from rotated principal directions of "
                   "the centred features (pca), from the directions that tell images apart relative to how their edited "
                   "views spread (lda, --objective views only) or PyTorch's random init. [default: random]")
@click.option("--balance", type=float, default=None,
              help="Weight of the bit balance penalty mean over bits of (bit's mean over the batch)^2; 0: none. "
                   "[default: by --preset: 1 for --unsupervised, else 0; paper: 0]")
@click.option("--hash-hidden", type=int, default=None, metavar="WIDTH",
              help="Width of a ReLU layer between the features and the hash layer; 0: none (the paper's single "
                   "linear layer). [default: by --preset: 1024 for --unsupervised, else 0; paper: 0]")
@click.option("--backbone-lr-scale", type=float, default=None,
              help="Fine-tuning: backbone layers learn at --lr times this. [default: by --preset for pretrained "
                   "weights, 1 for random ones]")
@click.option("--val-fraction", type=float, default=0.05, show_default=True,
              help="Held-out slice of the training items (at most 1,000; 0: none) whose retrieval mAP against the "
                   "other training items (labels of 2+ classes) and, unsupervised on images, copy recall@1 is logged.")
@click.option("--val-every", type=int, default=5, show_default=True,
              help="Held-out measures every this many epochs, and after the last.")
@click.option("--keep-best", is_flag=True, help="Keep the model of the best held-out mAP instead of the last epoch's.")
@click.option("--augment/--no-augment", default=True, show_default=True,
              help="Random horizontal flips while fine-tuning (not used with a frozen backbone).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu or cuda[:N]; mixed precision on CUDA.")
@click.option("--runtime", type=click.Choice(["auto", "torch", "onnx"]), default="auto", show_default=True,
              help="Where a frozen backbone computes the cached features: auto is ONNX Runtime on the CPU when "
                   "installed (the cpu extra), else PyTorch; fine-tuning runs PyTorch (see `ghindex encode --runtime`).")
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
        "unsupervised_objective": info.get("unsupervised_objective"), "copy_radius": model.config.copy_radius,
        "detail_layer": model.config.detail_layer,
        "files": {k: v for k, v in output_paths(out).items() if k != "splits" or info.get("splits_file")},
    }, sort_keys=True))
