"""The ``tensorpack`` backend: the graph of :mod:`maskrcnn_serving.modeling.tensorpack_network` in a TF1-style
session, one image per forward call (the exact reference path of the seed tensorpack container)."""

from __future__ import annotations

from collections.abc import Sequence

from maskrcnn_serving.backends.base import Backend, InferenceGraph, PredictOptions, PreparedImage
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
    def from_bundle(
        cls, bundle: ModelBundle, settings: Settings | None = None, for_gpu: bool | None = None
    ) -> TensorpackBackend:
        """The graph computes in float32, NHWC, on any device: the settings and ``for_gpu`` change nothing."""
        session, tensors = build_session(bundle)
        return cls(bundle, session, tensors)

    def inference_graph(self, batch_size: int = 1) -> InferenceGraph:
        """The session graph and every tensor a forward call may fetch; the graph takes one image."""
        if batch_size != 1:
            raise ValueError(f"the tensorpack backend runs one image per call, not {batch_size}")
        outputs = [*self.tensors.outputs, self.tensors.embeddings, self.tensors.image_embedding]
        return InferenceGraph(self._session.graph, outputs, self.description["precision"])

    def forward(self, batch: Sequence[PreparedImage], options: PredictOptions) -> list[Detections]:
        if len(batch) != 1:
            raise ValueError(f"the tensorpack backend runs one image per call, got {len(batch)}")
        image = batch[0]
        feed = {self.tensors.image: image.resized}
        if options.score_threshold is not None:
            feed[self.tensors.score_threshold] = options.score_threshold
        if options.max_detections is not None:
            feed[self.tensors.max_detections] = options.max_detections
        fetches = {"detections": self.tensors.outputs}
        if options.embeddings:
            fetches["search"] = [self.tensors.embeddings, self.tensors.image_embedding]
        outputs = self._session.run(fetches, feed)
        boxes, scores, labels, *masks = outputs["detections"]
        return [self.detections(image, boxes, scores, labels, masks[0] if masks else None, *outputs.get("search", ()))]

    def close(self) -> None:
        self._session.close()
