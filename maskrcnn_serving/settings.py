"""Every runtime setting of the server and the backends, typed, read once.

One :class:`Settings` object holds what the ``SM_*``, ``MODEL_SERVER_*`` and ``MASKRCNN_*`` environment variables
(and prometheus_client's ``PROMETHEUS_MULTIPROC_DIR``) and the command-line flags say. Each field declares its
variable, its parser and its help text, so the environment, the flags of ``maskrcnn-serving serve`` and the
documentation cannot disagree. ``serve`` resolves the settings (flags win over the environment) and hands them to its
children as environment variables (:meth:`Settings.to_env`), which each child reads back once with
:meth:`Settings.from_env`; gunicorn's workers inherit their master's (:mod:`maskrcnn_serving.server.process`). No
other module reads these variables.

The model's own configuration (tensorpack keys, ``config.json``, ``CONFIG__*``) is not here: see
:mod:`maskrcnn_serving.config`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from maskrcnn_serving.booleans import parse_bool

MiB = 1 << 20
PRECISIONS = ("float32", "bfloat16", "float16", "mixed")
WINOGRAD_MODES = ("auto", "on", "off")
FRONTS = ("auto", "nginx", "none")  # MODEL_SERVER_FRONT: see maskrcnn_serving/server/front.py
DEADLINE_FRACTION = 0.9  # of MODEL_SERVER_TIMEOUT, so that the JSON 504 always beats the invocation timeout


def parse_winograd(text: str) -> str:
    """``auto``, or a boolean spelling (``1``/``on``/``true`` ...) mapped to ``on`` / ``off``."""
    value = text.strip().lower()
    return value if value == "auto" else ("on" if parse_bool(value) else "off")


def _optional_str(text: str) -> str | None:
    return text or None


def _setting(default: Any, env: str, parse: Callable[[str], Any], help: str, flag: bool = False) -> Any:  # noqa: A002
    return field(default=default, metadata={"env": env, "parse": parse, "help": help, "flag": flag})


@dataclass(frozen=True)
class Limits:
    """Size limits of one request. Bytes are counted on the HTTP body (base64 included). ``tiff``: whether the
    decoding gate also decodes TIFF, which it refuses from clients (trusted local files only)."""

    max_request_bytes: int = 6 * MiB
    max_response_bytes: int = 6 * MiB
    max_image_pixels: int = 50_000_000
    max_images: int = 16
    tiff: bool = False


_LIMITS = Limits()


@dataclass(frozen=True)
class Settings:
    """The settings of one process; see the module docstring. Field order is the order of ``serve --help``."""

    model_dir: str | None = _setting(
        None, "SM_MODEL_DIR", _optional_str,
        "Model directory with the checkpoint and optional config.json (default /opt/ml/model).")
    backend: str = _setting("tensorpack", "MODEL_SERVER_BACKEND", str, "Inference backend: tensorpack or optimized.")
    workers: int = _setting(
        1, "MODEL_SERVER_WORKERS", int, "gunicorn worker processes, each with its own model copy.", flag=True)
    threads: int = _setting(
        4, "MODEL_SERVER_THREADS", int,
        "Request threads per worker; decoding and encoding overlap, the model runs one call at a time.", flag=True)
    front: str = _setting(
        "auto", "MODEL_SERVER_FRONT", str,
        "HTTP front: nginx (buffers requests and answers, owns slow clients), none (gunicorn alone), or auto "
        "(nginx when it is installed).", flag=True)
    timeout: int = _setting(70, "MODEL_SERVER_TIMEOUT", int, "Worker timeout in seconds (the seed's default).",
                            flag=True)
    request_deadline: float | None = _setting(
        None, "MODEL_SERVER_REQUEST_DEADLINE", float,
        "Seconds an /invocations request may take before a JSON 504 (default 90%% of the timeout; 0: none).",
        flag=True)
    client_timeout: float = _setting(
        20.0, "MODEL_SERVER_CLIENT_TIMEOUT", float,
        "Seconds without request bytes before a slow client gets 408 (like nginx's client_body_timeout).", flag=True)
    ready_wait: float = _setting(
        10.0, "MODEL_SERVER_READY_WAIT", float,
        "Seconds an /invocations request waits for a worker still loading before 503; /ping never waits.", flag=True)
    max_request_bytes: int = _setting(
        _LIMITS.max_request_bytes, "MODEL_SERVER_MAX_REQUEST_BYTES", int, "Request body limit in bytes.", flag=True)
    max_response_bytes: int = _setting(
        _LIMITS.max_response_bytes, "MODEL_SERVER_MAX_RESPONSE_BYTES", int,
        "Response body limit in bytes (SageMaker's is 6 MB).", flag=True)
    max_image_pixels: int = _setting(
        _LIMITS.max_image_pixels, "MODEL_SERVER_MAX_IMAGE_PIXELS", int,
        "Pixels the images of one request may decode to, together (decompression-bomb guard).", flag=True)
    max_images: int = _setting(_LIMITS.max_images, "MODEL_SERVER_MAX_IMAGES", int, "Images per request.", flag=True)
    memory_return_mb: float = _setting(
        256.0, "MODEL_SERVER_MEMORY_RETURN_MB", float,
        "After a request, a worker holding more than its warm size plus this many MB gives its free memory back to "
        "the kernel (malloc_trim; 0: never).", flag=True)
    worker_memory_headroom_mb: float = _setting(
        0.0, "MODEL_SERVER_WORKER_MEMORY_HEADROOM_MB", float,
        "Cap each worker's data segment at its warm size plus this many MB (0: no cap); over it, a request gets 422.",
        flag=True)
    index: str | None = _setting(
        None, "MODEL_SERVER_INDEX", _optional_str,
        "Instance index for the neighbours option: a Milvus Lite folder (served by one process shared by the workers) "
        "or a Milvus URL; see docs/instance-search.md.", flag=True)
    index_collection: str = _setting(
        "instances", "MODEL_SERVER_INDEX_COLLECTION", str, "Index name in the --index database.", flag=True)
    index_timeout: float = _setting(
        5.0, "MODEL_SERVER_INDEX_TIMEOUT", float,
        "Seconds a call to the index database may take (within the request's deadline); a call over it, or a failed "
        "one, makes search unavailable (503 search_unavailable at once) until the database answers again.",
        flag=True)
    metrics_dir: str | None = _setting(
        None, "PROMETHEUS_MULTIPROC_DIR", _optional_str,
        "Directory where every worker writes its Prometheus samples for GET /metrics to sum (prometheus_client's "
        "own variable, read when it loads); serve makes a fresh one for its run when it is unset.")
    readiness_dir: str | None = _setting(
        None, "MODEL_SERVER_READINESS_DIR", _optional_str,
        "Directory where the workers publish their state and /ping is answered from (server/readiness.py); serve "
        "makes one for its run and sets it for its children, whatever the environment says.")
    precision: str = _setting(
        "mixed", "MASKRCNN_PRECISION", str,
        "Optimized backend compute dtype: mixed (the default: float16 on a GPU, bfloat16 on CPUs where it was measured "
        "faster, AMX or AMD with AVX512-BF16, else float32), float32 (the tensorpack backend's answers), bfloat16, "
        "float16.", flag=True)
    winograd: str = _setting(
        "auto", "MASKRCNN_WINOGRAD", parse_winograd,
        "Optimized backend Winograd convolutions: auto (float32 without a GPU), on, off.", flag=True)
    xla: bool = _setting(False, "MASKRCNN_XLA", parse_bool, "Optimized backend: compile the dense part with XLA.",
                         flag=True)
    max_batch_size: int = _setting(
        8, "MASKRCNN_MAX_BATCH_SIZE", int, "Optimized backend: images per graph call, at most.", flag=True)
    # The network's own padding multiple; the optimized backend refuses a step that is not a multiple of it
    # (backends/optimized.py: check_bucket_step, also run by ``serve`` before it starts).
    bucket_step: int = _setting(
        32, "MASKRCNN_BUCKET_STEP", int,
        "Optimized backend: resized images pad to a multiple of this (itself a multiple of 32) to share a graph "
        "call.", flag=True)
    max_batch_delay_ms: float = _setting(
        10.0, "MASKRCNN_MAX_BATCH_DELAY_MS", float,
        "Milliseconds a lone image waits for others to share its graph call (batching backends).", flag=True)

    def __post_init__(self) -> None:
        positive = ("workers", "threads", "timeout", "max_request_bytes", "max_response_bytes", "max_image_pixels",
                    "max_images", "max_batch_size", "bucket_step")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if not self.index_timeout > 0:
            raise ValueError(f"index_timeout must be > 0, got {self.index_timeout}")
        for name in ("client_timeout", "ready_wait", "memory_return_mb", "worker_memory_headroom_mb",
                     "max_batch_delay_ms"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, not {self.precision!r}")
        if self.front not in FRONTS:
            raise ValueError(f"front must be one of {', '.join(FRONTS)}, not {self.front!r}")
        if self.winograd not in WINOGRAD_MODES:
            raise ValueError(f"winograd must be one of {', '.join(WINOGRAD_MODES)}, not {self.winograd!r}")

    # ------------------------------------------------------------------------------------------ reading
    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: Any) -> Settings:
        """Settings from the variables in ``environ`` (empty ones count as unset); typed ``overrides`` that are
        not None win. A malformed value is a ValueError naming the variable."""
        values: dict[str, Any] = {}
        for spec in dataclasses.fields(cls):
            text = environ.get(spec.metadata["env"])
            if text not in (None, ""):
                values[spec.name] = _parse(spec, text, spec.metadata["env"])
        values.update({name: value for name, value in overrides.items() if value is not None})
        return cls(**values)

    def with_text(self, values: Mapping[str, str]) -> Settings:
        """A copy with fields set from text, e.g. ``{"precision": "bfloat16", "xla": "true"}`` (bench specs)."""
        known = {spec.name: spec for spec in dataclasses.fields(self)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise ValueError(f"unknown setting(s) {', '.join(unknown)}; known: {', '.join(known)}")
        return dataclasses.replace(self, **{name: _parse(known[name], text, name) for name, text in values.items()})

    def to_env(self) -> dict[str, str]:
        """The environment variables that reproduce these settings in another process (unset fields omitted)."""
        env = {}
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            if value is not None:
                env[spec.metadata["env"]] = str(value).lower() if isinstance(value, bool) else str(value)
        return env

    # ------------------------------------------------------------------------------------------ derived
    @property
    def limits(self) -> Limits:
        return Limits(self.max_request_bytes, self.max_response_bytes, self.max_image_pixels, self.max_images)

    @property
    def deadline_seconds(self) -> float | None:
        """Seconds a request may take: ``request_deadline`` (0 disables it), else 90 % of ``timeout`` and at
        least 1 s below it, so that the JSON 504 always beats the invocation timeout."""
        if self.request_deadline is not None:
            return self.request_deadline if self.request_deadline > 0 else None
        return max(0.5, min(self.timeout * DEADLINE_FRACTION, self.timeout - 1.0))


def _parse(spec: dataclasses.Field, text: str, source: str) -> Any:
    try:
        return spec.metadata["parse"](text)
    except ValueError as exc:
        raise ValueError(f"{source}={text!r} is not valid for {spec.name}: {exc}") from None


def setting_fields(flags_only: bool = False) -> list[dataclasses.Field]:
    """The declared settings (for building command-line flags and docs)."""
    return [spec for spec in dataclasses.fields(Settings) if spec.metadata["flag"] or not flags_only]
