from unet_dist.preprocess.cli import main

main()
