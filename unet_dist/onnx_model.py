"""An exported U-Net run by onnxruntime, callable like the PyTorch one.

:class:`OnnxUNet` has what :func:`unet_dist.segment.predict_logits` asks of a model (``depth``,
``padding``, logits for an ``[N, 3, H, W]`` tensor), so an ONNX file goes through the same
overlap-tile path, normalisation and argmax as the PyTorch model: ``--model FILE.onnx`` in
``predict`` and ``batch_predict``. The graph is :meth:`UNet.body`; the padding of 'same' models and
the size check of 'valid' ones go around it in :func:`unet_dist.model.around_body`, as in ``UNet.forward``.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from unet_dist.config import Config, from_dict
from unet_dist.errors import UnetDistError
from unet_dist.model import around_body

META_CONFIG = "unet_dist.config"  # the training config (JSON) in the file's metadata_props
INPUT, OUTPUT = "image", "logits"


class OnnxUNet:
    def __init__(self, path: str | Path, providers: list[str] | None = None, threads: int = 0):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(str(path), opts, providers=providers or ["CPUExecutionProvider"])
        except Exception as e:  # onnxruntime raises its own types for a missing, truncated or foreign file
            raise UnetDistError(f"{path}: not a loadable ONNX model ({str(e).splitlines()[0][:300]})") from None
        meta = self.session.get_modelmeta().custom_metadata_map
        if META_CONFIG not in meta:
            raise UnetDistError(f"{path}: not exported by unet_dist.export (no {META_CONFIG} in its metadata)")
        self.config: Config = from_dict(json.loads(meta[META_CONFIG]), f"{path} metadata")
        self.depth, self.padding = self.config.model.depth, self.config.model.padding
        self.training = False

    def eval(self) -> "OnnxUNet":
        return self

    def to(self, device) -> "OnnxUNet":
        if torch.device(device).type != "cpu":
            raise UnetDistError(f"an ONNX model runs on onnxruntime's CPU provider here, not on {device}")
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return around_body(self._body, x, self.depth, self.padding)

    def _body(self, x: torch.Tensor) -> torch.Tensor:
        feed = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        return torch.from_numpy(self.session.run([OUTPUT], {INPUT: feed})[0])
