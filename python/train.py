"""Train a multi-exit network: a thin CLI over ``dfs_kernels.training.trainer.train``.

    python python/train.py --model vgg7 --dataset digits --strategy dfs --epochs 3 --batch-size 64 --out /tmp/run
    torchrun --nproc_per_node 2 python/train.py ...   # data parallel (gloo on CPU, nccl on GPU)

Prints each epoch's per-exit train loss and accuracy; writes OUT/metrics.json, OUT/metrics.csv, OUT/last.pt.
"""

from __future__ import annotations

import argparse
import os

from dfs_kernels.models import MODELS
from dfs_kernels.training import STRATEGIES
from dfs_kernels.training.augment import AUGMENTATIONS
from dfs_kernels.training.data import DATASETS
from dfs_kernels.training.trainer import AMP_DTYPES, OPTIMIZERS, TrainConfig, train


def parse_args(argv=None) -> TrainConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="vgg7", choices=sorted(MODELS))
    parser.add_argument("--strategy", default="dsn", choices=sorted(STRATEGIES))
    parser.add_argument("--beta", type=float, default=0.5, help="DFS shared fraction of channels")
    parser.add_argument("--backend", default="auto", help="DFS ops backend (dfs flavour)")
    parser.add_argument("--dataset", default="digits", choices=DATASETS)
    parser.add_argument("--data-dir", default=None,
                        help="folder holding cifar-100-python/ or ImageNet's train/ and val/ (never downloaded)")
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=128, help="global batch, split over torchrun processes")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--optimizer", default="sgd", choices=OPTIMIZERS,
                        help="sgd (momentum 0.9) or adamw (transformers; e.g. --lr 1e-3)")
    parser.add_argument("--weight-decay", type=float, default=None, help="default: the recipe's")
    parser.add_argument("--amp", default="none", choices=list(AMP_DTYPES))
    parser.add_argument("--augmentation", default=None, choices=AUGMENTATIONS, help="default: the recipe's")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model")
    parser.add_argument("--out", default="runs/default")
    parser.add_argument("--resume", action="store_true", help="continue from OUT/last.pt if present")
    parser.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                        help="also checkpoint every STEPS steps within an epoch (default: epoch ends only)")
    parser.add_argument("--deterministic", action="store_true", help="torch.use_deterministic_algorithms")
    parser.add_argument("--no-sync-bn", action="store_true",
                        help="per-process BatchNorm statistics under torchrun (default: global batch)")
    parser.add_argument("--workers", type=int, default=4, help="data loader workers (folder datasets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    parser.add_argument("--synthetic-samples", type=int, default=64, help="train size of --dataset synthetic")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    args = parser.parse_args(argv)
    return TrainConfig(model=args.model, strategy=args.strategy, beta=args.beta, backend=args.backend,
                       dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                       batch_size=args.batch_size, lr=args.lr, optimizer=args.optimizer,
                       weight_decay=args.weight_decay, amp=args.amp,
                       augmentation=args.augmentation, channels_last=args.channels_last, compile=args.compile,
                       out=args.out, resume=args.resume, checkpoint_every=args.checkpoint_every,
                       deterministic=args.deterministic, sync_bn=not args.no_sync_bn, workers=args.workers,
                       seed=args.seed, device=args.device, progress=not args.no_progress,
                       synthetic_samples=args.synthetic_samples)


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
    train(config, on_epoch=print_epoch)
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"wrote {config.out}/metrics.json, metrics.csv, last.pt")


if __name__ == "__main__":
    main()
