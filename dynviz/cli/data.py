"""``data`` and ``native``: the workspace's dataset and the native block runner this machine
has."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from dynviz.cli.argtypes import command


def add_parser(sub) -> None:
    p = command(sub, "data", help="find the workspace's dataset, show the splits, decode "
                                  "the image cache",
                description="Locate the workspace's dataset (data.root of its "
                            "dynviz.toml; the built-in CIFAR-10: $DYNVIZ_DATA, ./data, "
                            "../shared/datasets/cifar10-jpeg), print its classes, the "
                            "splits and their fingerprints.")
    p.add_argument("--root", help="dataset root (default: the workspace's data.root)")
    p.add_argument("--download", action="store_true",
                   help="download CIFAR-10 with torchvision first (the built-in workspace "
                        "only; needs internet)")
    p.add_argument("--dest", help="download destination (default: $DYNVIZ_DATA or ./data)")
    p.add_argument("--decode", action="store_true", help="build the decoded uint8 cache now")
    p.set_defaults(func=_cmd_data)

    p = command(sub, "native", workspace=False, help="build the native (C++) block runner",
                description="Compiles models/csrc/blocks.cpp into the cache (once, about "
                            "a minute) and says where it is; exit status 1 when it "
                            "cannot be built here (Python blocks then run).")
    p.set_defaults(func=_cmd_native)


def _cmd_data(args: argparse.Namespace) -> int:
    from dynviz import data

    ws, root = args.ws, args.root
    if args.download:
        if not ws.builtin:
            raise ValueError(f"--download fetches CIFAR-10 for the built-in workspace only; "
                             f"{ws.root} reads its images from data.root of its dynviz.toml")
        dest = download_cifar10(args.dest or ws.data.roots[0])
        print(f"CIFAR-10 is in {dest}")
        root = root or dest
    dataset = data.open_dataset(ws.data, root)
    splits = {name: ws.split(name, dataset) for name in data.SPLITS}
    print(f"workspace: {ws.name} ({ws.root})")
    print(f"classes: {ws.data.n_classes} ({', '.join(ws.data.classes)}), "
          f"{ws.data.image_size}x{ws.data.image_size} pixels")
    print(f"dataset: {dataset.root} ({dataset.kind}, {len(dataset)} images, "
          f"fingerprint {dataset.fingerprint})")
    for name, split in splits.items():
        print(f"  {name:6s} {len(split):6d} images  fingerprint {split.fingerprint}")
    if args.decode:
        images = data.load_images(dataset)
        print(f"decoded cache: {images.shape} {images.dtype}")
    return 0


def _cmd_native(args: argparse.Namespace) -> int:
    from dynviz import settings
    from dynviz.runtime import native

    if not settings.native_enabled():
        print("the native block runner is turned off (DYNVIZ_NATIVE=0)")
        return 0
    module = native.module()
    if module is None:
        print("the native block runner is not available here; Python blocks run (see above)",
              file=sys.stderr)
        return 1
    print(f"native block runner: {module.__file__}")
    return 0


def download_cifar10(dest: str | Path) -> Path:
    """Fetch torchvision's CIFAR-10 into ``dest``; a clear error where there is no network."""
    import torchvision

    from dynviz import data

    dest = Path(dest)
    try:
        torchvision.datasets.CIFAR10(root=str(dest), train=True, download=True)
    except Exception as err:  # urllib raises several unrelated types
        raise data.DatasetNotFoundError(
            f"downloading CIFAR-10 into {dest} failed ({err}).\nWithout internet access, copy "
            f"a CIFAR-10 ImageFolder (train/<class>/*.jpg) or torchvision's "
            f"{data.TORCHVISION_DIR} there by hand, or point DYNVIZ_DATA at one.") from err
    return dest
