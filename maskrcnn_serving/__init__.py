"""Mask R-CNN inference server for tensorpack / aws-samples checkpoints."""

import os

# Whether the user chose TensorFlow's native log level (the CLI keeps TF's start-up noise out of sight otherwise).
TF_LOG_LEVEL_FROM_USER = "TF_CPP_MIN_LOG_LEVEL" in os.environ
# tensorpack's layers need Keras 2 (tf-keras) under TensorFlow >= 2.16; this must be set before TF is imported.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
