"""The recipe's loader parts without a generated package: persistent workers, the prefetcher's side stream, predict.py.

Persistent loader workers keep their own copy of the dataset, so the epoch that seeds each image's
augmentation travels with its index (scmc_runtime.data.EpochIndexed); the batches must be bitwise
those of a loader without persistent workers, epoch after epoch and after a mid-epoch resume.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from scmc_runtime.data import EpochIndexed, ImageFolderDataset, ImageTransform, ResumableSampler, build_loader
from scmc_runtime.distributed import DistInfo

pytest.importorskip("PIL")
pytest.importorskip("sklearn")


def _dist() -> DistInfo:
    return DistInfo(rank=0, local_rank=0, world_size=1, device=torch.device("cpu"), backend=None, is_main=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.test_recipe import write_image_folder

    return write_image_folder(tmp_path_factory.mktemp("images"), per_class=4) / "train"


def _epoch(loader, epoch: int, skip: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    loader.sampler.set_epoch(epoch, skip_batches=skip)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def _same(left, right) -> bool:
    return len(left) == len(right) and all(
        torch.equal(a, c) and torch.equal(b, d) for (a, b), (c, d) in zip(left, right)
    )


def test_persistent_workers_see_each_epochs_augmentation_seed_and_resume_exactly(folder: Path):
    dataset = ImageFolderDataset(folder, ImageTransform(16, translate=3, hflip=True), seed=3)
    plain = build_loader(dataset, 8, True, _dist(), workers=0, seed=3)
    persistent = build_loader(dataset, 8, True, _dist(), workers=2, seed=3, persistent_workers=True)
    assert persistent.persistent_workers and isinstance(persistent.dataset, EpochIndexed)
    assert persistent.sampler.with_epoch and not plain.sampler.with_epoch
    expected = [_epoch(plain, epoch) for epoch in range(3)]
    assert not _same(expected[0], expected[1])  # the augmentation differs from epoch to epoch
    workers = None
    for epoch in range(3):
        assert _same(_epoch(persistent, epoch), expected[epoch]), epoch
        ids = persistent._iterator._workers  # the same worker processes every epoch
        assert workers is None or ids is workers
        workers = ids
    # an epoch cut short (--max-steps), then a resume mid-epoch in the same persistent workers
    next(iter(persistent))
    assert _same(_epoch(persistent, 1, skip=2), expected[1][2:])
    assert _same(_epoch(persistent, 0), expected[0])


def test_persistent_workers_need_workers_and_the_epoch_index_pairs_are_the_samplers():
    loader = build_loader(list(range(10)), 2, True, _dist(), workers=0, persistent_workers=True)
    assert not loader.persistent_workers and not loader.sampler.with_epoch
    sampler = ResumableSampler(torch.utils.data.SequentialSampler(range(6)), 2, with_epoch=True)
    sampler.set_epoch(4, skip_batches=1)
    assert list(sampler) == [(4, 2), (4, 3), (4, 4), (4, 5)]


def test_each_repeat_of_an_image_gets_an_augmentation_of_its_own(folder: Path):
    """--num-aug-repeats: RepeatAugSampler yields an image N times an epoch; the copy number joins its seed."""
    pytest.importorskip("timm")
    from scmc_runtime.recipe import train_sampler

    dataset = ImageFolderDataset(folder, ImageTransform(16, translate=3, hflip=True), seed=0)
    sampler = train_sampler(dataset, rank=0, world_size=1, seed=0, repeats=2)
    loader = build_loader(dataset, 4, True, _dist(), sampler=sampler)
    assert isinstance(loader.dataset, EpochIndexed)
    loader.sampler.set_epoch(0)
    keys = list(loader.sampler)
    assert [index for _, index in keys[0::2]] == [index for _, index in keys[1::2]]  # each image twice in a row
    assert [key // ResumableSampler.COPY_STRIDE for key, _ in keys[:4]] == [0, 1, 0, 1]
    images = torch.cat([batch for batch, _ in loader])
    assert not torch.equal(images[0], images[1])  # the two copies of one image differ
    again = build_loader(
        dataset, 4, True, _dist(), sampler=train_sampler(dataset, rank=0, world_size=1, seed=0, repeats=2)
    )
    assert torch.equal(torch.cat([batch for batch, _ in _epoch_images(again, 0)]), images)  # and are reproducible


def _epoch_images(loader, epoch: int):
    loader.sampler.set_epoch(epoch)
    return list(loader)


# ------------------------------------------------------------------------------------------
# predict.py: the recipe's eval transform (crop_pct), driven by scmc export's ONNX metadata

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
SHAPES = [(300, 200), (200, 300), (64, 64), (33, 47), (500, 375), (20, 20)]


def _predict_module(tmp_path: Path):
    import importlib.util

    from scmc.emit.predict import render_predict

    path = tmp_path / "recipe_predict.py"
    path.write_text(render_predict("recipe_pkg", "image", 32, list(MEAN), list(STD), None, 3))
    spec = importlib.util.spec_from_file_location("_scmc_recipe_predict", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _photos(tmp_path: Path) -> list[Path]:
    """Smooth, textured test pictures (a gradient and noise), saved as PNG and JPEG."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = []
    for n, (h, w) in enumerate(SHAPES):
        yy, xx = np.mgrid[0:h, 0:w]
        base = np.stack([xx * 255 / w, yy * 255 / h, (xx + yy) * 127 / (h + w)], axis=-1)
        pixels = np.clip(base + rng.normal(0, 40, (h, w, 3)), 0, 255).astype(np.uint8)
        path = tmp_path / f"{h}x{w}.{'png' if n % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path)
        paths.append(path)
    return paths


