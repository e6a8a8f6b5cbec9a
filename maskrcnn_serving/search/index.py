"""The instance index: every detected object of a collection of images, searchable by its embedding, in Milvus.

Two collections per index (``NAME`` and ``NAME_images``):

* ``NAME``: one row per instance: ``vector`` (the instance embedding, cosine), ``image`` (the path it was found in),
  ``bbox`` (COCO xywh floats, image pixels), ``category`` / ``category_id``, ``score``, ``mask`` (COCO compressed
  RLE counts of the full-image mask, with ``height`` / ``width``) and ``thumbnail`` (a small JPEG, base64), so that
  a server can show an instance without reading any file.
* ``NAME_images``: one row per indexed image (its image embedding, size and instance count). It is written after
  the image's instances, so an image is indexed once its row exists: a build that stops half-way resumes there, and
  an image whose instances were written but not its row is cleaned and indexed again (nothing doubles).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import cv2
import numpy as np

from maskrcnn_serving.errors import DatabaseError, DimensionMismatch
from maskrcnn_serving.search.database import connect

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_COLLECTION = "instances"
THUMBNAIL_SIZE = 96  # longest side in pixels
# HNSW: a graph index that both Milvus Lite (faiss) and Milvus servers build; search explores HNSW_EF candidates.
HNSW_BUILD = {"M": 16, "efConstruction": 64}
HNSW_EF = 64
MAX_TEXT = 65535  # Milvus VARCHAR limit
MAX_PATH = 4096
_INSTANCE_FIELDS = ["image", "bbox", "category", "category_id", "score"]


@dataclass(frozen=True)
class Neighbour:
    """One indexed instance found near a query: ``distance`` is 1 - cosine similarity (0 = same direction)."""

    id: int
    image: str
    bbox: list[float]
    category_name: str
    score: float
    distance: float

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "image": self.image, "bbox": self.bbox, "category_name": self.category_name,
                "score": self.score, "distance": self.distance}


def escape(text: str) -> str:
    """``text`` as a string literal of Milvus's filter language."""
    return json.dumps(text)


def thumbnail_jpeg(image: np.ndarray, xywh: Sequence[float], size: int = THUMBNAIL_SIZE) -> bytes:
    """A JPEG of the box (with a 10 % margin) scaled so that its longest side is at most ``size``."""
    height, width = image.shape[:2]
    x, y, w, h = xywh
    margin = 0.1 * max(w, h)
    x0, y0 = max(0, int(x - margin)), max(0, int(y - margin))
    x1, y1 = min(width, int(np.ceil(x + w + margin))), min(height, int(np.ceil(y + h + margin)))
    crop = image[y0:max(y1, y0 + 1), x0:max(x1, x0 + 1)]
    scale = size / max(crop.shape[:2])
    if scale < 1:
        crop = cv2.resize(crop, (max(1, round(crop.shape[1] * scale)), max(1, round(crop.shape[0] * scale))),
                          interpolation=cv2.INTER_AREA)
    return cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, 80])[1].tobytes()


