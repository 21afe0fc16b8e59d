"""``--ep-config``: :class:`mxep.EPConfig` field overrides written as a JSON object, the way the
benchmarks and scripts take kernel settings on their command lines (nothing is read from the
environment: each setting becomes the ``config=`` of its own ``mxep.Buffer``)."""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict

import torch

from mxep.ep.config import EPConfig, KernelTiles, default_config

__all__ = ["EP_CONFIG_HELP", "parse_ep_config", "ep_config", "ep_config_dict"]

EP_CONFIG_HELP = (
    "EPConfig field overrides as a JSON object, applied to mxep.default_config(device, hidden): "
    "scalars by name ({\"spread_parts\": 32, \"hw_cast\": false}); a KernelTiles field "
    "(dispatch, combine, copy, pull) as an object of the tile fields to change "
    "({\"dispatch\": {\"warps\": 4, \"programs_per_sm\": 16}}) or a full "
    "[block_m, block_n, warps, programs_per_sm] list. '{}' (default): the defaults.")
_TILE_FIELDS = tuple(f.name for f in dataclasses.fields(KernelTiles))


def parse_ep_config(text: str | dict | None) -> dict:
    """Validate an ``--ep-config`` JSON object (see ``EP_CONFIG_HELP``) and return it as a dict.
    Checked against :class:`mxep.EPConfig` at once (unknown fields, wrong types, tiles that are
    not powers of two), so a launcher fails before it starts any worker."""
    if text is None or text == "":
        return {}
    overrides = json.loads(text) if isinstance(text, str) else dict(text)
    if not isinstance(overrides, dict):
        raise SystemExit(f"--ep-config must be a JSON object, got {text!r}")
    try:
        _apply(EPConfig(), overrides)
    except (TypeError, ValueError) as exc:
        raise SystemExit(f"--ep-config {text!r}: {exc}") from None
    return overrides


def _apply(base: EPConfig, overrides: dict) -> EPConfig:
    names = {f.name: f for f in dataclasses.fields(EPConfig)}
    changes = {}
    for key, value in overrides.items():
        if key not in names:
            raise ValueError(f"unknown EPConfig field {key!r} (fields: {', '.join(names)})")
        current = getattr(base, key)
        if isinstance(current, KernelTiles):
            if isinstance(value, (list, tuple)):
                value = KernelTiles(*value)
            elif isinstance(value, dict):
                bad = [k for k in value if k not in _TILE_FIELDS]
                if bad:
                    raise ValueError(f"unknown KernelTiles field(s) {bad} in {key!r} (fields: {', '.join(_TILE_FIELDS)})")
                value = dataclasses.replace(current, **value)
            else:
                raise TypeError(f"EPConfig.{key} takes an object of KernelTiles fields or a 4-element list, "
                                f"got {value!r}")
        changes[key] = value
    return dataclasses.replace(base, **changes)


def ep_config(overrides: dict | str | None, device: torch.device | str | None = None,
              hidden: int | None = None) -> EPConfig:
    """The :class:`mxep.EPConfig` of ``overrides`` (a dict from :func:`parse_ep_config`, or its
    JSON text) on top of ``mxep.default_config(device, hidden)``."""
    if not isinstance(overrides, dict):
        overrides = parse_ep_config(overrides)
    return _apply(default_config(device, hidden), overrides)


def ep_config_dict(cfg: EPConfig) -> dict:
    """``cfg`` as plain JSON data (the tiles as objects), for result headers."""
    return asdict(cfg)