@pytest.mark.parametrize("interpolation", ["bicubic", "bilinear"])
@pytest.mark.parametrize("size,crop_pct", [(32, 0.875), (224, 0.95), (24, 1.0)])
def test_predict_preprocessing_with_crop_pct_is_timms_eval_transform(
    tmp_path: Path, size: int, crop_pct: float, interpolation: str
):
    import numpy as np
    from PIL import Image

    timm_data = pytest.importorskip("timm.data")
    predict = _predict_module(tmp_path)
    timm_eval = timm_data.create_transform(
        size, is_training=False, crop_pct=crop_pct, interpolation=interpolation, mean=MEAN, std=STD
    )
    for path in _photos(tmp_path):
        ours = predict.preprocess(str(path), (size, size), MEAN, STD, crop_pct=crop_pct, interpolation=interpolation)
        with Image.open(path) as image:
            theirs = timm_eval(image.convert("RGB")).numpy()
        assert ours.dtype == np.float32 and ours.shape == theirs.shape == (3, size, size), path.name
        assert np.abs(ours - theirs).max() < 1e-6, (path.name, float(np.abs(ours - theirs).max()))


def _pooling_onnx(path: Path, preprocess: dict) -> Path:
    """A real 3-class ONNX model: the mean of each channel of the prepared image, with scmc.preprocess."""
    import json

    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["image"], ["pooled"]),
            helper.make_node("Flatten", ["pooled"], ["cls"]),
        ],
        "pool",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, "h", "w"])],
        [helper.make_tensor_value_info("cls", TensorProto.FLOAT, ["batch", 3])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 8
    entry = model.metadata_props.add()
    entry.key, entry.value = "scmc.preprocess", json.dumps(preprocess)
    onnx.save(model, str(path))
    return path


def test_predict_takes_crop_pct_from_the_onnx_metadata_and_keeps_the_default_path_without_it(tmp_path: Path):
    import numpy as np
    from PIL import Image

    pytest.importorskip("onnxruntime")
    timm_data = pytest.importorskip("timm.data")
    predict = _predict_module(tmp_path)
    photo = _photos(tmp_path)[0]  # 300 x 200: the crop removes a band that a plain resize keeps
    recorded = {"image_size": 32, "mean": list(MEAN), "std": list(STD), "crop_pct": 0.5, "interpolation": "bilinear"}
    cropped = _pooling_onnx(tmp_path / "timm.onnx", recorded)
    plain = _pooling_onnx(tmp_path / "plain.onnx", {"image_size": 32, "mean": list(MEAN), "std": list(STD)})

    def probabilities(model: Path) -> np.ndarray:
        (result,) = predict.predict(str(model), [str(photo)], topk=3)
        return np.array([item["probability"] for item in sorted(result["topk"], key=lambda item: item["index"])])

    timm_eval = timm_data.create_transform(
        32, is_training=False, crop_pct=0.5, interpolation="bilinear", mean=MEAN, std=STD
    )
    with Image.open(photo) as image:
        expected = predict.softmax(timm_eval(image.convert("RGB")).numpy().mean(axis=(1, 2)))
    assert np.abs(probabilities(cropped) - expected).max() < 1e-5
    default = predict.softmax(predict.preprocess(str(photo), (32, 32), MEAN, STD).mean(axis=(1, 2)))
    assert np.abs(probabilities(plain) - default).max() < 1e-5
    assert np.abs(expected - default).max() > 1e-3  # the two paths differ on this picture

    for bad, key in (
        ({"crop_pct": 1.5}, "crop_pct"),
        ({"crop_pct": "a lot"}, "crop_pct"),
        ({"interpolation": "cubic"}, "interpolation"),
    ):
        model = _pooling_onnx(tmp_path / f"bad_{key}.onnx", {"image_size": 32, **bad})
        with pytest.raises(predict.PredictError, match=rf"scmc\.preprocess\.{key}"):
            predict.predict(str(model), [str(photo)])


def test_export_records_crop_pct_and_interpolation_for_a_timm_pipeline_run():
    from types import SimpleNamespace

    from scmc.export.preprocess import preprocessing

    info = SimpleNamespace(manifest={})
    timm_run = {"config": {"data_pipeline": "timm", "crop_pct": 0.9, "interpolation": "bilinear", "image_size": 32}}
    recorded = preprocessing(info, timm_run, [3, 32, 32])  # type: ignore[arg-type]
    assert recorded["crop_pct"] == 0.9 and recorded["interpolation"] == "bilinear"
    assert recorded["resize"].startswith("timm eval")
    basic = preprocessing(info, {"config": {"data_pipeline": "basic", "crop_pct": 0.9}}, [3, 32, 32])  # type: ignore[arg-type]
    assert "crop_pct" not in basic and "interpolation" not in basic and "antialias=True" in basic["resize"]


# ------------------------------------------------------------------------------------------
# The prefetcher path: the next batch prepared on a CUDA side stream (CPU: one call per step, as before)


def _prefetch_recipe(device: torch.device):
    pytest.importorskip("timm")
    from scmc_runtime.recipe import BatchRecipe, Recipe

    recipe = Recipe(
        image_size=8, data_pipeline="timm", use_prefetcher=True, mixup=0.8, cutmix=1.0, reprob=0.5, label_smoothing=0.1
    )
    return BatchRecipe(recipe, 10, device, seed=7, rank=1)


def _uint8_batches(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        (torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8, generator=generator), torch.arange(4) + step)
        for step in range(n)
    ]


