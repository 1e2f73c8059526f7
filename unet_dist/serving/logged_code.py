"""The code MLflow keeps with the served model ("models from code": no pickled Python object).

MLflow copies this file into the logged model and runs it when it loads the model; the class lives in
:mod:`unet_dist.serving.pyfunc`. (Models logged before the serving package keep a copy named
``serving_model.py`` that imports :mod:`unet_dist.serve`, kept for them.)
"""
import mlflow

from unet_dist.serving.pyfunc import PhotoSegmenter

mlflow.models.set_model(PhotoSegmenter())
