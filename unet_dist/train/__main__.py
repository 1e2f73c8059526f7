"""``python -m unet_dist.train``: see :mod:`unet_dist.train.cli`."""
from unet_dist.train.cli import main

main()
