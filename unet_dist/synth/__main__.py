"""``python -m unet_dist.synth``: see :mod:`unet_dist.synth.cli`."""
from unet_dist.synth.cli import main

main()
