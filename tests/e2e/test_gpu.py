"""What only a CUDA GPU can check (skipped elsewhere; ``benchmarks/gpu_check.sh`` runs it on a
GPU machine): fp16 on the GPU against fp32 on the CPU, pinned host batches, decode processes
beside a GPU model, and Ray actors that each take a GPU."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from clipsearch.encoders import ModelSpec, load_encoder

from ..conftest import noise_images, stored_vectors
from ..trained import CLASSES, write_dataset

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.parametrize("fixture", ["trained_clip", "tiny_hf"])
def test_fp16_on_the_gpu_matches_fp32_on_the_cpu(request, fixture, tmp_path):
    weights = request.getfixturevalue(fixture)
    gpu = load_encoder(ModelSpec(weights=weights, device="cuda"))
    cpu = load_encoder(ModelSpec(weights=weights, device="cpu"))
    assert gpu.identity.same_space(cpu.identity)
    texts = ["a photo of a red circle", "", "빨간 원", "赤い丸の写真", "word " * 100]
    assert np.min(np.sum(gpu.embed_texts(texts) * cpu.embed_texts(texts), axis=1)) >= 0.999
    h, w = cpu.preprocess_spec.size
    crops = np.random.default_rng(0).integers(0, 256, (64, h, w, 3), dtype=np.uint8)
    # 64 crops: a batch large enough to go through the pinned host buffer
    assert np.min(np.sum(gpu.embed_crops(crops) * cpu.embed_crops(crops), axis=1)) >= 0.999


def test_ingest_on_the_gpu_with_decode_processes_matches_the_cpu(cli, trained_clip, tmp_path):
    dataset = write_dataset(tmp_path / "shapes", 8, seed=5)
    common = [dataset, "--weights", trained_clip, "--json"]
    code, out, err = cli("ingest", *common, "--db", tmp_path / "cpu.db", "--device", "cpu")
    assert code == 0, err
    code, out, err = cli("ingest", *common, "--db", tmp_path / "gpu.db", "--device", "cuda", "--worker-type", "process")
    assert code == 0, err
    assert json.loads(out)["embedded"] == len(CLASSES) * 8
    cpu, gpu = stored_vectors(tmp_path / "cpu.db"), stored_vectors(tmp_path / "gpu.db")
    assert sorted(cpu) == sorted(gpu)
    assert min(float(np.dot(cpu[i], gpu[i])) for i in cpu) >= 0.999


def test_ray_actors_each_take_a_gpu(cli, tiny_openclip, tmp_path):
    ray = pytest.importorskip("ray")
    folder = tmp_path / "photos"
    noise_images(folder, 40, size=(320, 240))
    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        code, out, err = cli(
            "ingest", folder, "--weights", tiny_openclip, "--db", tmp_path / "r.db", "--ray", "local",
            "--actors", "1", "--gpus-per-actor", "1", "--device", "cuda", "--json",
        )  # fmt: skip
    finally:
        ray.shutdown()
    assert code == 0, err
    assert json.loads(out)["embedded"] == 40
