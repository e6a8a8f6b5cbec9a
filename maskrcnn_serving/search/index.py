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

Every database call is bounded in time (``timeout``; loading a collection, which builds its vector index, by
``LOAD_TIMEOUT_SECONDS``), and every failure of the database is a :class:`DatabaseError` (a
:class:`DatabaseUnavailable` when it did not answer). A database process that restarted has lost the connection and
holds the collections released: :meth:`InstanceIndex.reconnect` connects again and loads them. The server does not
call this class directly but through :class:`maskrcnn_serving.search.service.SearchService`.

Thumbnails are checked to be what they claim, when stored and when served (:func:`decoded_thumbnail`): a JPEG of at
most ``THUMBNAIL_SIZE`` pixels a side that the decoding gate (:mod:`maskrcnn_serving.imaging`) decodes. What a client
gets is those pixels encoded again here, never the stored bytes themselves.
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

from maskrcnn_serving import imaging
from maskrcnn_serving.errors import DatabaseError, DatabaseUnavailable, DimensionMismatch, NotAnImage, ServingError
from maskrcnn_serving.search.database import connect

log = logging.getLogger(__name__)
# pymilvus logs every failed call (and reconnection) with a traceback, once per retry; the index reports failures
# itself, in one line.
for _noisy in ("pymilvus.decorators", "pymilvus.client.connection_manager"):
    logging.getLogger(_noisy).setLevel(logging.CRITICAL)

T = TypeVar("T")

DEFAULT_COLLECTION = "instances"
THUMBNAIL_SIZE = 96  # longest side in pixels
THUMBNAIL_QUALITY = 80
CALL_TIMEOUT_SECONDS = 30.0  # a database call of the command line (the server sets its own, shorter)
LOAD_TIMEOUT_SECONDS = 900.0  # loading a collection builds its HNSW graph: minutes at 100,000 instances in Milvus Lite
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
    jpeg = _encode_jpeg(crop)
    decoded_thumbnail(jpeg)  # what is stored passes the check it must pass when served
    return jpeg


def decoded_thumbnail(data: bytes) -> np.ndarray:
    """The pixels (H, W, 3 BGR) of a stored thumbnail, if it is one: a JPEG (by its magic bytes) of at most
    ``THUMBNAIL_SIZE`` pixels a side, decoded through the decoding gate. Raises the gate's refusal otherwise (a
    :class:`~maskrcnn_serving.errors.ServingError`: an HTML page, another format, a corrupt or oversized JPEG)."""
    if imaging.identify(data) != "JPEG":
        raise NotAnImage("The thumbnail is not a JPEG.")
    pixels = imaging.decode_image(data, THUMBNAIL_SIZE * THUMBNAIL_SIZE)
    if max(pixels.shape[:2]) > THUMBNAIL_SIZE:
        raise NotAnImage(f"The thumbnail is larger than {THUMBNAIL_SIZE} pixels a side.")
    return pixels


def _encode_jpeg(pixels: np.ndarray) -> bytes:
    return cv2.imencode(".jpg", pixels, [cv2.IMWRITE_JPEG_QUALITY, THUMBNAIL_QUALITY])[1].tobytes()


class _Bounded:
    """A database client whose every call has a ``timeout`` (unless the call names its own)."""

    def __init__(self, client, timeout: float) -> None:
        self._client, self._timeout = client, timeout

    def __getattr__(self, name: str):
        method = getattr(self._client, name)

        def bounded(*args, **kwargs):
            kwargs.setdefault("timeout", self._timeout)
            return method(*args, **kwargs)

        return bounded


