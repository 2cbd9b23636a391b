"""``pullbacks-app``: start the explorer page on a local port."""

from __future__ import annotations

import argparse
import ipaddress
import sys

__all__ = ["MAX_FILE_SIZE", "cache_sweep", "exposure_warning", "main", "parse_args"]

#: The largest upload Gradio accepts (its own message refuses larger files before they reach the page's code).
MAX_FILE_SIZE = "50mb"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="pullbacks-app", description="Interactive explorer of excitation pullbacks.")
    p.add_argument(
        "--model",
        default="digits_cnn",
        help="digits_cnn (default), resnet50, vgg11_bn, densenet121, vit_b_16, swin_t, convnext_tiny, or any torchvision classifier",
    )
    p.add_argument(
        "--weights",
        default=None,
        help="weights name (IMAGENET1K_V1, DEFAULT, ...) or null for random "
        "weights; default: the trained digits CNN, IMAGENET1K_V1 otherwise",
    )
    p.add_argument("--checkpoint", default=None, help="a local state-dict file loaded into the model")
    p.add_argument(
        "--checkpoint-dir",
        default=None,
        help="a folder whose checkpoint files (.pt, .pth, .ckpt) the page offers; without it the page loads no "
        "local checkpoint but --checkpoint",
    )
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--images", default=None, help="image folder for the gallery (default: digits test images for digits_cnn)"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: all interfaces)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument(
        "--cache-age",
        type=int,
        default=900,
        help="seconds Gradio keeps its cached uploads and results (swept every third of that); default 900",
    )
    args = p.parse_args(argv)
    if args.cache_age < 1:
        p.error("--cache-age must be at least 1 second")
    return args


def cache_sweep(age: int) -> tuple[int, int]:
    """``build_demo``'s ``delete_cache`` (frequency, age) for Gradio's cached files kept ``age`` seconds: swept
    every age / 3 s (:mod:`.cache`)."""
    return max(1, age // 3), age


def exposure_warning(host: str, port: int, checkpoint_dir: str | None = None) -> str | None:
    """The start-up warning for an explorer that listens beyond this machine (None for a loopback address)."""
    name = str(host).strip().strip("[]")
    if name.lower() == "localhost":
        return None
    try:
        if ipaddress.ip_address(name).is_loopback:
            return None
    except ValueError:
        pass  # a host name: assume it is reachable from elsewhere
    reach = f" and load the checkpoint files in {checkpoint_dir}" if checkpoint_dir else ""
    return (
        f"warning: the explorer listens on {host}:{port}, beyond this machine: whoever reaches it can run its "
        f"models on this machine{reach}; use --host 127.0.0.1 to keep it local"
    )


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
        demo = build_demo(
            spec,
            device=args.device,
            images=images,
            checkpoint_dir=args.checkpoint_dir,
            delete_cache=cache_sweep(args.cache_age),
        )
    except ModelError as err:
        sys.exit(f"error: {err}")
    warning = exposure_warning(args.host, args.port, args.checkpoint_dir)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    # no monitoring endpoints: the page keeps no per-event analytics for them (page._without_analytics)
    demo.launch(
        server_name=args.host,
        server_port=args.port,
        show_error=True,
        max_file_size=MAX_FILE_SIZE,
        enable_monitoring=False,
    )


if __name__ == "__main__":
    main()
