"""``python -m unet_dist.tracking``: see :mod:`unet_dist.tracking.cli`."""
from unet_dist.tracking.cli import main

main()
