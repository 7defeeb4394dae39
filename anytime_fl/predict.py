"""Anytime inference with trained adapters.

    anytime-fl predict RUN_DIR_OR_ADAPTERS FILE [FILE ...] [--exit N | --threshold T]

Loads the frozen backbone and the adapter file a run wrote
(`adapters.safetensors`, whose metadata holds the run config), and predicts
for images (PNG/JPEG, anything PIL reads) or audio files (.wav/.flac, turned
into a log-mel image by the speech task). `--exit N` stops every input at
exit N; `--threshold T` stops each input at the first exit whose softmax
confidence reaches T, in [0, 1] (0 = always exit 1). Without either, the last exit answers. For each
input it prints the class, the exit used, the blocks run and the FLOPs
spent (torch's FlopCounterMode, see adapters/anytime.py).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from pathlib import Path

import numpy as np
import torch

from core.run_files import WEIGHTS as WEIGHTS_NAME

AUDIO_SUFFIXES = (".wav", ".flac")


class PredictError(ValueError):
    """Bad input to the predict command; the message names the file or option."""


def _adapter_file(path: str) -> Path:
    p = Path(path).expanduser()
    if p.is_dir():
        p = p / WEIGHTS_NAME
    if not p.is_file():
        raise PredictError(
            f"{p}: no adapter file (expected a run directory holding {WEIGHTS_NAME}, or the file itself)"
        )
    return p


def load_run(path: str, backbone_weights: str | None = None):
    """(model with trained adapters, input spec, run config) from an adapter file."""
    from safetensors import SafetensorError, safe_open
    from safetensors.numpy import load_file

    from adapters.backbone import BackboneError
    from adapters.build import build_model, input_spec_fields
    from adapters.state import set_state
    from core.config import BEFORE_KEY, KEYS, ConfigError, validate
    from fedtasks.base import InputSpec

    file = _adapter_file(path)
    try:
        with safe_open(str(file), "np") as fh:
            meta = fh.metadata() or {}
        arrays = load_file(str(file))
    except (SafetensorError, OSError) as err:
        raise PredictError(f"{file}: not a readable safetensors file ({err})") from err
    if "config" not in meta:
        raise PredictError(f"{file}: no run config in its metadata; was it written by the anytime-fl server?")
    known = {k.name for k in KEYS}
    stored = {**BEFORE_KEY, **json.loads(meta["config"])}
    cfg = {k: v for k, v in stored.items() if k in known}  # keys of older/newer versions are irrelevant here
    if backbone_weights is not None:
        cfg["backbone-weights"] = backbone_weights
    try:
        cfg = validate(cfg)
    except ConfigError as err:
        raise PredictError(f"{file}: {err}") from err
    damaged = next((k for k, v in arrays.items() if v.dtype.kind == "f" and not np.isfinite(v).all()), None)
    if damaged is not None:
        raise PredictError(f"{file}: array {damaged!r} holds NaN or infinite values; the run that wrote it diverged")
    if "heads.0.fc.weight" not in arrays:
        raise PredictError(f"{file}: holds no exit heads (heads.0.fc.weight missing)")
    num_classes = int(arrays["heads.0.fc.weight"].shape[0])
    try:
        model = build_model(cfg, num_classes)
    except BackboneError as err:
        raise PredictError(f"{err} (the run's backbone; override it with --backbone-weights PATH)") from err
    try:
        set_state(model, arrays)
    except (KeyError, ValueError) as err:
        raise PredictError(f"{file}: does not fit the model its config describes: {err}") from err
    return model.eval(), InputSpec(**input_spec_fields(model)), cfg


def _image(path: Path, spec) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as img:
            img = img.convert("L" if spec.in_chans == 1 else "RGB")
            return np.asarray(img, dtype=np.float32) / 255.0
    except (UnidentifiedImageError, OSError) as err:
        raise PredictError(f"{path}: not an image PIL can read ({err})") from err


def _audio(path: Path) -> np.ndarray:
    try:
        audio = importlib.import_module("fedtasks.audio")
    except ModuleNotFoundError as err:
        if err.name != "fedtasks.audio":
            raise
        raise PredictError(
            f"{path}: audio input needs the speech task (fedtasks/audio.py), which this installation does not have"
        ) from None
    features = getattr(audio, "file_features", None)
    if features is None:
        raise PredictError(f"{path}: fedtasks.audio provides no file_features(path) to turn audio into a log-mel image")
    from fedtasks.base import DataError

    try:
        return np.asarray(features(str(path)), dtype=np.float32)
    except DataError as err:
        raise PredictError(str(err)) from None


def load_inputs(files: list[str], spec) -> torch.Tensor:
    """Every file brought to the backbone's input, (N, C, S, S)."""
    from fedtasks.base import to_backbone

    batch = []
    for name in files:
        path = Path(name).expanduser()
        if not path.is_file():
            raise PredictError(f"{path}: no such file")
        pixels = _audio(path) if path.suffix.lower() in AUDIO_SUFFIXES else _image(path, spec)
        batch.append(to_backbone(pixels[None], spec))
    return torch.cat(batch)


