"""``RNGState``: every random number generator a training run draws from, as checkpointable state.

A resumed run is bit-exact only if it draws the same random numbers as an uninterrupted one:
dropout masks, data shuffling and augmentation read Python's, NumPy's and torch's generators.
"""

from __future__ import annotations

import random
import warnings
from typing import Any

import torch


class RNGState:
    """The Python, NumPy (when installed), torch CPU and every CUDA device random state.

    Its state is captured when the checkpoint is saved and set back when it is restored, so a
    resumed run draws the same random numbers as an uninterrupted one.

    Example:
        >>> import torch, torchckpt
        >>> rng = torchckpt.RNGState()
        >>> state = rng.state_dict()
        >>> a = torch.rand(2)
        >>> rng.load_state_dict(state)
        >>> torch.equal(a, torch.rand(2))
        True
    """

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
        state["cuda"] = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []
        np = _numpy()
        if np is not None:
            name, keys, pos, has_gauss, cached = np.random.get_state()
            state["numpy"] = {
                "algorithm": str(name),
                "keys": torch.from_numpy(keys.astype(np.uint32, copy=True)),
                "pos": int(pos),
                "has_gauss": int(has_gauss),
                "cached_gaussian": float(cached),
            }
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        random.setstate(state["python"])
        torch.set_rng_state(state["torch"])
        cuda = state.get("cuda", [])
        available = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if cuda and len(cuda) != available:
            warnings.warn(
                f"The checkpoint holds RNG states for {len(cuda)} CUDA devices but {available} are available; "
                f"restoring the first {min(len(cuda), available)}.",
                stacklevel=2,
            )
        for i, s in enumerate(cuda[:available]):
            torch.cuda.set_rng_state(s, i)
        np = _numpy()
        if np is not None and "numpy" in state:
            s = state["numpy"]
            np.random.set_state(
                (s["algorithm"], s["keys"].numpy(), s["pos"], s["has_gauss"], s["cached_gaussian"])
            )

    def __repr__(self) -> str:
        return "RNGState()"


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:
        return None
    return numpy
