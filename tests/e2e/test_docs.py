"""Every shell and Python example in README.md and docs/ runs as written, so that none can drift.

Each page runs top to bottom in its own sandbox, as a reader would type it: one folder as the
working directory and as ``$HOME``, the blocks in order, each shell block's exported variables
and working directory carried to the next. A block runs unless its fence says why it cannot
(```` ```sh {not run: starts Docker} ````); what a block shows as output in comments is not checked,
but it must exit 0. The sandbox holds what the pages assume a reader has (``SCENE``):

- ``~/Pictures`` with a few photos (``dog.jpg``, ``cat.jpg``, ``beach.jpg``, a ``2024`` subfolder);
- ``~/datasets/cifar10-test`` (class subfolders), ``labelled.csv`` (an image list with labels),
  ``captions.csv`` (images and captions), ``query.jpg`` and ``shoe.jpg``;
- ``products.csv``: a small catalog whose image URLs are served by a local HTTP server;
- the Hugging Face cache holding ``immich-app/ViT-B-32__openai``: the suite's trained tiny model
  exported to towers, so that the pages' model runs offline and torch-free.

Three things a sandbox cannot have are mapped, and only these (``SUBSTITUTIONS``): the pages'
PostgreSQL URL becomes the test server's, ``shop.example`` the local image server, and ports
8080 and 8081 free ports. Processes a block leaves in the background (``clipsearch serve &``) are
stopped when the page ends.
"""

from __future__ import annotations

import contextlib
import csv
import os
import re
import shutil
import signal
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image

