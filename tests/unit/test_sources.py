"""Listing folders and image lists."""

from __future__ import annotations

import os

import pytest
from PIL import Image

from clipsearch.errors import UsageError
from clipsearch.source_spec import parse_source
from clipsearch.sources import FolderSource, ImageListSource, file_id


def _touch_image(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(path, "PNG")


def test_folder_is_recursive_case_insensitive_and_skips_other_files(tmp_path):
    for rel in ("a.JPG", "b.png", "sub/c.WebP", "sub/deeper/d.tiff", "notes.txt", "sub/e.jpeg.bak"):
        _touch_image(tmp_path / rel)
    names = sorted(i.metadata["filename"] for i in FolderSource(tmp_path))
    assert names == ["a.JPG", "b.png", "c.WebP", "d.tiff"]
    flat = sorted(i.metadata["filename"] for i in FolderSource(tmp_path, recursive=False))
    assert flat == ["a.JPG", "b.png"]


def test_symlink_cycles_do_not_loop(tmp_path):
    _touch_image(tmp_path / "x" / "one.png")
    os.symlink(tmp_path, tmp_path / "x" / "loop")  # x/loop -> root -> x -> loop ...
    os.symlink(tmp_path / "x", tmp_path / "x-again")
    items = list(FolderSource(tmp_path))
    assert [i.metadata["filename"] for i in items] == ["one.png"]


def test_item_metadata_and_stable_ids(tmp_path):
    _touch_image(tmp_path / "Cat.PNG")
    (item,) = list(parse_source(str(tmp_path)))
    assert item.metadata == {
        "type": "image",
        "filename": "Cat.PNG",
        "path": str(tmp_path / "Cat.PNG"),
        "extension": "png",
    }
    assert item.id == file_id(tmp_path / "Cat.PNG") and len(item.id) == 16
    assert item.size == (tmp_path / "Cat.PNG").stat().st_size


def test_image_list_with_labels_comments_and_relative_paths(tmp_path):
    _touch_image(tmp_path / "imgs" / "a.png")
    _touch_image(tmp_path / "imgs" / "b, with comma.png")
    lst = tmp_path / "list.csv"
    lst.write_text(
        "# path,label,more\n"
        "\n"
        "imgs/a.png,cat,indoor,2021\n"
        '"imgs/b, with comma.png",dog\n'
        f"{tmp_path / 'imgs' / 'a.png'},duplicate\n"
        "missing.png\n"
    )
    items = list(ImageListSource(lst))
    assert items[0].metadata["label"] == "cat"
    assert items[0].metadata["label_2"] == "indoor"
    assert items[0].metadata["label_3"] == "2021"
    assert items[1].metadata["filename"] == "b, with comma.png" and items[1].metadata["label"] == "dog"
    assert items[2].id == items[0].id  # the same file by absolute path
    assert items[3].path == tmp_path / "missing.png" and "label" not in items[3].metadata


def test_parse_source_errors(tmp_path):
    with pytest.raises(UsageError, match="no such file or folder"):
        parse_source(str(tmp_path / "nope"))
    with pytest.raises(UsageError, match="is not a folder"):
        parse_source(f"images:{tmp_path / 'nope'}")
    with pytest.raises(UsageError, match=r"list file .* does not exist"):
        parse_source(f"image-list:{tmp_path / 'nope.txt'}")
    with pytest.raises(UsageError, match="unknown source kind 'ftp'"):
        parse_source("ftp:whatever")
    assert isinstance(parse_source(f"images:{tmp_path}"), FolderSource)


def test_select_items_filters_then_samples_by_id_hash():
    from clipsearch.sources import SourceItem, select_items

    items = [
        SourceItem(f"id{i}", "", None, {"client": "A" if i % 2 else "B", "tags": ["x", str(i)], "ok": i < 5})
        for i in range(20)
    ]
    assert [it.id for it in select_items(items, {"client": ["A"], "ok": ["true"]})] == ["id1", "id3"]
    assert [it.id for it in select_items(items, {"tags": ["7"]})] == ["id7"]
    sample = select_items(items, sample=5, seed=3)
    assert len(sample) == 5 and sample == select_items(list(reversed(items)), sample=5, seed=3)[::-1]
    # in a grown catalog, the old items a sample picks are always among those it picked before
    grown = select_items(items + [SourceItem(f"new{i}", "", None) for i in range(30)], sample=5, seed=3)
    old_ids = {it.id for it in grown if not it.id.startswith("new")}
    assert old_ids <= {it.id for it in sample} and len(grown) == 5
