"""The image files of a run: found under folders and URLs, named relative to the inputs' common folder (never
absolute), read where the pipeline decodes them."""

from __future__ import annotations

import pytest

from maskrcnn_serving.sources import collect_images, is_url


@pytest.fixture
def tree(tmp_path):
    for name in ("a.jpg", "sub/b.PNG", "sub/deeper/c.webp", "sub/notes.txt", "other/a.jpg"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(name.encode())
    return tmp_path


def test_a_folder_names_its_files_relative_to_itself(tree, monkeypatch):
    monkeypatch.chdir(tree)
    files = collect_images(["sub"])
    assert [(f.location, f.name) for f in files] == [("sub/b.PNG", "b.PNG"), ("sub/deeper/c.webp", "deeper/c.webp")]
    assert [f.source for f in files] == [str(tree / "sub/b.PNG"), str(tree / "sub/deeper/c.webp")]
    assert [f.read_bytes() for f in files] == [b"sub/b.PNG", b"sub/deeper/c.webp"]
    assert str(files[0]) == "sub/b.PNG" and files[0].absolute_path == str(tree / "sub/b.PNG")


def test_several_inputs_share_their_common_folder_so_names_never_collide(tree):
    files = collect_images([tree / "other", tree / "a.jpg", tree / "sub" / "b.PNG", tree / "a.jpg"])
    assert [f.name for f in files] == ["other/a.jpg", "a.jpg", "sub/b.PNG"]  # each file once
    assert [f.name for f in collect_images([tree / "sub" / "b.PNG"])] == ["b.PNG"]
    assert not any(f.name.startswith("/") for f in collect_images([tree]))


def test_file_urls_are_listed_and_read_through_their_filesystem(tree):
    files = collect_images([(tree / "sub").as_uri()])
    assert [f.name for f in files] == ["b.PNG", "deeper/c.webp"]
    assert [f.location for f in files] == [(tree / "sub/b.PNG").as_uri(), (tree / "sub/deeper/c.webp").as_uri()]
    assert files[1].read_bytes() == b"sub/deeper/c.webp" and files[1].absolute_path is None
    (single,) = collect_images([(tree / "a.jpg").as_uri()])
    assert single.name == "a.jpg" and single.read_bytes() == b"a.jpg"
    # the same names as the local folder's: a build resumed from a URL finds what the local one indexed
    assert [f.name for f in collect_images([tree.as_uri()])] == [f.name for f in collect_images([tree])]


def test_inputs_that_cannot_share_a_folder_or_do_not_exist_are_refused(tree):
    with pytest.raises(SystemExit, match="not several kinds"):
        collect_images([tree / "sub", (tree / "other").as_uri()])
    with pytest.raises(SystemExit, match="does not exist"):
        collect_images([tree / "missing"])
    with pytest.raises(SystemExit, match="does not exist"):
        collect_images([(tree / "missing").as_uri()])


def test_urls_and_paths_are_told_apart():
    assert is_url("s3://bucket/photos") and is_url("file:///data") and is_url("gs://b/x.jpg")
    assert not is_url("photos/a.jpg") and not is_url("/data/a://b") and not is_url("C:\\photos")


def test_a_link_inside_the_folder_is_named_inside_it(tree, tmp_path_factory):
    outside = tmp_path_factory.mktemp("elsewhere") / "d.jpg"
    outside.write_bytes(b"d")
    (tree / "sub" / "link.jpg").symlink_to(outside)
    (link,) = [f for f in collect_images([tree / "sub"]) if f.name == "link.jpg"]
    assert link.read_bytes() == b"d" and link.absolute_path == str(outside.resolve())
