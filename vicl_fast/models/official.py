"""The authors' Neuroverse3D checkpoints <-> :class:`Neuroverse3D`.

Our parameter names are identical to the authors' (see
:mod:`vicl_fast.models.neuroverse3d`), so the conversion is: strip / add the
Lightning ``net.`` prefix (and a DDP ``module.`` prefix if present), infer the
configuration, and check every key and shape before loading.

Safe loading: files are read with ``torch.load(weights_only=True)``, which
never runs pickled code. A Lightning checkpoint whose ``hyper_parameters``
hold arbitrary Python objects cannot be read that way; then a ValueError
explains the risk and the ``trust_checkpoint=True`` opt-in (which unpickles
the file, i.e. runs code from it: only for files from a source you trust).
"""
from __future__ import annotations

import numbers
import os
import pickle
import re
from collections.abc import Mapping
from typing import Any

import torch

from vicl_fast.models.neuroverse3d import Neuroverse3D, parse_stage_channels

__all__ = ["load_official_neuroverse3d", "to_official_state_dict", "infer_official_config",
           "read_official_checkpoint"]

_LIGHTNING_PREFIX = "net."
_ANCHOR = "target_encoder.target_embedding.weight"


def read_official_checkpoint(path: str | os.PathLike, map_location: Any = "cpu", *,
                             trust_checkpoint: bool = False) -> Mapping[str, Any]:
    """``torch.load`` with ``weights_only=True``; unpickling only with ``trust_checkpoint=True``."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"checkpoint file not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_checkpoint:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"{path} holds pickled Python objects besides tensors (typically the Lightning "
                f"'hyper_parameters'), which torch.load(weights_only=True) refuses: {first}. "
                "Unpickling such a file runs arbitrary code from it. If you trust its source (e.g. the "
                "authors' release you downloaded yourself), call load_official_neuroverse3d(path, "
                "trust_checkpoint=True); otherwise re-save only its state_dict with a trusted "
                "PyTorch and load that.") from e
        return torch.load(path, map_location=map_location, weights_only=False)


def _strip_prefix(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Official key names without the Lightning ``net.`` / DDP ``module.`` prefixes."""
    keys = [k for k in sd if isinstance(sd[k], torch.Tensor)]
    for prefix in ("module.net.", "net.", "module."):
        hits = [k for k in keys if k.startswith(prefix)]
        if hits and any(k[len(prefix):] == _ANCHOR for k in hits):
            # other keys of a Lightning module (loss buffers, ...) are not the network's
            return {k[len(prefix):]: sd[k] for k in hits}
    return {k: sd[k] for k in keys}


_STAGE_KEY = re.compile(r"^context_unet\.enc_blocks\.(\d+)\.context_conv\.module\.layers\.0\.weight$")
_CONV_KEY = re.compile(r"^context_unet\.enc_blocks\.0\.context_conv\.module\.layers\.(\d+)\.weight$")


def infer_official_config(sd: Mapping[str, torch.Tensor]) -> dict[str, Any]:
    """Model configuration from the shapes of an official state dict (no ``net.`` prefix).

    Works for every configuration of the authors' constructor: the stages and
    their widths come from the context U-Net's per-stage residual units (present
    at every stage), not from the downsampling convs, which are absent where two
    neighbouring stages have the same width (a weightless MaxPool there).

    Returns ``dict(in_channels, out_channels, channels, convs_per_stage, spatial_dims)``.
    """
    if _ANCHOR not in sd:
        sample = ", ".join(list(sd)[:5])
        raise ValueError(f"not a Neuroverse3D state dict: key {_ANCHOR!r} is missing "
                         f"(first keys: {sample or 'none'})")
    emb = sd[_ANCHOR]
    spatial_dims = emb.dim() - 2
    widths = {int(m.group(1)): int(sd[key].shape[0]) for key in sd if (m := _STAGE_KEY.match(key))}
    n = len(widths)
    channels = [widths[k] for k in range(n)] if set(widths) == set(range(n)) else []
    convs = sum(1 for key in sd if _CONV_KEY.match(key))
    head = "target_decoder.output_block.block.1.weight"
    out_channels = int(sd[head].shape[0]) if head in sd else 1
    if not channels or convs < 1 or channels[0] != int(emb.shape[0]):
        raise ValueError(f"cannot infer the configuration: found stage widths {widths} (embedding width "
                         f"{int(emb.shape[0])}), {convs} convs per stage; is this a Neuroverse3D state dict?")
    return dict(in_channels=int(emb.shape[1]), out_channels=out_channels, channels=channels,
                convs_per_stage=convs, spatial_dims=spatial_dims)