def _class_names(cfg) -> list[str] | None:
    try:
        from fedtasks.task import get_task

        return list(getattr(get_task(cfg), "class_names", None) or []) or None
    except Exception:  # noqa: BLE001  (names are a nicety; never fail a prediction for them)
        return None


def predict(
    model, x: torch.Tensor, *, exit_at: int | None = None, threshold: float | None = None, max_depth: int | None = None
) -> list[dict]:
    """Per input: class, confidence, exit, blocks run and FLOPs spent."""
    from adapters.anytime import early_exit, flops_per_exit

    if exit_at is not None:
        if not 1 <= exit_at <= model.num_blocks:
            raise PredictError(f"--exit must be in 1..{model.num_blocks}, got {exit_at}")
        # A fixed exit is early exit with a threshold no input reaches, capped there.
        threshold, max_depth = 2.0, exit_at
    elif threshold is None:
        threshold = 2.0
    depth = model.num_blocks if max_depth is None else max_depth
    if not 1 <= depth <= model.num_blocks:
        raise PredictError(f"--max-depth must be in 1..{model.num_blocks}, got {depth}")
    out = early_exit(model, x, threshold, depth)
    if not torch.isfinite(out.logits).all():
        raise PredictError(
            "the model's outputs are not finite (NaN or infinite); check the backbone and adapter weights"
        )
    flops = flops_per_exit(model)
    return [
        {
            "class": int(z.argmax()),
            "confidence": round(float(c), 4),
            "exit": int(e),
            "blocks": int(e),
            "flops": flops[int(e) - 1],
        }
        for z, e, c in zip(out.logits, out.exits, out.confidence)
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anytime-fl predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("adapters", help=f"a run directory (holding {WEIGHTS_NAME}) or the adapter file")
    parser.add_argument("files", nargs="+", help="images (PNG/JPEG) or audio files (.wav/.flac)")
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--exit", type=int, help="stop every input at this exit (1 = after the first block)")
    how.add_argument(
        "--threshold", type=float, help="stop each input at the first exit whose softmax confidence >= this (0..1)"
    )
    parser.add_argument("--max-depth", type=int, default=None, help="deepest exit --threshold may use (device budget)")
    parser.add_argument(
        "--backbone-weights", default=None, help="backbone weights file to use instead of the one in the run config"
    )
    parser.add_argument("--json", action="store_true", help="one JSON object per input instead of a table")
    args = parser.parse_args(argv)
    try:
        if args.threshold is not None and not 0.0 <= args.threshold <= 1.0:  # also refuses nan
            raise PredictError(f"--threshold must be in [0, 1], got {args.threshold}")
        if args.max_depth is not None and args.max_depth < 1:
            raise PredictError(f"--max-depth must be >= 1, got {args.max_depth}")
        model, spec, cfg = load_run(args.adapters, args.backbone_weights)
        if not cfg["backbone-weights"] and not cfg["pretrained"]:
            print(
                "anytime-fl predict: warning: the run used a random backbone (backbone-weights=''); "
                "this one is random too, so predictions mean nothing",
                file=sys.stderr,
            )
        rows = predict(
            model, load_inputs(args.files, spec), exit_at=args.exit, threshold=args.threshold, max_depth=args.max_depth
        )
    except PredictError as err:
        print(f"anytime-fl predict: {err}", file=sys.stderr)
        return 2
    names = _class_names(cfg)
    full = model.num_blocks
    for name, row in zip(args.files, rows):
        row = {"file": name, **row, "label": names[row["class"]] if names and row["class"] < len(names) else None}
        if args.json:
            print(json.dumps(row, allow_nan=False))  # NaN is not JSON; predict() refused it above
        else:
            label = f" ({row['label']})" if row["label"] else ""
            print(
                f"{name}: class {row['class']}{label}  confidence {row['confidence']:.3f}  "
                f"exit {row['exit']}/{full}  blocks {row['blocks']}  {row['flops'] / 1e6:.2f} MFLOPs"
            )
    if not args.json and len(rows) > 1:
        print(
            f"mean: {np.mean([r['blocks'] for r in rows]):.2f} blocks, "
            f"{np.mean([r['flops'] for r in rows]) / 1e6:.2f} MFLOPs per input"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