from ..conftest import free_port, hub_with_towers, sample_photo

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```([\w-]*)[ \t]*(\{[^}\n]*\})?[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"\{not run: ([^}]+)\}")
RUNNABLE = {"sh": "bash", "bash": "bash", "python": "python"}
MODEL = "immich-app/ViT-B-32__openai"


@dataclass
class Block:
    page: Path
    line: int
    lang: str
    code: str
    not_run: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line} ({self.lang})"


def blocks(page: Path) -> list[Block]:
    text = page.read_text()
    found = []
    for m in FENCE.finditer(text):
        lang, attrs, code = m.group(1), m.group(2) or "", m.group(3)
        if lang not in RUNNABLE:
            continue
        reason = NOT_RUN.search(attrs)
        found.append(Block(page, text.count("\n", 0, m.start()) + 1, lang, code, reason and reason.group(1)))
    return found


# what a block may be left out for: what no sandbox has, or what never ends by itself
REASONS = (
    "installs packages",
    "builds the development environment",
    "needs Docker",
    "needs a Ray cluster",
    "watches until stopped",
)


def test_pages_have_examples_and_every_skip_says_why():
    every = [b for page in PAGES for b in blocks(page)]
    assert len(every) > 20
    skipped = [b for b in every if b.not_run is not None]
    unexplained = [str(b) for b in skipped if not b.not_run.startswith(REASONS)]
    assert unexplained == []


# -- the sandbox --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def hub(trained_clip, tmp_path_factory) -> Path:
    """HF_HOME with the pages' model: the trained tiny CLIP as Immich-layout towers."""
    return hub_with_towers(trained_clip, MODEL, tmp_path_factory.mktemp("docs-model"))


def build_scene(home: Path, shop: str) -> None:
    pictures = home / "Pictures"
    for i, (sample, name) in enumerate(
        [("chelsea", "cat"), ("coffee", "dog"), ("rocket", "beach"), ("astronaut", "2024/astronaut")]
    ):
        path = pictures / f"{name}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        # as a phone writes them: the camera and the time taken (the pages filter on both)
        exif = Image.Exif()
        exif[0x010F], exif[0x0110], exif[0x0132] = "Apple", "iPhone 13", f"2024:0{i + 5}:1{i} 12:00:00"
        if name == "beach":  # Bondi, in the southern hemisphere
            exif[0x8825] = {1: "S", 2: (33.0, 53.0, 28.0), 3: "E", 4: (151.0, 16.0, 37.0)}
        sample_photo(sample).save(path, "JPEG", quality=90, exif=exif)
    dataset = home / "datasets" / "cifar10-test"
    for label, samples in {"cat": ["chelsea", "astronaut"], "rocket": ["rocket", "coffee"]}.items():
        for sample in samples:
            (dataset / label).mkdir(parents=True, exist_ok=True)
            sample_photo(sample).resize((64, 48)).save(dataset / label / f"{sample}.jpg", "JPEG", quality=90)
    (home / "labelled.csv").write_text("Pictures/cat.jpg,cat\nPictures/dog.jpg,dog\nPictures/beach.jpg,beach\n")
    (home / "captions.csv").write_text(
        "image,caption\nPictures/cat.jpg,a cat on a sofa\nPictures/dog.jpg,a dog\nPictures/beach.jpg,a beach\n"
    )
    shutil.copy(pictures / "cat.jpg", home / "query.jpg")
    shutil.copy(pictures / "dog.jpg", home / "shoe.jpg")
    with open(home / "products.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["product_id", "image_url", "title", "tags", "client", "price"])
        for i, (photo, title) in enumerate(
            [("astronaut", "Space suit"), ("coffee", "Red mug"), ("rocket", "Toy rocket"), ("chelsea", "Red dress")]
        ):
            writer.writerow([f"SKU-{123 + i}", f"{shop}/img/{photo}.jpg", title, "gift,new", "BigClient", 19.99 + i])


def substitutions(pg: str, shop: str) -> dict[str, str]:
    return {
        "postgresql://app:secret@db.internal/catalog": pg,
        "https://shop.example": shop,
        "8080": str(free_port()),
        "8081": str(free_port()),
    }


class Sandbox:
    def __init__(self, home: Path, env: dict[str, str], subs: dict[str, str]):
        self.home, self.env, self.subs = home, env, subs
        self.cwd = home
        self.groups: list[int] = []

    def run(self, block: Block) -> None:
        code = block.code
        for old, new in self.subs.items():
            code = code.replace(old, new)
        state = self.home / ".block-state"
        if block.lang == "python":
            argv = [sys.executable, "-c", code]
        else:
            script = f"set -eo pipefail\n{code}\n{{ pwd; env -0; }} > {state}\n"
            argv = ["bash", "-c", script]
        log = self.home / ".block-output"
        # output to a file, not a pipe: what a block leaves running (serve &) keeps a pipe open
        with open(log, "w") as output:
            proc = subprocess.Popen(
                argv,
                cwd=self.cwd,
                env=self.env,
                stdout=output,
                stderr=subprocess.STDOUT,
                text=True,
                start_new_session=True,  # so that what it leaves in the background can be stopped
            )
            self.groups.append(proc.pid)
            try:
                proc.wait(timeout=240)
            except subprocess.TimeoutExpired:
                self.stop()
                raise AssertionError(f"{block} did not finish in 240 s") from None
        out = log.read_text()
        assert proc.returncode == 0, f"{block} exited {proc.returncode}:\n{code}\n--- output ---\n{out[-4000:]}"
        if block.lang != "python":
            cwd, _, env = state.read_text().partition("\n")
            self.cwd = Path(cwd)
            self.env = dict(item.split("=", 1) for item in env.split("\0") if "=" in item)

    def stop(self) -> None:
        for group in self.groups:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(group, signal.SIGTERM)


@pytest.mark.parametrize(
    "page",
    [p for p in PAGES if any(b.not_run is None for b in blocks(p))],
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_page_examples_run(page, hub, pg_url, image_server, tmp_path):
    runnable = [b for b in blocks(page) if b.not_run is None]
    home = tmp_path / "home"
    home.mkdir()
    shop = image_server.url.rstrip("/")
    build_scene(home, shop)
    bin_dir = str(Path(sys.executable).parent)
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "HOME": str(home),
        "HF_HOME": str(hub),
        "HF_HUB_OFFLINE": "1",
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_DATA_HOME": str(home / ".local" / "share"),
        "CLIPSEARCH_ONNX_CACHE": str(home / ".cache" / "onnx"),
        "LANG": "C.UTF-8",
    }
    sandbox = Sandbox(home, env, substitutions(pg_url, shop))
    try:
        for block in runnable:
            sandbox.run(block)
    finally:
        sandbox.stop()


HEADING = re.compile(r"^#{1,6} (.+)$", re.M)
LINK = re.compile(r"\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_pages_resolve():
    """Every relative link names a file that exists and, with ``#anchor``, a heading in it."""
    anchors = {}
    for page in PAGES:
        text = FENCE.sub("", page.read_text())
        anchors[page] = {slug(h) for h in HEADING.findall(text)}
    broken = []
    for page in PAGES:
        for target in LINK.findall(FENCE.sub("", page.read_text())):
            if re.match(r"^[a-z]+:", target):
                continue  # http(s) and mailto
            path, _, anchor = target.partition("#")
            file = (page.parent / path).resolve() if path else page
            if not file.exists() or (anchor and file.suffix == ".md" and anchor not in anchors.get(file, set())):
                broken.append(f"{page.relative_to(ROOT)}: {target}")
    assert broken == []


def test_the_command_reference_is_current():
    """docs/cli.md holds every command's --help as cog wrote it; a changed option makes it stale."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CLIPSEARCH_")}
    result = subprocess.run(
        [sys.executable, "-m", "cogapp", "--check", "docs/cli.md"], cwd=ROOT, env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, f"docs/cli.md is stale: run cog -r docs/cli.md\n{result.stdout}{result.stderr}"