def _config_from_hparams(hp: Mapping[str, Any] | None) -> dict[str, Any]:
    if not hp:
        return {}
    hp = dict(hp)
    out: dict[str, Any] = {}
    if hp.get("nb_inner_channels") is not None:
        out["channels"] = hp["nb_inner_channels"]  # the Lightning module: stages = its length
    if hp.get("nb_conv_layers_per_stage") is not None:
        out["convs_per_stage"] = int(hp["nb_conv_layers_per_stage"])
    return out


def _mismatch_report(model: torch.nn.Module, sd: Mapping[str, torch.Tensor], limit: int = 10) -> list[str]:
    own = model.state_dict()
    problems = []
    for k in own:
        if k not in sd:
            problems.append(f"missing key {k} (expected shape {tuple(own[k].shape)})")
        elif tuple(sd[k].shape) != tuple(own[k].shape):
            problems.append(f"shape mismatch {k}: checkpoint {tuple(sd[k].shape)} "
                            f"vs model {tuple(own[k].shape)}")
    for k in sd:
        if k not in own:
            problems.append(f"unexpected key {k} (shape {tuple(sd[k].shape)})")
    return problems


def load_official_neuroverse3d(checkpoint: str | os.PathLike | Mapping[str, Any],
                               map_location: Any = "cpu", *,
                               trust_checkpoint: bool = False, **model_kwargs) -> Neuroverse3D:
    """Build a :class:`Neuroverse3D` holding the authors' weights.

    Args:
        checkpoint: a path to the authors' Lightning checkpoint (``state_dict`` with
            keys ``net.*``, ``hyper_parameters`` with ``nb_inner_channels`` /
            ``nb_conv_layers_per_stage``), a path to a plain state dict, an
            already loaded dict of either kind, or a dict with ``state_dict`` and
            ``inner_channels`` (the test fixture's layout).
        map_location: passed to ``torch.load``.
        trust_checkpoint: allow unpickling non-tensor objects (runs code from the file).
        model_kwargs: extra :class:`Neuroverse3D` options (``fast``, ``apsp_mode``, ...).
    Returns:
        The model (eval mode), parameters in the checkpoint's dtype.
    Raises:
        ValueError: unreadable/untrusted file, or keys/shapes that do not match
            (the first mismatches are listed).
    """
    obj = checkpoint
    if isinstance(checkpoint, (str, os.PathLike)):
        obj = read_official_checkpoint(checkpoint, map_location, trust_checkpoint=trust_checkpoint)
    if not isinstance(obj, Mapping):
        raise TypeError(f"checkpoint must be a path or a dict, got {type(obj).__name__}")
    hparams: Mapping[str, Any] | None = None
    cfg: dict[str, Any] = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        sd_raw = obj["state_dict"]
        hp = obj.get("hyper_parameters") or obj.get("hparams")
        if isinstance(hp, Mapping):
            hparams = hp
        elif hp is not None and hasattr(hp, "__dict__"):  # e.g. argparse.Namespace
            hparams = vars(hp)
        if obj.get("inner_channels") is not None:  # the authors' constructor argument (int or list)
            cfg["channels"] = obj["inner_channels"]
    else:
        sd_raw = obj
    sd = _strip_prefix(sd_raw)
    inferred = infer_official_config(sd)
    given = {**_config_from_hparams(hparams), **cfg}
    for key, val in given.items():
        if key == "channels":  # an int / [c] means that width at every stage (the authors' parse_channels)
            one = isinstance(val, numbers.Integral) or len(val) == 1
            try:
                val = list(parse_stage_channels(val, len(inferred["channels"]) if one else None))
            except (TypeError, ValueError) as e:  # e.g. a string, or a length that is not a width list
                raise ValueError(f"checkpoint hyper-parameter channels={val!r} is not valid: {e}") from e
        if val != inferred[key]:
            raise ValueError(f"checkpoint hyper-parameter {key}={val} does not match its tensors "
                             f"({key}={inferred[key]} from the shapes); the file is inconsistent")
    model = Neuroverse3D(**inferred, **model_kwargs)
    problems = _mismatch_report(model, sd)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"checkpoint does not match Neuroverse3D{tuple(inferred['channels'])} "
                         f"({len(problems)} problems):\n  {shown}{more}")
    dtypes = {v.dtype for v in sd.values()}
    if len(dtypes) == 1:
        model = model.to(dtypes.pop())
    model.load_state_dict(sd, strict=True)
    return model.eval()


def to_official_state_dict(model: Neuroverse3D, lightning_prefix: bool = False) -> dict[str, torch.Tensor]:
    """The model's weights under the authors' key names (``net.``-prefixed for Lightning).

    Tensors are detached contiguous copies, safe to save or to load into the
    authors' model.
    """
    prefix = _LIGHTNING_PREFIX if lightning_prefix else ""
    return {prefix + k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}