def test_the_prefetcher_on_cpu_prepares_each_batch_in_turn_exactly_as_a_call_per_step():
    prepare = _prefetch_recipe(torch.device("cpu"))
    assert not prepare.side_stream()
    batches = _uint8_batches(5)
    pulled = []

    def source():
        for batch in batches:
            pulled.append(1)
            yield batch

    taken = []
    for step, prepared in enumerate(prepare.prefetch(source(), epoch=2, first_step=3), start=3):
        taken.append(step)
        assert len(pulled) == step - 2  # nothing read ahead on CPU
        expected = prepare(*batches[step - 3], epoch=2, step=step)
        assert all(torch.equal(a, b) for a, b in zip(prepared, expected)), step
    assert taken == [3, 4, 5, 6, 7]
    lazy = prepare.prefetch(iter(batches), epoch=0)
    assert next(lazy)[0].dtype == torch.float32 and next(lazy)[1].shape == (4, 10)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the side stream needs a CUDA device")
def test_the_prefetcher_on_cuda_prepares_the_next_batch_on_a_side_stream_and_gives_the_same_batches():
    device = torch.device("cuda", torch.cuda.current_device())
    prepare = _prefetch_recipe(device)
    assert prepare.side_stream()
    batches = [(images.pin_memory(), labels.pin_memory()) for images, labels in _uint8_batches(6)]
    expected = [prepare(*batch, epoch=1, step=step) for step, batch in enumerate(batches)]
    streams = []
    call = type(prepare).__call__

    def recording(self, images, labels, *, epoch, step):
        streams.append(torch.cuda.current_stream(device))
        return call(self, images, labels, epoch=epoch, step=step)

    consumed = []
    main = torch.cuda.current_stream(device)
    try:
        type(prepare).__call__ = recording
        for step, prepared in enumerate(prepare.prefetch(iter(batches), epoch=1)):
            consumed.append(len(streams))
            # a long kernel on the current stream while the side stream prepares the next batch
            work = prepared[0].float().repeat(64, 1, 1, 1)
            for _ in range(20):
                work = work * 1.0001
            assert all(torch.equal(a, b) for a, b in zip(prepared, expected[step])), step
    finally:
        type(prepare).__call__ = call
    torch.cuda.synchronize(device)
    assert len(streams) == 6 and all(s != main for s in streams)
    assert consumed == [2, 3, 4, 5, 6, 6]  # one batch ahead: batch k + 1 is in preparation during step k
