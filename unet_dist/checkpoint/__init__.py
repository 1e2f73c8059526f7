"""Checkpoint files: writing, publishing, finding and loading them (:mod:`.files`).

Below ``train/`` so that evaluation, prediction and serving load a checkpoint without importing the
training code. ``from unet_dist import checkpoint`` then ``checkpoint.find_latest(run_dir)``.
"""
from unet_dist.checkpoint.files import (META_FILE, STATE_FILE, check_model, find_latest, load_state,
                                        load_weights, meta, publish, read_meta, resolve, step_dir, write)

__all__ = ["META_FILE", "STATE_FILE", "check_model", "find_latest", "load_state", "load_weights", "meta",
           "publish", "read_meta", "resolve", "step_dir", "write"]
