"""Blocks whose activations are computed again in the backward pass instead of kept (#20).

A training step keeps every block's intermediate tensors for its backward pass; in MobileViT's
early MobileNetV2 blocks those are the expanded maps at high resolution, most of a step's memory
(XS at 256x256, batch 32: about 3 of its 5 GB). `recomputed(fn)` keeps only the block's input and
runs the block again when its gradient is needed (TensorFlow's `tf.recompute_grad`, which is what
`keras.remat` is on this backend). Keras' `RematScope` wraps single layers, which keeps as much as
before for a conv-BN-SiLU chain: a whole block has to be the unit, hence this module.

Two things differ between the forward run and the replay, and this module makes them agree:
- BatchNorm's moving statistics are updated once, in the forward run (a replay would apply the
  same batch's statistics twice): `replaying()` tells the layer to skip its update;
- random ops (stochastic depth) draw once: `shared(layer, draw)` hands the replay the forward
  run's draw.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable

import tensorflow as tf

_state = threading.local()  # the block being run: its mode and its forward draws


@contextlib.contextmanager
def _running(replay: bool, draws: dict):
    previous = getattr(_state, "current", None)
    _state.current = (replay, draws)
    try:
        yield
    finally:
        _state.current = previous


def replaying() -> bool:
    """Whether the caller runs inside the backward pass's second run of a block."""
    current = getattr(_state, "current", None)
    return bool(current and current[0])


def shared(owner: object, draw: Callable[[], tf.Tensor]) -> tf.Tensor:
    """`draw()` outside recomputed blocks and in their forward run; the forward run's tensor
    again in the replay (a dropped path stays dropped)."""
    current = getattr(_state, "current", None)
    if current is None:
        return draw()
    replay, draws = current
    if not replay:
        draws[id(owner)] = draw()
    return draws[id(owner)]


def recomputed(fn: Callable[[tf.Tensor], tf.Tensor]) -> Callable[[tf.Tensor], tf.Tensor]:
    """`fn` (one tensor in, one out) with its intermediates recomputed in the backward pass.

    Make one per forward pass: the first call is the forward run, any later one the replay."""
    draws: dict = {}
    calls = []

    @tf.recompute_grad
    def run(x):
        replay = bool(calls)
        calls.append(replay)
        with _running(replay, draws):
            return fn(x)

    return run
