"""The code MLflow keeps with the served model ("models from code": no pickled Python object).

MLflow runs this file when it loads the model; the class lives in :mod:`unet_dist.serve`.
"""
import mlflow

from unet_dist.serve import PhotoSegmenter

mlflow.models.set_model(PhotoSegmenter())
