"""Predict a whole dataset on a Ray cluster (``python -m unet_dist.batch_predict``).

Ray Data streams the photos through three stages: CPU tasks read and decode them
(:func:`~unet_dist.batch.stages.decode`), a fixed pool of actors, one model each and a GPU each when
the cluster has GPUs, predicts (:class:`~unet_dist.batch.stages.Predictor`), and CPU tasks encode
and write the masks (:func:`~unet_dist.batch.stages.write`). Every mask goes through the same
functions as ``predict`` (:mod:`unet_dist.segment`, :mod:`unet_dist.mask_files`), so the files are
the same bytes. :mod:`.inputs` lists what to predict and what is already done; :mod:`.job` runs it,
prints progress and logs an MLflow inference run.
"""
