"""Settings: one typed object from the environment and flags, validated, and passed to workers unchanged."""

from __future__ import annotations

import dataclasses

import pytest

from maskrcnn_serving.settings import Limits, Settings, setting_fields


def test_defaults_are_the_seed_containers_and_ours():
    settings = Settings.from_env({})
    assert (settings.model_dir, settings.backend, settings.workers, settings.timeout) == (None, "tensorpack", 1, 70)
    assert settings.limits == Limits() and settings.deadline_seconds == 63.0
    assert (settings.precision, settings.winograd, settings.xla, settings.max_batch_size) == ("mixed", "auto", False,
                                                                                              8)


def test_every_variable_is_read_and_round_trips_through_the_environment():
    environ = {
        "SM_MODEL_DIR": "/models/m", "MODEL_SERVER_BACKEND": "optimized", "MODEL_SERVER_WORKERS": "3",
        "MODEL_SERVER_THREADS": "8", "MODEL_SERVER_TIMEOUT": "30", "MODEL_SERVER_REQUEST_DEADLINE": "12.5",
        "MODEL_SERVER_CLIENT_TIMEOUT": "5", "MODEL_SERVER_READY_WAIT": "0", "MODEL_SERVER_MAX_REQUEST_BYTES": "100",
        "MODEL_SERVER_MAX_RESPONSE_BYTES": "200", "MODEL_SERVER_MAX_IMAGE_PIXELS": "300",
        "MODEL_SERVER_MAX_IMAGES": "2",
        "MODEL_SERVER_WORKER_MEMORY_HEADROOM_MB": "512", "MODEL_SERVER_INDEX": "http://milvus:19530",
        "MODEL_SERVER_INDEX_COLLECTION": "photos", "MODEL_SERVER_INDEX_TIMEOUT": "1.5", "MODEL_SERVER_FRONT": "none",
        "MODEL_SERVER_MEMORY_RETURN_MB": "64", "MASKRCNN_PRECISION": "bfloat16", "MASKRCNN_WINOGRAD": "0",
        "MASKRCNN_XLA": "yes", "MASKRCNN_MAX_BATCH_SIZE": "4", "MASKRCNN_BUCKET_STEP": "128",
        "MASKRCNN_MAX_BATCH_DELAY_MS": "2.5", "PROMETHEUS_MULTIPROC_DIR": "/run/metrics",
        "MODEL_SERVER_READINESS_DIR": "/run/ready",
    }
    settings = Settings.from_env(environ)
    assert {spec.metadata["env"] for spec in dataclasses.fields(Settings)} == set(environ)
    assert settings.limits == Limits(100, 200, 300, 2) and settings.deadline_seconds == 12.5
    assert (settings.winograd, settings.xla, settings.max_batch_delay_ms) == ("off", True, 2.5)
    assert (settings.front, settings.memory_return_mb, settings.index_timeout) == ("none", 64.0, 1.5)
    assert settings.readiness_dir == "/run/ready"
    assert Settings.from_env(settings.to_env()) == settings
    assert Settings.from_env({"MODEL_SERVER_WORKERS": ""}).workers == 1  # empty counts as unset


def test_overrides_and_text_values():
    settings = Settings.from_env({"MODEL_SERVER_WORKERS": "3"}, workers=2, backend=None)
    assert settings.workers == 2 and settings.backend == "tensorpack"
    assert settings.with_text({"precision": "float16", "xla": "true", "max_batch_size": "2"}) == dataclasses.replace(
        settings, precision="float16", xla=True, max_batch_size=2)
    with pytest.raises(ValueError, match="unknown setting"):
        settings.with_text({"precison": "float16"})


@pytest.mark.parametrize(
    ("environ", "message"),
    [
        ({"MODEL_SERVER_WORKERS": "two"}, "MODEL_SERVER_WORKERS"),
        ({"MODEL_SERVER_WORKERS": "0"}, "workers"),
        ({"MASKRCNN_XLA": "maybe"}, "MASKRCNN_XLA"),
        ({"MASKRCNN_PRECISION": "int8"}, "precision"),
        # a step that is not a multiple of 32 is refused by the optimized backend (tests/backends/, test_serve.py)
        ({"MASKRCNN_BUCKET_STEP": "0"}, "bucket_step"),
        ({"MODEL_SERVER_CLIENT_TIMEOUT": "-1"}, "client_timeout"),
        ({"MODEL_SERVER_INDEX_TIMEOUT": "0"}, "index_timeout"),
    ],
)
def test_malformed_values_name_what_is_wrong(environ, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_env(environ)


def test_serve_flags_are_the_declared_settings():
    from maskrcnn_serving import cli

    serve_help = cli.build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for spec in setting_fields(flags_only=True):
        assert "--" + spec.name.replace("_", "-") in serve_help and spec.metadata["env"] in serve_help