class InstanceIndex:
    """A handle on one index (two collections) in one database; see the module docstring."""

    def __init__(self, db: str, collection: str, client, timeout: float = CALL_TIMEOUT_SECONDS,
                 start_database: bool = True, reconnect: bool = True) -> None:
        self.db = db
        self.collection = collection
        self.images_collection = f"{collection}_images"
        self.timeout = timeout
        self.start_database = start_database
        self.reconnects = reconnect
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
        timeout: float = CALL_TIMEOUT_SECONDS,
        start_database: bool = True,
        reconnect: bool = True,
    ) -> InstanceIndex:
        """Open the index ``collection`` of ``db``. With ``dim``, its vectors must have that length
        (:class:`DimensionMismatch` otherwise); with ``create``, a missing index is created (``dim`` and
        ``image_dim`` needed). ``timeout``: seconds each database call may take. ``start_database``: for a local
        folder, start its database process when none runs (the server's workers only wait for the one ``serve``
        starts). ``reconnect``: after a lost connection, reconnect once and retry the call (the command line; the
        server's :class:`~maskrcnn_serving.search.service.SearchService` reconnects on a thread of its own instead).
        Raises :class:`DatabaseError` for a database that cannot be used."""
        if not collection.replace("_", "").isalnum() or not collection[0].isalpha() or len(collection) > 200:
            raise DatabaseError(f"--collection {collection!r}: use letters, digits and underscores, starting with a "
                                "letter.")
        index = cls(db, collection, connect(db, timeout, start_database), timeout, start_database, reconnect)
        try:
            index._open(dim, image_dim, create)
        except BaseException:
            index.close()
            raise
        return index

    def _open(self, dim: int | None, image_dim: int | None, create: bool) -> None:
        if self._call(lambda c: c.has_collection(self.collection)):
            self.load()
            found = self.dim
            if dim is not None and found != dim:
                raise DimensionMismatch(
                    f"The collection {self.collection!r} in {self.db} holds vectors of {found} values; this model's "
                    f"have {dim}. Index into another --collection (or --db), or use the model that built it."
                )
        elif create:
            if dim is None or image_dim is None:
                raise ValueError("creating an index needs dim and image_dim")
            self._create(dim, image_dim)
        else:
            raise DatabaseError(f"{self.db} has no index {self.collection!r}; build one with `maskrcnn-serving index "
                                "build`.")

    def load(self) -> None:
        """Load both collections (a reopened or restarted database holds them released; loading a loaded one is
        immediate)."""
        for name in (self.collection, self.images_collection):
            self._call(lambda c, name=name: c.load_collection(name, timeout=LOAD_TIMEOUT_SECONDS), reconnect=False)

    def reconnect(self) -> None:
        """Connect again and load the collections: after the database process restarted, or a connection broke.
        Raises :class:`DatabaseError` (:class:`DatabaseUnavailable` while it does not answer)."""
        old, self._client = self._client, None
        if old is not None:
            try:
                old.close()
            except Exception:  # noqa: BLE001 - a broken channel may fail to close; it is dropped either way
                log.debug("closing the old database client failed", exc_info=True)
        self._client = connect(self.db, self.timeout, self.start_database)
        self.load()

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
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------------------------------- properties
    @property
    def dim(self) -> int:
        fields = self._call(lambda c: c.describe_collection(self.collection))["fields"]
        return int(next(f for f in fields if f["name"] == "vector")["params"]["dim"])

    def count(self) -> int:
        return int(self._call(lambda c: c.get_collection_stats(self.collection))["row_count"])

    def check_loaded(self) -> None:
        """Raise :class:`DatabaseUnavailable` unless the database answers and holds both collections loaded (two
        cheap calls: the server's heartbeat)."""
        from pymilvus.client.types import LoadState

        for name in (self.collection, self.images_collection):
            state = self._call(lambda c, name=name: c.get_load_state(name))["state"]
            if state != LoadState.Loaded:
                raise DatabaseUnavailable(f"the collection {name!r} in {self.db} is not loaded ({state.name})")

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
        self.load()

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
        """The JPEG thumbnail of an indexed instance, as checked pixels encoded again (module docstring); None for
        an unknown id, and for stored bytes that are not a JPEG thumbnail (logged: someone wrote them into the
        database)."""
        rows = self._call(lambda c: c.get(self.collection, ids=[int(instance_id)], output_fields=["thumbnail"]))
        if not rows:
            return None
        try:
            return _encode_jpeg(decoded_thumbnail(base64.b64decode(rows[0]["thumbnail"], validate=True)))
        except (ServingError, ValueError) as exc:  # the gate's refusals; binascii.Error is a ValueError
            log.warning("the stored thumbnail of instance %d is not a JPEG thumbnail (%s); not served", instance_id,
                        exc)
            return None

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
    def _call(self, operation: Callable[[Any], T], reconnect: bool | None = None) -> T:
        """Run ``operation(client)``, each call of it bounded by ``timeout``. After a lost connection or released
        collections (the database process restarted), with ``reconnect`` (default: the index's), reconnect once
        (:meth:`reconnect`) and retry. A database failure is raised as :class:`DatabaseError`
        (:class:`DatabaseUnavailable` when the database did not answer)."""
        reconnect = self.reconnects if reconnect is None else reconnect
        try:
            if self._client is None:  # the last reconnection failed
                raise DatabaseUnavailable(f"not connected to the Milvus database at {self.db}")
            return operation(_Bounded(self._client, self.timeout))
        except Exception as exc:
            failure = _database_failure(exc, self.db)
            if failure is None:
                raise
            if not reconnect or not isinstance(failure, DatabaseUnavailable):
                raise failure from None
            log.warning("lost the database %s (%s); reconnecting", self.db, failure)
        self.reconnect()
        try:
            return operation(_Bounded(self._client, self.timeout))
        except Exception as exc:
            failure = _database_failure(exc, self.db)
            if failure is None:
                raise
            raise failure from None


# What pymilvus says when the database is not there, or not yet ready again: no connection, a call past its time, or
# collections a restarted database holds released.
_UNAVAILABLE_SIGNS = ("unavailable", "connect", "deadline", "timeout", "timed out", "not loaded", "released",
                      "closed channel", "socket")


def _database_failure(exc: Exception, db: str) -> DatabaseError | None:
    """The :class:`DatabaseError` that an exception of the database client stands for: pymilvus's and gRPC's own,
    and any other raised inside them (gRPC raises a ValueError for a call on a channel closed meanwhile). None for
    any other exception (a fault of this program, raised as it is)."""
    import grpc
    from pymilvus.exceptions import MilvusException

    if isinstance(exc, DatabaseError):
        return exc
    if isinstance(exc, grpc.RpcError):
        text = f"{exc.code()}: {exc.details()}" if hasattr(exc, "code") else str(exc)
    elif isinstance(exc, MilvusException):
        text = exc.message or str(exc)
    elif _raised_in_client(exc):
        text = f"{type(exc).__name__}: {exc}"
    else:
        return None
    text = " ".join(text.split())[:500]
    if any(sign in text.lower() for sign in _UNAVAILABLE_SIGNS):
        return DatabaseUnavailable(f"the Milvus database at {db} did not answer: {text}")
    return DatabaseError(f"the Milvus database at {db} refused a call: {text}")


def _raised_in_client(exc: BaseException) -> bool:
    """Whether ``exc`` was raised by code of pymilvus or gRPC (the innermost frame of its traceback)."""
    trace = exc.__traceback__
    while trace is not None and trace.tb_next is not None:
        trace = trace.tb_next
    module = "" if trace is None else trace.tb_frame.f_globals.get("__name__", "")
    return module.split(".")[0] in ("pymilvus", "grpc")
