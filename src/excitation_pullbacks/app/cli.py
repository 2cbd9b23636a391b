"""``pullbacks-app``: start the explorer page on a local port."""

from __future__ import annotations

import argparse
import sys

__all__ = ["main", "parse_args"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pullbacks-app", description="Interactive explorer of excitation pullbacks.")
    p.add_argument(
        "--model",
        default="digits_cnn",
        help="digits_cnn (default), resnet50, vgg11_bn, densenet121, or any torchvision classifier",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="weights name (IMAGENET1K_V1, DEFAULT, ...) or null for random "
        "weights; default: the trained digits CNN, IMAGENET1K_V1 otherwise",
    )
    p.add_argument("--checkpoint", default=None, help="a local state-dict file loaded into the model")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--images", default=None, help="image folder for the gallery (default: digits test images for digits_cnn)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=7860)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Console entry point: load the model, build the page, serve it until interrupted."""
    args = parse_args(argv)
    # imported after the arguments: --help and argument errors answer without loading Gradio and torch, and a
    # missing Gradio (an install without the app extra) is one line
    try:
        import gradio  # noqa: F401
    except ImportError:
        sys.exit("error: the explorer needs Gradio: pip install -e '.[app]'")
    from .images import digits_folder
    from .models import ModelError, ModelSpec
    from .page import build_demo

    weights = args.weights
    if weights is None:
        weights = "DEFAULT" if args.model == "digits_cnn" else "IMAGENET1K_V1"
    elif weights.lower() in ("null", "none", "random"):
        weights = None
    spec = ModelSpec(args.model, None if args.checkpoint else weights, args.checkpoint)
    images = args.images
    if images is None and args.model == "digits_cnn":
        images = str(digits_folder())
    try:
        demo = build_demo(spec, device=args.device, images=images)
    except ModelError as err:
        sys.exit(f"error: {err}")
    demo.launch(server_name=args.host, server_port=args.port, show_error=True, max_file_size="50mb")


if __name__ == "__main__":
    main()
