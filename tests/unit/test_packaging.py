"""What a package owes its users beyond the code: `python -m clipsearch`, the templates `eval`
reads without open_clip, and messages that print paths and install lines as they are (Rich
markup would eat ``[red]`` and ``[torch]``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from clipsearch import __version__
from clipsearch._compat import import_open_clip
from clipsearch.evaluate import openai_imagenet_templates

from ..conftest import SAMPLE_PHOTOS, write_photos


def test_python_dash_m():
    done = subprocess.run([sys.executable, "-m", "clipsearch", "--version"], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == f"clipsearch {__version__}"


def test_templates_are_open_clips():
    templates = import_open_clip().zero_shot_metadata.OPENAI_IMAGENET_TEMPLATES
    assert openai_imagenet_templates() == [t("{}") for t in templates]


def test_brackets_print_as_they_are(cli, tmp_path):
    folder = tmp_path / "br[red]"
    write_photos(folder, SAMPLE_PHOTOS[:1])
    photo = next(folder.iterdir())
    photo.rename(photo.with_name("cup[1].jpg"))
    code, _, err = cli("ingest", str(folder), "-n", "ns[1]")
    assert code == 2 and "'ns[1]'" in err
    code, out, _ = cli("ingest", str(folder))
    assert code == 0
    code, out, _ = cli("search", "a photo")
    assert code == 0 and str(Path("br[red]") / "cup[1].jpg") in out
    code, _, err = cli("search", "--image", str(tmp_path / "holiday[red].jpg"))
    assert code != 0 and "holiday[red].jpg: file does not exist" in err
