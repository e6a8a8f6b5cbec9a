"""``maskrcnn-serving inspect``: the model directory's summary without a graph."""

import json

from maskrcnn_serving import cli


def test_cli_inspect_summarizes_the_model_dir(demo_model_dir, capsys):
    assert cli.main(["inspect", "--model-dir", str(demo_model_dir)]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["resnet_num_blocks"] == [1, 1, 1, 1]
    assert summary["class_names"] == ["circle", "rectangle", "triangle", "ring"]
    assert summary["parameters"] == 9_506_604  # the fixture README's count
    assert summary["resize"] == {"short_edge": 320, "max_size": 576.0}
