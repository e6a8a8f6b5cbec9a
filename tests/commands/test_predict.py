"""``maskrcnn-serving predict``: COCO results of files and folders, annotated images."""

import json

import cv2
import numpy as np
import pytest

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


def test_shards_hold_complete_images_only_and_a_run_resumes_after_them(cli_uses_session_backends, example_images,
                                                                       tmp_path, capsys):
    from maskrcnn_serving.commands.predict import ResultShards

    shards = ResultShards(tmp_path / "shards", shard_size=2)
    for name in ("a", "b", "c"):
        shards.add(name, [{"image_id": name}])
    # stopped here, without closing: the third image's shard was not complete
    again = ResultShards(tmp_path / "shards", shard_size=2)
    assert again.done() == {"a", "b"} and [p.name for p in again.shards()] == ["part-00000.jsonl"]
    assert not list((tmp_path / "shards").glob(".*.tmp"))  # the incomplete one is dropped
    again.add("c", [])
    again.close()
    assert dict(again.read()) == {"a": [{"image_id": "a"}], "b": [{"image_id": "b"}], "c": []}

    folder, output = tmp_path / "images", tmp_path / "all.json"
    folder.mkdir()
    for path in example_images:
        (folder / path.name).write_bytes(path.read_bytes())
    common = ["predict", str(folder), "--shards", str(tmp_path / "run"), "--shard-size", "1"]
    assert cli.main([*common[:1], str(folder / example_images[0].name), *common[2:]]) == 0  # a first, partial run
    capsys.readouterr()
    assert cli.main([*common, "--output", str(output)]) == 0
    captured = capsys.readouterr()
    assert "1 images already in" in captured.err
    assert f"in {len(example_images)} images written to {output} and " in captured.out
    reference = tmp_path / "reference.json"
    assert cli.main(["predict", str(folder), "--output", str(reference)]) == 0
    assert json.loads(output.read_text()) == json.loads(reference.read_text())  # in input order, each image once
    with pytest.raises(SystemExit, match="--output .* and/or --shards"):
        cli.main(["predict", str(folder)])


def test_ray_options_are_checked_before_anything_runs(example_images, tmp_path):
    folder = str(example_images[0].parent)
    with pytest.raises(SystemExit, match="--actors only apply with --ray"):
        cli.main(["predict", folder, "--output", str(tmp_path / "r.json"), "--actors", "2"])
    with pytest.raises(SystemExit, match="put --ray after the inputs"):
        cli.main(["predict", "--output", str(tmp_path / "r.json"), "--ray", folder, folder])
    with pytest.raises(SystemExit, match="--actors must be at least 1"):
        cli.main(["predict", folder, "--output", str(tmp_path / "r.json"), "--ray", "auto", "--actors", "0"])
    assert not list(tmp_path.iterdir())
