"""The preprocess job (raw dataset -> shards + manifest.json), in four parts: :mod:`.plan` (units,
fingerprints, the resume check), :mod:`.worker` (the pool's tasks), :mod:`.manifest` and :mod:`.job`
(the run itself); :mod:`.cli` is ``python -m unet_dist.preprocess``."""
from unet_dist.preprocess.cli import main
from unet_dist.preprocess.job import run

__all__ = ["main", "run"]
