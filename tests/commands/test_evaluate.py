"""``maskrcnn-serving eval``: the JSON summary line."""

import json

from maskrcnn_serving import cli


def test_cli_eval_prints_json_summary_last(cli_uses_session_backends, demo_model_dir, fixtures_dir, capsys):
    val = fixtures_dir / "val_public"
    assert cli.main(["eval", "--model-dir", str(demo_model_dir), "--annotations", str(val / "annotations.json"),
                     "--images", str(val / "images"), "--limit", "5"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(summary) == {"bbox", "segm", "images", "seconds"}
    assert summary["images"] == 5 and set(summary["segm"]) == {"AP", "AP50", "AP75"}
