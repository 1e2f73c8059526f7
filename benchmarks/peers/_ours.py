"""Every name the peers take from ``unet_dist``, imported here and nowhere else in ``benchmarks/peers/``.

The peers share with this package only what the comparison must hold equal: the U-Net, the loss
and its class weights, the optimiser and learning-rate schedule, the config that sets them, the
fitted colour quantizer (so labels are identical) and the scoring (so every mIoU is computed one
way); and for benchmarks/bench_peers.py, ours' training stream at the Cityscapes size. A rename
inside the package changes this file alone.
"""
from __future__ import annotations

from unet_dist.config import from_dict, load_config, to_dict  # noqa: F401
from unet_dist.data.augment import Augment, to_device  # noqa: F401
from unet_dist.data.decode import MEAN, STD, decode_label, decode_photo  # noqa: F401
from unet_dist.data.quantize import Quantizer, lookup  # noqa: F401
from unet_dist.data.shards import (  # noqa: F401
    QUANTIZER, load_manifest, resize_label, resize_photo, shard_paths)
from unet_dist.data.stream import train_stream  # noqa: F401  (bench_peers.py: ours at the Cityscapes size)
from unet_dist.labels import IGNORE, NUM_CLASSES, id_to_train_id_lut  # noqa: F401
from unet_dist.losses import SegmentationLoss, class_weights  # noqa: F401
from unet_dist.metrics import confusion_matrix, scores  # noqa: F401
from unet_dist.model import UNet  # noqa: F401
from unet_dist.train.parts import lr_lambda, make_optimizer  # noqa: F401
