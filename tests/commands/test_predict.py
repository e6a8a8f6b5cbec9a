"""``maskrcnn-serving predict``: COCO results of files and folders, annotated images."""

import json

import cv2
import numpy as np

from maskrcnn_serving import cli, visualize


def test_cli_predict_writes_coco_results(cli_uses_session_backends, demo_model_dir, example_images, tmp_path):
    output = tmp_path / "results.json"
    assert cli.main(["predict", "--model-dir", str(demo_model_dir), str(example_images[0].parent),
                     "--output", str(output)]) == 0
    records = json.loads(output.read_text())
    assert {r["image_id"] for r in records} == {str(p) for p in example_images}
    from pycocotools import mask as mask_utils

    first = records[0]
    assert isinstance(first["segmentation"]["counts"], str)
    assert mask_utils.decode(first["segmentation"]).shape == tuple(first["segmentation"]["size"])
    assert len(first["bbox"]) == 4 and 0 < first["score"] <= 1


def test_predict_vis_dir_writes_annotated_images(cli_uses_session_backends, tensorpack_backend, example_images,
                                                  tmp_path):
    inputs = tmp_path / "in"
    (inputs / "sub").mkdir(parents=True)
    (inputs / "a.jpg").write_bytes(example_images[0].read_bytes())
    (inputs / "sub" / "a.jpg").write_bytes(example_images[1].read_bytes())  # same name, another folder
    vis_dir = tmp_path / "vis"
    code = cli.main(["predict", str(inputs), "--output", str(tmp_path / "r.json"), "--vis-dir", str(vis_dir)])
    assert code == 0
    expected_outputs = [(inputs / "a.jpg", vis_dir / "a.png"), (inputs / "sub" / "a.jpg", vis_dir / "sub" / "a.png")]
    for source, written in expected_outputs:
        image = cv2.imread(str(source), cv2.IMREAD_COLOR)
        drawn = cv2.imread(str(written), cv2.IMREAD_COLOR)
        detections = tensorpack_backend.predict([image])[0]
        shown = detections.select(detections.scores > 0.5)
        np.testing.assert_array_equal(drawn, visualize.draw_detections(image, shown))
        assert (drawn != image).any()
