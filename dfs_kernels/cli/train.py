"""Train a multi-exit network: a thin CLI over ``dfs_kernels.training.trainer.train``.

    dfs-train --model vgg7 --dataset digits --strategy dfs --epochs 3 --batch-size 64 --out /tmp/run
    torchrun --nproc_per_node 2 -m dfs_kernels.cli.train ...   # data parallel (gloo on CPU, nccl on GPU)
    dfs-train --model torchvision:resnet18 --exits layer1,layer2,layer3 --strategy dfs --epochs 3 --out /tmp/tv
    dfs-train --model hf:resnet --exits resnet.encoder.stages.0,resnet.encoder.stages.1,resnet.encoder.stages.2
    torchrun --nproc_per_node 2 -m dfs_kernels.cli.train --fsdp ...   # sharded (FSDP2); OUT/last.dcp

Prints each epoch's per-exit train loss and accuracy; writes OUT/metrics.json, OUT/metrics.csv, OUT/last.pt.
The options are checked against each other and this machine before any data or model is set up.
The digits dataset needs scikit-learn (pip install "dfs_kernels[train]").

--model takes the package's networks or a library model, LIBRARY:NAME (torchvision:, timm:, or hf: with a
Hugging Face model type such as resnet or bert), built with random weights (nothing is downloaded) and given
exits at the modules --exits names (dfs_kernels.multi_exit; see dfs_kernels.models.zoo). The libraries'
defaults are full size (hf:resnet is ResNet-50); --model-kwargs '{"depths": [1, 1, 1, 1]}' and the like make
them smaller. Convolutional networks take images of any size; vision transformers read the 32 x 32 digits
with --model-kwargs '{"image_size": 32}' (timm: img_size). Hugging Face text models read --dataset
synthetic_tokens. Block-dependent losses (bdl) need the package's networks.
"""

from __future__ import annotations

import argparse
import os
import warnings

from dfs_kernels.models import MODEL_ALIASES, MODELS, zoo
from dfs_kernels.training import STRATEGIES
from dfs_kernels.training.augment import AUGMENTATIONS
from dfs_kernels.training.data import DATASETS
from dfs_kernels.training.sharding import MIXED_PRECISION
from dfs_kernels.training.trainer import AMP_DTYPES, FSDP_STRATEGIES, OPTIMIZERS, TrainConfig, check_config, train

from ._common import BACKEND_CHOICES, HelpFormatter, comma_separated, json_object

