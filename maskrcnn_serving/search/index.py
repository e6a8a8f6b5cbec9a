"""The instance index: every detected object of a collection of images, searchable by its embedding, in Milvus.

Two collections per index (``NAME`` and ``NAME_images``):

* ``NAME``: one row per instance: ``id`` (:func:`instance_id`: the same for the same image and detection, in any
  build), ``vector`` (the instance embedding, cosine), ``image`` (the image's name: its path relative to the indexed
  folder, or under a caller's label; see :mod:`maskrcnn_serving.sources`),
  ``bbox`` (COCO xywh floats, image pixels), ``category`` / ``category_id``, ``score``, ``mask`` (COCO compressed
  RLE counts of the full-image mask, with ``height`` / ``width``) and ``thumbnail`` (a small JPEG, base64), so that
  a server can show an instance without reading any file.
* ``NAME_images``: one row per indexed image (:func:`image_row_id`; its image embedding, size and instance count).
  It is written after the image's instances, so an image is indexed once its row exists: a build that stops
  half-way resumes there, and an image whose instances were written but not its row is cleaned and indexed again.

Rows are upserted by their ids, so writing an image twice (a re-run, a task retried after its worker died) leaves
it once. Indexes built before names were relative hold absolute paths and database-assigned ids: they are read as
they are and written as they were (insert), and an absolute path is answered as its file name only
(:func:`public_name`), so that no path of the machine that built an index reaches a client.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import itertools
import json
import logging
import posixpath
import secrets
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
# Ids are 53-bit: exact as JSON numbers in a browser (the web page asks for thumbnails by the ids it was answered),
# non-negative (the thumbnail route takes unsigned ids); InstanceIndex.write settles the rare collision.
MAX_ID = 2**53 - 1
_QUERY_CHUNK = 500  # names per ``image in [...]`` filter
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


def _hash_id(*parts: str) -> int:
    digest = hashlib.blake2b("\0".join(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") & MAX_ID


def instance_id(name: str, detection: int, attempt: int = 0) -> int:
    """The id of the ``detection``-th instance (in descending score order) of the image named ``name``: a hash, so
    every build of the same image writes the same ids. ``attempt`` > 0: its alternatives, taken in turn when
    another image's instance holds it (:meth:`InstanceIndex.write`)."""
    return _hash_id("instance", name, str(detection), *([str(attempt)] if attempt else []))


def image_row_id(name: str, attempt: int = 0) -> int:
    """The id of the image row of the image named ``name`` (and its alternatives, as :func:`instance_id`)."""
    return _hash_id("image", name, *([str(attempt)] if attempt else []))


def check_name(name: str) -> str:
    """``name`` if an index may store it as an image's name: relative (never an absolute path: it would reach
    clients), without ``..``, at most ``MAX_PATH`` characters; ValueError otherwise."""
    if not name or name.startswith("/") or ".." in name.split("/"):
        raise ValueError(f"an image's name in the index must be a relative path without '..', not {name!r}")
    if len(name) > MAX_PATH:
        raise ValueError(f"image name longer than {MAX_PATH} characters: {name[:80]}...")
    return name


def public_name(stored: str) -> str:
    """How a stored image name is answered: as stored, except an absolute path (left by builds before names were
    relative), which is cut to its file name."""
    return posixpath.basename(stored) if stored.startswith("/") else stored


@dataclass(frozen=True)
class ImageRows:
    """Everything an index stores of one image, made where the image was run (a Ray actor, or this process) and
    written where the index is open (:meth:`InstanceIndex.write`): its instance rows, then its image row."""

    name: str
    instances: list[dict]
    image: dict

    def to_json(self) -> dict[str, Any]:
        """As a JSON value (every field is plain data): how the rows travel from a Ray actor."""
        return {"name": self.name, "instances": self.instances, "image": self.image}

    @classmethod
    def from_json(cls, value: dict[str, Any]) -> ImageRows:
        return cls(value["name"], value["instances"], value["image"])


