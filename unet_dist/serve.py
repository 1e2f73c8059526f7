"""Kept for models logged before the serving package (issue 25): the ``serving_model.py`` MLflow
keeps with them runs ``from unet_dist.serve import PhotoSegmenter`` when it loads them. New code
imports :mod:`unet_dist.serving`.
"""
from unet_dist.serving.pyfunc import PhotoSegmenter

__all__ = ["PhotoSegmenter"]
