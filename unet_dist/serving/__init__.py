"""The served model, below training: nothing here imports :mod:`unet_dist.train` or tracking.

- ``pyfunc.py``: the MLflow pyfunc (photos in, masks out) and its input checks and limits;
- ``logged_code.py``: the file MLflow keeps with a logged model and runs to build the pyfunc;
- ``model_log.py``: :func:`~unet_dist.serving.model_log.log_model`, which training calls;
- ``loading.py``: :func:`~unet_dist.serving.loading.load_model` from a checkpoint, ``runs:/`` or
  ``models:/`` (``evaluate``, ``predict``, the demo).
"""