class InstanceIndex:
    """A handle on one index (two collections) in one database; see the module docstring."""

    def __init__(self, db: str, collection: str, client) -> None:
        self.db = db
        self.collection = collection
        self.images_collection = f"{collection}_images"
        self._client = client

    # --------------------------------------------------------------------------------------------- opening
    @classmethod
    def open(
        cls,
        db: str,
        collection: str = DEFAULT_COLLECTION,
        dim: int | None = None,
        image_dim: int | None = None,
        create: bool = False,
    ) -> InstanceIndex:
        """Open the index ``collection`` of ``db``. With ``dim``, its vectors must have that length
        (:class:`DimensionMismatch` otherwise); with ``create``, a missing index is created (``dim`` and
        ``image_dim`` needed). Raises :class:`DatabaseError` for a database that cannot be used."""
        if not collection.replace("_", "").isalnum() or not collection[0].isalpha() or len(collection) > 200:
            raise DatabaseError(f"--collection {collection!r}: use letters, digits and underscores, starting with a "
                                "letter.")
        index = cls(db, collection, connect(db))
        if index._client.has_collection(collection):
            for name in (collection, index.images_collection):
                index._client.load_collection(name)  # a reopened collection starts released
            if dim is not None and index.dim != dim:
                raise DimensionMismatch(
                    f"The collection {collection!r} in {db} holds vectors of {index.dim} values; this model's have "
                    f"{dim}. Index into another --collection (or --db), or use the model that built it."
                )
        elif create:
            if dim is None or image_dim is None:
                raise ValueError("creating an index needs dim and image_dim")
            index._create(dim, image_dim)
        else:
            raise DatabaseError(f"{db} has no index {collection!r}; build one with `maskrcnn-serving index build`.")
        return index

    def _create(self, dim: int, image_dim: int) -> None:
        from pymilvus import DataType, MilvusClient

        instances = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        instances.add_field("id", DataType.INT64, is_primary=True)
        instances.add_field("vector", DataType.FLOAT_VECTOR, dim=dim)
        instances.add_field("image", DataType.VARCHAR, max_length=MAX_PATH)
        instances.add_field("bbox", DataType.ARRAY, element_type=DataType.FLOAT, max_capacity=4)
        instances.add_field("category", DataType.VARCHAR, max_length=512)
        instances.add_field("category_id", DataType.INT64)
        instances.add_field("score", DataType.FLOAT)
        instances.add_field("height", DataType.INT64)
        instances.add_field("width", DataType.INT64)
        instances.add_field("mask", DataType.VARCHAR, max_length=MAX_TEXT)
        instances.add_field("thumbnail", DataType.VARCHAR, max_length=MAX_TEXT)
        images = MilvusClient.create_schema(auto_id=True, enable_dynamic_field=False)
        images.add_field("id", DataType.INT64, is_primary=True)
        images.add_field("vector", DataType.FLOAT_VECTOR, dim=image_dim)
        images.add_field("image", DataType.VARCHAR, max_length=MAX_PATH)
        images.add_field("height", DataType.INT64)
        images.add_field("width", DataType.INT64)
        images.add_field("instances", DataType.INT64)
        for name, schema in ((self.images_collection, images), (self.collection, instances)):
            params = self._client.prepare_index_params()
            params.add_index(field_name="vector", index_type="HNSW", metric_type="COSINE", params=HNSW_BUILD)
            self._client.create_collection(name, schema=schema, index_params=params)

    def close(self) -> None:
        self._client.close()

    # ------------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        fields = self._call(lambda c: c.describe_collection(self.collection))["fields"]
        return int(next(f for f in fields if f["name"] == "vector")["params"]["dim"])

    def count(self) -> int:
        return int(self._call(lambda c: c.get_collection_stats(self.collection))["row_count"])

    def image_count(self) -> int:
        return int(self._call(lambda c: c.get_collection_stats(self.images_collection))["row_count"])

    # ------------------------------------------------------------------------------------------- writing
    def has_image(self, path: str) -> bool:
        rows = self._call(lambda c: c.query(self.images_collection, filter=f"image == {escape(path)}",
                                            output_fields=["id"], limit=1))
        return len(rows) > 0

    def add_image(self, path: str, image: np.ndarray, annotations: Sequence[dict], embeddings: np.ndarray,
                  image_embedding: np.ndarray) -> int:
        """Index one image: its instances (``annotations`` in the ``coco`` format, ``embeddings`` one row each)
        and then its image row. Instances of ``path`` left by an interrupted build are removed first."""
        if len(path) > MAX_PATH:
            raise DatabaseError(f"image path longer than {MAX_PATH} characters: {path[:80]}...")
        height, width = image.shape[:2]
        self._call(lambda c: c.delete(self.collection, filter=f"image == {escape(path)}"))
        rows = []
        for annotation, vector in zip(annotations, embeddings, strict=True):
            mask = annotation.get("segmentation", {}).get("counts", "")
            rows.append({
                "vector": np.asarray(vector, np.float32).tolist(),
                "image": path,
                "bbox": [float(v) for v in annotation["bbox"]],
                "category": annotation["category_name"],
                "category_id": int(annotation["category_id"]),
                "score": float(annotation["score"]),
                "height": int(height),
                "width": int(width),
                "mask": mask if len(mask) <= MAX_TEXT else "",  # an extreme outline is not kept, the box is
                "thumbnail": base64.b64encode(thumbnail_jpeg(image, annotation["bbox"])).decode(),
            })
        if rows:
            self._call(lambda c: c.insert(self.collection, rows))
        record = {"vector": np.asarray(image_embedding, np.float32).tolist(), "image": path, "height": int(height),
                  "width": int(width), "instances": len(rows)}
        self._call(lambda c: c.insert(self.images_collection, [record]))
        return len(rows)

    def flush(self) -> None:
        """Seal what was written (so that the database indexes it); ``index build`` calls it at the end."""
        for name in (self.collection, self.images_collection):
            self._call(lambda c, name=name: c.flush(name))

    def reload(self) -> None:
        """Release and load the collections again, as a newly started server finds them (the database builds its
        vector index of sealed data on load)."""
        for name in (self.collection, self.images_collection):
            self._call(lambda c, name=name: c.release_collection(name))
            self._call(lambda c, name=name: c.load_collection(name))

    def insert_rows(self, rows: Sequence[dict]) -> None:
        """Insert instance rows as they are (every field of the instance schema but ``id``): for tests and
        benchmarks that fill an index without images. Use :meth:`add_image` to index images."""
        self._call(lambda c: c.insert(self.collection, list(rows)))

    # ------------------------------------------------------------------------------------------- reading
    def search(self, vectors: np.ndarray, k: int, category_ids: Sequence[int] | None = None) -> list[list[Neighbour]]:
        """The ``k`` nearest indexed instances of each vector (N, E). With ``category_ids`` (one per vector), only
        instances of that category are searched, by a filter inside the database."""
        vectors = np.asarray(vectors, np.float32).reshape(len(vectors), -1)
        results: list[list[Neighbour]] = [[] for _ in range(len(vectors))]
        if len(vectors) == 0:
            return results
        groups: dict[int | None, list[int]] = {}
        for row in range(len(vectors)):
            groups.setdefault(None if category_ids is None else int(category_ids[row]), []).append(row)
        for category, rows in groups.items():
            filter_expression = "" if category is None else f"category_id == {category}"
            hits = self._call(lambda c, rows=rows, f=filter_expression: c.search(
                self.collection, data=vectors[rows].tolist(), limit=k, filter=f, output_fields=_INSTANCE_FIELDS,
                search_params={"metric_type": "COSINE", "params": {"ef": max(HNSW_EF, k)}}))
            for row, row_hits in zip(rows, hits, strict=True):
                results[row] = [self._neighbour(hit) for hit in row_hits]
        return results

    @staticmethod
    def _neighbour(hit: dict) -> Neighbour:
        entity = hit["entity"]
        return Neighbour(
            id=int(hit["id"]), image=entity["image"], bbox=[round(float(v), 3) for v in entity["bbox"]],
            category_name=entity["category"], score=round(float(entity["score"]), 5),
            distance=round(1.0 - float(hit["distance"]), 6),
        )

    def thumbnail(self, instance_id: int) -> bytes | None:
        """The JPEG thumbnail of an indexed instance, None for an unknown id."""
        rows = self._call(lambda c: c.get(self.collection, ids=[int(instance_id)], output_fields=["thumbnail"]))
        return base64.b64decode(rows[0]["thumbnail"]) if rows else None

    def records(self, ids: Sequence[int]) -> list[dict]:
        """Every stored field but the vector, of the instances ``ids`` (in their order; unknown ids are left out)."""
        fields = [*_INSTANCE_FIELDS, "height", "width", "mask", "thumbnail"]
        rows = self._call(lambda c: c.get(self.collection, ids=[int(i) for i in ids], output_fields=fields))
        by_id = {int(row["id"]): row for row in rows}
        return [by_id[int(i)] for i in ids if int(i) in by_id]

    def iterate(self, batch_size: int = 500, with_vectors: bool = True) -> Iterator[dict]:
        """Every instance row (for exports), in batches from the database."""
        fields = ["id", *_INSTANCE_FIELDS, "height", "width", "mask"] + (["vector"] if with_vectors else [])
        iterator = self._call(lambda c: c.query_iterator(self.collection, batch_size=batch_size,
                                                         output_fields=fields))
        try:
            while batch := iterator.next():
                yield from batch
        finally:
            iterator.close()

    def export_jsonl(self, output: Path) -> int:
        """Write one JSON line per instance (id, vector, image, bbox, category, score, COCO RLE mask); the count."""
        count = 0
        with open(output, "w") as out:
            for row in self.iterate():
                record = {
                    "id": int(row["id"]), "vector": [float(v) for v in row["vector"]], "image": row["image"],
                    "bbox": [float(v) for v in row["bbox"]], "category_name": row["category"],
                    "category_id": int(row["category_id"]), "score": float(row["score"]),
                    "segmentation": {"size": [int(row["height"]), int(row["width"])], "counts": row["mask"]},
                }
                out.write(json.dumps(record) + "\n")
                count += 1
        return count

    # ------------------------------------------------------------------------------------------- plumbing
    def _call(self, operation: Callable[[Any], T]) -> T:
        """Run ``operation(client)``; after a lost connection (e.g. the shared Milvus Lite process stopped with
        its owner) reconnect once and retry."""
        from pymilvus.exceptions import MilvusException

        try:
            return operation(self._client)
        except MilvusException as exc:
            if "connect" not in str(exc).lower() and "unavailable" not in str(exc).lower():
                raise
            log.warning("lost the connection to %s (%s); reconnecting", self.db, exc)
            self._client = connect(self.db)
            return operation(self._client)
