"""``maskrcnn-serving index``: build (resumable, dimension-checked), search (JSON, figures), export, bad --db."""

from __future__ import annotations

import json

import pytest
from checkpoint_factory import random_weights, small_architecture, write_npz

from maskrcnn_serving import cli
from maskrcnn_serving.search import database


@pytest.fixture(autouse=True)
def stop_database_processes():
    yield
    database.stop_local_servers()


def test_build_resume_search_and_export(cli_uses_session_backends, demo_model_dir, example_images, tmp_path,
                                        capsys):
    db = str(tmp_path / "instances.db")
    folder = str(example_images[0].parent)
    assert cli.main(["index", "build", "--model-dir", str(demo_model_dir), "--db", db, folder]) == 0
    first = capsys.readouterr().out
    assert f"from {len(example_images)} images added" in first and "(0 images already indexed" in first
    assert cli.main(["index", "build", "--model-dir", str(demo_model_dir), "--db", db, folder]) == 0
    assert "0 instances from 0 images added" in capsys.readouterr().out  # resumed: nothing indexed twice
    # the same file from another folder, under a label of its own: a second image, not one already indexed
    assert cli.main(["index", "build", "--model-dir", str(demo_model_dir), "--db", db, str(example_images[0]),
                     "--label", "copies"]) == 0
    assert "from 1 images added" in capsys.readouterr().out
    for label in ("/srv/copies", "../copies"):
        with pytest.raises(SystemExit, match="--label: .*relative path"):
            cli.main(["index", "build", "--model-dir", str(demo_model_dir), "--db", db, folder, "--label", label])

    out, vis = tmp_path / "search.json", tmp_path / "vis"
    assert cli.main(["index", "search", "--model-dir", str(demo_model_dir), "--db", db, str(example_images[1]),
                     "--k", "3", "--json", str(out), "--vis-dir", str(vis), "--images-root", folder]) == 0
    report = json.loads(out.read_text())
    assert [entry["image"] for entry in report] == [str(example_images[1])]
    instances = report[0]["instances"]
    assert instances and all(len(i["neighbours"]) == 3 for i in instances)
    for instance in instances:  # every instance of an indexed image finds itself first
        best = instance["neighbours"][0]
        # stored by its name under the indexed folder, never a path of this machine
        assert best["image"] == example_images[1].name and best["distance"] < 1e-4
        assert best["bbox"] == pytest.approx(instance["bbox"], abs=1e-3)
        assert set(best) == {"image", "bbox", "category_name", "score", "distance"}
    assert (vis / f"{example_images[1].stem}.png").read_bytes()[:4] == b"\x89PNG"

    same = tmp_path / "same.json"
    assert cli.main(["index", "search", "--model-dir", str(demo_model_dir), "--db", db, str(example_images[2]),
                     "--k", "5", "--same-class", "--json", str(same)]) == 0
    for instance in json.loads(same.read_text())[0]["instances"]:
        assert {n["category_name"] for n in instance["neighbours"]} == {instance["category_name"]}

    exported = tmp_path / "export.jsonl"
    assert cli.main(["index", "export", "--db", db, "--jsonl", str(exported)]) == 0
    lines = exported.read_text().splitlines()
    assert len(lines) > len(example_images) and len(json.loads(lines[0])["vector"]) == 69
    assert {json.loads(line)["image"] for line in lines} == {p.name for p in example_images} | {
        f"copies/{example_images[0].name}"}


def test_bad_db_values_fail_clearly_before_loading_the_model(tmp_path, example_images, capsys):
    (tmp_path / "file.txt").write_text("x")
    for db in (str(tmp_path / "file.txt"), str(tmp_path / "missing" / "x.db"), "ftp://somewhere/x"):
        with pytest.raises(SystemExit, match="error: --db"):
            cli.main(["index", "build", "--model-dir", str(tmp_path / "no-model"), "--db", db,
                      str(example_images[0])])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_a_model_with_other_dimensions_cannot_write_into_the_collection(cli_uses_session_backends, demo_model_dir,
                                                                        example_images, tmp_path, monkeypatch):
    db = str(tmp_path / "instances.db")
    assert cli.main(["index", "build", "--model-dir", str(demo_model_dir), "--db", db, str(example_images[0])]) == 0
    monkeypatch.undo()  # a real, other model from now on
    other = tmp_path / "other-model"
    other.mkdir()
    write_npz(other / "model.npz", random_weights(small_architecture(classes=3), seed=1))
    with pytest.raises(SystemExit, match="holds vectors of 69 values; this model's have 20"):
        cli.main(["index", "build", "--model-dir", str(other), "--db", db, str(example_images[1])])
