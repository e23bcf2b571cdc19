# Copyright (c) qtunet_monai contributors. Licensed under the Apache License, Version 2.0.
"""Small helpers shared by the bundles, the Auto3DSeg template and self-supervised pre-training."""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["unwrap_module", "unwrap_state_dict"]

#: keys under which checkpoints commonly nest the model's state dict (MONAI, timm, Lightning-style files)
STATE_KEYS = ("model", "state_dict", "network")
#: prefixes wrappers add to every key: DistributedDataParallel / DataParallel, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


def unwrap_module(module: torch.nn.Module) -> torch.nn.Module:
    """The network inside ``DistributedDataParallel`` / ``DataParallel`` and ``torch.compile`` wrappers."""
    while True:
        if isinstance(module, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            module = module.module
        elif isinstance(getattr(module, "_orig_mod", None), torch.nn.Module):  # torch.compile's OptimizedModule
            module = module._orig_mod
        else:
            return module


def unwrap_state_dict(state: Mapping) -> Mapping:
    """The model's tensors from a checkpoint: the state dict nested under ``model`` / ``state_dict`` /
    ``network`` if there is one, with a wrapper prefix (``module.``, ``_orig_mod.``) that every key
    carries removed."""
    for key in STATE_KEYS:
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
            break
    while state:  # wrappers nest (a compiled DDP module saves "_orig_mod.module.<name>")
        prefix = next((p for p in WRAPPER_PREFIXES if all(isinstance(k, str) and k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state
