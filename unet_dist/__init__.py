"""unet_dist: U-Net segmentation trained on clusters."""
__version__ = "0.1.0"
