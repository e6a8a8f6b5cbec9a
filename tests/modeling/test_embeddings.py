"""Instance and image embeddings: the same vectors from both backends, unit length, made of the detection's own
class distribution, independent of the batch, and free for requests that do not ask for them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from maskrcnn_serving.backends.base import PredictOptions, load_backend
from maskrcnn_serving.modeling.embeddings import CLASS_WEIGHT
from maskrcnn_serving.settings import Settings

WITH = PredictOptions(score_threshold=0.3, embeddings=True)


@pytest.fixture(scope="module")
def images(example_images):
    return [cv2.imread(str(p), cv2.IMREAD_COLOR) for p in example_images]


def test_both_backends_give_the_same_unit_vectors(tensorpack_backend, optimized_backend, images):
    assert tensorpack_backend.embedding_dim == optimized_backend.embedding_dim == 64 + 4 + 1
    for image in images:
        a, b = tensorpack_backend.predict([image], WITH)[0], optimized_backend.predict([image], WITH)[0]
        assert len(a) > 0 and a.embeddings.shape == (len(a), 69) and a.embeddings.dtype == np.float32
        np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
        np.testing.assert_allclose(a.image_embedding, b.image_embedding, atol=1e-5)
        np.testing.assert_allclose(np.linalg.norm(a.embeddings, axis=1), 1.0, atol=1e-5)
        assert a.image_embedding.shape == (64,) and abs(np.linalg.norm(a.image_embedding) - 1.0) < 1e-5


def test_the_class_part_is_the_detections_own_distribution(tensorpack_backend, images):
    dets = tensorpack_backend.predict([images[1]], WITH)[0]
    appearance, classes = dets.embeddings[:, :64], dets.embeddings[:, 64:]
    # each part is unit length before weighting: |classes| / |appearance| is the class weight
    np.testing.assert_allclose(np.linalg.norm(classes, axis=1) / np.linalg.norm(appearance, axis=1), CLASS_WEIGHT,
                               rtol=1e-4)
    # softmax rows sum to 1, so the direction of the class part gives back the distribution, whose entry at the
    # label is the detection's score
    probabilities = classes / classes.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probabilities[np.arange(len(dets)), dets.labels], dets.scores, atol=1e-5)


def test_embeddings_do_not_change_the_detections_and_cost_nothing_unless_asked(tensorpack_backend, images):
    plain = tensorpack_backend.predict([images[0]], PredictOptions(score_threshold=0.3))[0]
    embedded = tensorpack_backend.predict([images[0]], WITH)[0]
    assert plain.embeddings is None and plain.image_embedding is None
    np.testing.assert_array_equal(plain.boxes, embedded.boxes)
    np.testing.assert_array_equal(plain.mask_probs, embedded.mask_probs)
    kept = embedded.select([0])
    np.testing.assert_array_equal(kept.embeddings, embedded.embeddings[:1])


def test_vectors_do_not_depend_on_the_batch(optimized_backend, images, run_batched):
    same_size = [cv2.resize(image, (320, 240)) for image in images]
    alone = [optimized_backend.predict([image], WITH)[0] for image in same_size]
    together, stats = run_batched(optimized_backend, same_size, WITH)
    assert stats.largest_batch > 1
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(a.embeddings, b.embeddings, atol=1e-5)
        np.testing.assert_allclose(a.image_embedding, b.image_embedding, atol=1e-5)


def test_bfloat16_vectors_point_the_same_way(demo_model_dir, optimized_backend, images):
    low = load_backend("optimized", demo_model_dir, Settings(precision="bfloat16"), environ={})
    reference = optimized_backend.predict([images[0]], WITH)[0]
    approximate = low.predict([images[0]], WITH)[0]
    for vector, label, box in zip(reference.embeddings, reference.labels, reference.boxes, strict=True):
        same = np.flatnonzero((approximate.labels == label) & (np.abs(approximate.boxes - box).max(axis=1) < 3))
        if len(same):
            assert float(approximate.embeddings[same[0]] @ vector) > 0.98
    assert float(approximate.image_embedding @ reference.image_embedding) > 0.98
