"""The ``tensorpack`` backend: the graph of :mod:`maskrcnn_serving.modeling.tensorpack_network` in a TF1-style
session, one image per forward call (the exact reference path of the seed tensorpack container)."""

from __future__ import annotations

from collections.abc import Sequence

import tensorflow as tf

from maskrcnn_serving.backends.base import Backend, PredictOptions, PreparedImage
from maskrcnn_serving.model_dir import ModelBundle
from maskrcnn_serving.modeling.tensorpack_network import TensorpackGraph, build_session
from maskrcnn_serving.settings import Settings
from maskrcnn_serving.structures import Detections


class TensorpackBackend(Backend):
    """tensorpack-layer graph in a TF1-style session; one image per forward call."""

    name = "tensorpack"
    max_batch_size = 1

    def __init__(self, bundle: ModelBundle, session, tensors: TensorpackGraph) -> None:
        super().__init__(bundle)
        self._session = session
        self.tensors = tensors


    @classmethod
    def from_bundle(cls, bundle: ModelBundle, settings: Settings | None = None) -> TensorpackBackend:
        session, tensors = build_session(bundle)
        return cls(bundle, session, tensors)

    @property
    def inference_graph(self) -> tuple[tf.Graph, list[tf.Tensor]]:
        """The session graph and the tensors one image's forward call fetches (for modeling/kernel_audit.py)."""
        return self._session.graph, self.tensors.outputs

    def forward(self, batch: Sequence[PreparedImage], options: PredictOptions) -> list[Detections]:
        if len(batch) != 1:
            raise ValueError(f"the tensorpack backend runs one image per call, got {len(batch)}")
        image = batch[0]
        feed = {self.tensors.image: image.resized}
        if options.score_threshold is not None:
            feed[self.tensors.score_threshold] = options.score_threshold
        if options.max_detections is not None:
            feed[self.tensors.max_detections] = options.max_detections
        outputs = self._session.run(self.tensors.outputs, feed)
        masks = outputs[3] if len(outputs) > 3 else None
        return [self.detections(image, outputs[0], outputs[1], outputs[2], masks)]

    def close(self) -> None:
        self._session.close()
