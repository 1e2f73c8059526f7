"""The synthetic dataset generator: street scenes (scenes.py) written in the raw layouts that the
readers in :mod:`unet_dist.data.sources` take (layouts.py); ``python -m unet_dist.synth`` (cli.py).

Why: the real sets need a login and gigabytes, yet the whole pipeline must run offline in seconds.
"""
from unet_dist.synth.layouts import LAYOUTS, write_dataset
from unet_dist.synth.scenes import ID_COLORS, render_scene, sample_rng

__all__ = ["ID_COLORS", "LAYOUTS", "render_scene", "sample_rng", "write_dataset"]