DEFAULTS = TrainConfig()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dfs-train", description=__doc__, formatter_class=HelpFormatter)
    parser.add_argument("--model", default=DEFAULTS.model, metavar="MODEL",
                        help=f"multi-exit network: one of {sorted(MODELS)} (factory names such as vgg7_64 work "
                             f"too), or a library model {'/'.join(f'{prefix}:NAME' for prefix in zoo.LIBRARIES)} "
                             "with --exits")
    parser.add_argument("--exits", type=comma_separated, default=None, metavar="NAME,NAME,...",
                        help="library models only (required there): the modules whose outputs the exits read, "
                             "comma-separated in the order they run, as model.named_modules() spells them")
    parser.add_argument("--model-kwargs", type=json_object, default={}, metavar="JSON",
                        help="library models only: keyword arguments of the model (Hugging Face: of its "
                             "configuration), e.g. a small configuration")
    parser.add_argument("--strategy", default=DEFAULTS.strategy, choices=sorted(STRATEGIES),
                        help="training strategy; only 'dfs' trains the DFS flavour")
    parser.add_argument("--beta", type=float, default=DEFAULTS.beta, help="DFS shared fraction of channels (dfs)")
    parser.add_argument("--backend", default=DEFAULTS.backend, choices=BACKEND_CHOICES,
                        help="backend of the DFS ops (strategy dfs)")
    parser.add_argument("--dataset", default=DEFAULTS.dataset, choices=DATASETS, help="dataset")
    parser.add_argument("--data-dir", default=None,
                        help="folder holding cifar-100-python/ or ImageNet's train/ and val/ (never downloaded)")
    parser.add_argument("--epochs", type=int, default=DEFAULTS.epochs, help="epochs (the recipes' length)")
    parser.add_argument("--batch-size", type=int, default=DEFAULTS.batch_size,
                        help="global batch, split over torchrun processes")
    parser.add_argument("--lr", type=float, default=DEFAULTS.lr, help="initial learning rate")
    parser.add_argument("--optimizer", default=DEFAULTS.optimizer, choices=OPTIMIZERS,
                        help="sgd (momentum 0.9) or adamw (transformers; e.g. --lr 2e-3)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--amp", default=DEFAULTS.amp, choices=list(AMP_DTYPES), help="autocast dtype")
    parser.add_argument("--augmentation", default=None, choices=AUGMENTATIONS, help="default: the recipe's")
    parser.add_argument("--channels-last", action="store_true", help="channels-last memory format")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--out", default=DEFAULTS.out, help="run directory (checked for writing at start-up)")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULTS.checkpoint_every, metavar="STEPS",
                        help="also checkpoint every STEPS steps within an epoch (0: epoch ends only)")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    parser.add_argument("--no-sync-bn", action="store_true",
                        help="per-process BatchNorm statistics under torchrun (otherwise: the global batch's)")
    parser.add_argument("--fsdp", action="store_true",
                        help=f"shard parameters, gradients and optimizer state per block (FSDP2) instead of DDP; "
                             f"strategies {', '.join(FSDP_STRATEGIES)}; checkpoints to OUT/last.dcp")
    parser.add_argument("--fsdp-mixed-precision", default=DEFAULTS.fsdp_mixed_precision, choices=list(MIXED_PRECISION),
                        help="bf16: FSDP gathers parameters and computes in bfloat16, reduces gradients in float32")
    parser.add_argument("--activation-checkpointing", action="store_true",
                        help="recompute each backbone block's forward in the backward (less memory, more compute)")
    parser.add_argument("--workers", type=int, default=DEFAULTS.workers, help="data loader workers (imagenet)")
    parser.add_argument("--seed", type=int, default=DEFAULTS.seed, help="seed of initialization, order, augmentation")
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--synthetic-samples", type=int, default=DEFAULTS.synthetic_samples,
                        help="train size of --dataset synthetic")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return parser


def parse_args(argv=None) -> TrainConfig:
    """The checked ``TrainConfig`` of the command line; a usage error (exit 2) for options that conflict or
    cannot run on this machine."""
    parser = build_parser()
    args = parser.parse_args(argv)
    config = TrainConfig(model=args.model, strategy=args.strategy, beta=args.beta, backend=args.backend,
                         dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                         batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                         weight_decay=args.weight_decay, amp=args.amp,
                         augmentation=args.augmentation, channels_last=args.channels_last, compile=args.compile,
                         out=args.out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                         deterministic=args.deterministic, sync_bn=not args.no_sync_bn, workers=args.workers,
                         seed=args.seed, device=args.device, progress=not args.no_progress,
                         synthetic_samples=args.synthetic_samples, exits=args.exits, model_kwargs=args.model_kwargs,
                         fsdp=args.fsdp, fsdp_mixed_precision=args.fsdp_mixed_precision,
                         activation_checkpointing=args.activation_checkpointing)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            return check_config(config)
    except (ValueError, ImportError) as error:  # BackendUnavailableError included; a library model's missing library
        parser.error(str(error))


def print_epoch(record: dict) -> None:
    exits = len(record["test_acc"])
    print(f"epoch {record['epoch']}  lr {record['lr']:.4g}  loss {record['loss']:.4f}  "
          f"({record['seconds']:.1f} s)")
    print("  exit " + "".join(f"{k + 1:>8}" for k in range(exits)))
    print("  loss " + "".join(f"{v:8.4f}" for v in record["train_loss"]))
    if record["val_acc"]:
        print("  val% " + "".join(f"{v:8.2f}" for v in record["val_acc"]))
    print("  test%" + "".join(f"{v:8.2f}" for v in record["test_acc"]), flush=True)


def main(argv=None) -> None:
    config = parse_args(argv)
    try:
        train(config, on_epoch=print_epoch)
    except PermissionError as error:  # --out: found before any training
        raise SystemExit(f"dfs-train: error: {error}") from error
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {config.out}/metrics.json, metrics.csv, {'last.dcp' if config.fsdp else 'last.pt'}")


if __name__ == "__main__":
    main()