def image_rows(name: str, image: np.ndarray, annotations: Sequence[dict], embeddings: np.ndarray,
               image_embedding: np.ndarray) -> ImageRows:
    """The rows of the image named ``name`` (see :func:`check_name`): one per annotation (``coco`` format, its
    embedding one row of ``embeddings``, its thumbnail cut from ``image``, (H, W, 3) BGR) and the image's own row
    (``image_embedding``)."""
    check_name(name)
    height, width = image.shape[:2]
    instances = []
    for number, (annotation, vector) in enumerate(zip(annotations, embeddings, strict=True)):
        mask = annotation.get("segmentation", {}).get("counts", "")
        instances.append({
            "id": instance_id(name, number),
            "vector": np.asarray(vector, np.float32).tolist(),
            "image": name,
            "bbox": [float(v) for v in annotation["bbox"]],
            "category": annotation["category_name"],
            "category_id": int(annotation["category_id"]),
            "score": float(annotation["score"]),
            "height": int(height),
            "width": int(width),
            "mask": mask if len(mask) <= MAX_TEXT else "",  # an extreme outline is not kept, the box is
            "thumbnail": base64.b64encode(thumbnail_jpeg(image, annotation["bbox"])).decode(),
        })
    row = {"id": image_row_id(name), "vector": np.asarray(image_embedding, np.float32).tolist(), "image": name,
           "height": int(height), "width": int(width), "instances": len(instances)}
    return ImageRows(name, instances, row)


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

        # ids are the rows' own (instance_id, image_row_id), so that writing an image again replaces its rows
        instances = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
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
        images = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False)
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
    def has_image(self, name: str) -> bool:
        rows = self._call(lambda c: c.query(self.images_collection, filter=f"image == {escape(name)}",
                                            output_fields=["id"], limit=1))
        return len(rows) > 0

    def indexed(self, names: Sequence[str]) -> set[str]:
        """Which of ``names`` have an image row (are indexed)."""
        found: set[str] = set()
        for start in range(0, len(names), _QUERY_CHUNK):
            chunk = list(names[start : start + _QUERY_CHUNK])
            rows = self._call(lambda c, chunk=chunk: c.query(
                self.images_collection, filter=f"image in [{', '.join(escape(n) for n in chunk)}]",
                output_fields=["image"], limit=len(chunk)))
            found.update(row["image"] for row in rows)
        return found

    def add_image(self, name: str, image: np.ndarray, annotations: Sequence[dict], embeddings: np.ndarray,
                  image_embedding: np.ndarray) -> int:
        """Index one image (see :func:`image_rows`); the number of instances written."""
        return self.write(image_rows(name, image, annotations, embeddings, image_embedding))

    def write(self, rows: ImageRows) -> int:
        """Store one image's rows: its instances, then its image row (which marks it indexed). Instances of the
        same name left by an interrupted build, or by a build that found more of them, are removed first; the rows
        are upserted, so a second write of the same image leaves one copy. The number of instances written."""
        for collection in (self.collection, self.images_collection):  # an earlier write's rows, whatever their ids
            self._call(lambda c, collection=collection: c.delete(collection, filter=f"image == {escape(rows.name)}"))
        self._store(self.collection, rows.instances, functools.partial(instance_id, rows.name))
        self._store(self.images_collection, [rows.image], lambda _, attempt: image_row_id(rows.name, attempt))
        return len(rows.instances)

    def _store(self, collection: str, rows: list[dict], make_id: Callable[[int, int], int]) -> None:
        if not rows:
            return
        if self._database_ids:  # an index built before ids were the rows' own: written as it was
            self._call(lambda c: c.insert(collection, [{k: v for k, v in r.items() if k != "id"} for r in rows]))
            return
        self._call(lambda c: c.upsert(collection, self._unclaimed(collection, rows, make_id)))

    def _unclaimed(self, collection: str, rows: list[dict], make_id: Callable[[int, int], int]) -> list[dict]:
        """``rows`` (of one image) with ids that no other image's row holds: each its own hash or, after a collision
        (about N^2 / 2^54 colliding pairs among N rows), the first alternative ``make_id(number, attempt)`` that is
        free. Deterministic: the same image written again finds the same ids."""
        rows = [dict(row) for row in rows]
        name = rows[0]["image"]
        for attempt in itertools.count(1):
            ids = [row["id"] for row in rows]
            found = self._call(lambda c, ids=ids: c.get(collection, ids=ids, output_fields=["image"]))
            held = {int(row["id"]) for row in found if row["image"] != name}
            clashes = [number for number, row in enumerate(rows)
                       if row["id"] in held or row["id"] in ids[:number]]
            if not clashes:
                return rows
            for number in clashes:
                rows[number]["id"] = make_id(number, attempt)

    @functools.cached_property
    def _database_ids(self) -> bool:
        """Whether the database assigns the ids (indexes built before ids were derived from names)."""
        return bool(self._call(lambda c: c.describe_collection(self.collection)).get("auto_id"))

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
        """Insert instance rows as they are (every field of the instance schema; a row without an ``id`` gets a
        random one): for tests and benchmarks that fill an index without images. Use :meth:`add_image` or
        :meth:`write` to index images."""
        if not self._database_ids:
            rows = [row if "id" in row else {**row, "id": secrets.randbelow(MAX_ID + 1)} for row in rows]
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
            id=int(hit["id"]), image=public_name(entity["image"]), bbox=[round(float(v), 3) for v in entity["bbox"]],
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
