"""ImageNetDataModule on a tiny generated ImageFolder tree.

Every image is a constant colour that encodes its identity: red = 10 + 20 * index,
green = 200 for train and 60 for val. The eval transform (resize, crop, normalize) keeps a
constant image constant, so un-normalizing a batch recovers which files it holds.
"""

import os
import pickle
import shutil
import struct
import zlib

import numpy as np
import pytest
import torch
from jsonargparse import ArgumentParser
from PIL import Image
from torch.utils.data import RandomSampler

from datamodules import ImageNetDataModule

CLASSES = ["ant", "bee", "cow"]
N_TRAIN, N_VAL = 4, 3  # per class
TRAIN_GREEN, VAL_GREEN = 200, 60
DEIT_MEAN, DEIT_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
IMG = 32


def _write_split(root, split, per_class, green):
    """Write the split; return {image id: (class index, path)} in ImageFolder's sorted order."""
    files = {}
    for label, name in enumerate(CLASSES):
        os.makedirs(root / split / name)
        for k in range(per_class):
            index = len(files)
            path = root / split / name / f"img{k}.png"
            Image.new("RGB", (40, 30), (10 + 20 * index, green, 30)).save(path)
            files[index] = (label, str(path))
    return files


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "imagenet"
    train = _write_split(root, "train", N_TRAIN, TRAIN_GREEN)
    val = _write_split(root, "val", N_VAL, VAL_GREEN)
    return root, train, val


def _dm(root, **kwargs):
    kwargs = {
        "img_size": IMG,
        "batch_size": 4,
        "num_workers": 0,
        "calib_batch_size": 2,
        "num_calib_batches": 3,
        "pin_memory": False,
        **kwargs,
    }
    return ImageNetDataModule(str(root), **kwargs)


def _decode(images, mean=DEIT_MEAN, std=DEIT_STD):
    """(B, 3, H, W) normalized constant images -> list of (image id, green)."""
    pixels = images * torch.tensor(std).view(1, 3, 1, 1) + torch.tensor(mean).view(1, 3, 1, 1)
    rgb = (pixels.mean(dim=(2, 3)) * 255).round().long()
    return [((int(r) - 10) // 20, int(g)) for r, g, _ in rgb]


def _ids(loader):
    return [[ident for ident, _ in _decode(x)] for x, _ in loader]


def test_val_batches_shapes_and_normalization(tree):
    root, _, val = tree
    dm = _dm(root)
    dm.setup("validate")
    x, y = next(iter(dm.val_dataloader()))
    assert x.shape == (4, 3, IMG, IMG) and x.dtype == torch.float32
    assert y.shape == (4,) and y.dtype == torch.int64
    # First val image: colour (10, 60, 30), DeiT mean/std, every pixel.
    expected = torch.tensor(
        [(c / 255 - m) / s for c, m, s in zip((10, VAL_GREEN, 30), DEIT_MEAN, DEIT_STD)]
    )
    torch.testing.assert_close(x[0], expected.view(3, 1, 1).expand(3, IMG, IMG), rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "model_name,mean,std",
    [
        ("vit_base", (0.5,) * 3, (0.5,) * 3),
        ("swin_tiny_patch4_window7_224.ms_in1k", DEIT_MEAN, DEIT_STD),
    ],
)
def test_model_name_selects_normalization(tree, model_name, mean, std):
    root, _, _ = tree
    dm = _dm(root, model_name=model_name)
    dm.setup("validate")
    x, _ = next(iter(dm.val_dataloader()))
    assert _decode(x, mean, std) == [(i, VAL_GREEN) for i in range(4)]


def test_val_loader_covers_each_val_image_once(tree):
    root, _, val = tree
    dm = _dm(root)
    dm.setup("validate")
    seen, sizes = [], []
    for x, y in dm.val_dataloader():
        sizes.append(len(y))
        for (ident, green), label in zip(_decode(x), y.tolist()):
            assert green == VAL_GREEN
            assert label == val[ident][0]
            seen.append(ident)
    assert sorted(seen) == list(range(len(CLASSES) * N_VAL))
    assert sizes == [4, 4, 1]  # 9 images, drop_last off
    assert _ids(dm.test_dataloader()) == _ids(dm.val_dataloader())


def test_calibration_loader_protocol(tree):
    root, train, _ = tree
    dm = _dm(root, seed=0)
    dm.setup("validate")
    batches = list(dm.calibration_dataloader())
    assert len(batches) == 3
    assert all(x.shape == (2, 3, IMG, IMG) for x, _ in batches)
    decoded = [item for x, _ in batches for item in _decode(x)]
    assert all(green == TRAIN_GREEN for _, green in decoded)  # train split, eval transform
    ids = [ident for ident, _ in decoded]
    # Same order as a DataLoader(shuffle=True) with a generator seeded 0 on the train split.
    expected = list(RandomSampler(range(len(train)), generator=torch.Generator().manual_seed(0)))[
        :6
    ]
    assert ids == expected
    labels = torch.cat([y for _, y in batches]).tolist()
    assert labels == [train[i][0] for i in ids]


def test_calibration_loader_deterministic_per_seed(tree):
    root, _, _ = tree
    first = _ids(_dm(root, seed=0).calibration_dataloader())
    again = _ids(_dm(root, seed=0, batch_size=5).calibration_dataloader())
    other = _ids(_dm(root, seed=1).calibration_dataloader())
    assert first == again
    assert first != other


def test_calibration_uses_eval_transform_even_with_augment(tree):
    root, _, _ = tree
    dm = _dm(root, train_transform="augment")
    dm.setup("fit")
    x, _ = next(iter(dm.train_dataloader()))
    assert x.shape == (4, 3, IMG, IMG)
    assert _ids(dm.calibration_dataloader()) == _ids(_dm(root).calibration_dataloader())


def test_train_loader_is_seeded_shuffle_of_train(tree):
    root, train, _ = tree
    order = [i for batch in _ids(_dm(root, seed=3).train_dataloader()) for i in batch]
    assert sorted(order) == sorted(train)
    assert order == [i for batch in _ids(_dm(root, seed=3).train_dataloader()) for i in batch]
    assert order != sorted(order)


def test_too_few_calibration_images(tree):
    root, _, _ = tree
    dm = _dm(root, calib_batch_size=5, num_calib_batches=3)  # 15 > 12 train images
    with pytest.raises(ValueError) as info:
        dm.calibration_dataloader()
    message = str(info.value)
    assert str(root / "train") in message and "15" in message and "12" in message


def test_missing_root(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        _dm(missing).setup("validate")


def test_missing_val_split(tree):
    root, _, _ = tree
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=str(root / "val")):
        _dm(root).setup("validate")


def test_validate_does_not_need_train_split(tree):
    root, _, _ = tree
    shutil.rmtree(root / "train")
    dm = _dm(root)
    dm.setup("validate")
    assert sum(len(y) for _, y in dm.val_dataloader()) == len(CLASSES) * N_VAL
    with pytest.raises(FileNotFoundError, match=str(root / "train")):
        dm.calibration_dataloader()
    with pytest.raises(FileNotFoundError, match=str(root / "train")):
        _dm(root).setup("fit")


@pytest.mark.parametrize("keep_class_folders", [True, False])
def test_empty_split(tree, keep_class_folders):
    root, _, _ = tree
    shutil.rmtree(root / "val")
    (root / "val").mkdir()
    if keep_class_folders:
        for name in CLASSES:
            (root / "val" / name).mkdir()
    with pytest.raises(FileNotFoundError, match=str(root / "val")):
        _dm(root).setup("validate")


def test_mismatched_classes(tree):
    root, _, _ = tree
    shutil.rmtree(root / "val" / "cow")
    with pytest.raises(ValueError, match="cow"):
        _dm(root).setup("fit")


def test_corrupt_image_names_its_path(tree):
    root, _, _ = tree
    bad = root / "val" / "bee" / "x.jpg"
    bad.write_bytes(b"this is not a jpeg" * 10)
    dm = _dm(root)
    dm.setup("validate")
    with pytest.raises(RuntimeError) as info:
        for _ in dm.val_dataloader():
            pass
    assert f"cannot decode image {bad}" in str(info.value)


def test_truncated_image_names_its_path(tree):
    root, _, _ = tree
    good = root / "val" / "ant" / "img0.png"
    good.write_bytes(good.read_bytes()[:40])
    dm = _dm(root)
    dm.setup("validate")
    with pytest.raises(RuntimeError, match=f"cannot decode image {good}"):
        list(dm.val_dataloader())


def test_dataset_pickles_for_workers(tree):
    # Stands in for a num_workers > 0 run: torch's worker shutdown after an error costs 5 s.
    root, _, _ = tree
    dm = _dm(root)
    dm.setup("fit")
    for loader in (dm.val_dataloader(), dm.train_dataloader(), dm.calibration_dataloader()):
        clone = pickle.loads(pickle.dumps(loader.dataset))
        assert clone[0][0].shape == (3, IMG, IMG)


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"model_name": "resnet50"}, "resnet50"),
        ({"train_transform": "random"}, "train_transform"),
        ({"batch_size": 0}, "batch_size"),
        ({"num_calib_batches": 0}, "num_calib_batches"),
        ({"num_workers": -1}, "num_workers"),
    ],
)
def test_bad_arguments(tree, kwargs, word):
    root, _, _ = tree
    with pytest.raises(ValueError, match=word):
        _dm(root, **kwargs)


def test_arguments_are_cli_configurable():
    parser = ArgumentParser()
    parser.add_class_arguments(ImageNetDataModule, "data")
    cfg = parser.parse_args(
        ["--data.root=/data/imagenet", "--data.model_name=swin_tiny", "--data.seed=3"]
    )
    assert (
        cfg.data.root == "/data/imagenet"
        and cfg.data.model_name == "swin_tiny"
        and cfg.data.seed == 3
    )
    assert cfg.data.num_calib_batches == 10 and cfg.data.calib_batch_size == 100


def _write_png16(path, values):
    """A 16-bit PNG by hand (Pillow writes no 16-bit RGB): ``values`` uint16 (H, W) grey or (H, W, 3)."""
    values = np.asarray(values, dtype=">u2")
    height, width = values.shape[:2]
    colour = 2 if values.ndim == 3 else 0
    rows = b"".join(b"\x00" + values[i].tobytes() for i in range(height))

    def chunk(kind, data):
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", width, height, 16, colour, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("channels", [1, 3])
def test_16_bit_pngs_load_as_their_8_bit_equivalents(tmp_path, channels):
    # v16 = 257 * v8 is exactly v8 / 255 of the 16-bit range, so the 8-bit tree is the reference.
    rng = np.random.default_rng(0)
    trees = {bits: tmp_path / f"png{bits}" for bits in (8, 16)}
    for name in CLASSES:
        for split in ("train", "val"):
            pixels = rng.integers(0, 256, size=(36, 40, 3)[: 2 if channels == 1 else 3])
            for bits, root in trees.items():
                os.makedirs(root / split / name)
                path = root / split / name / "img.png"
                if bits == 8:
                    Image.fromarray(pixels.astype(np.uint8)).save(path)
                else:
                    _write_png16(path, pixels * 257)
    eight, sixteen = (_dm(root, batch_size=3).val_dataloader() for root in trees.values())
    (x8, y8), (x16, y16) = next(iter(eight)), next(iter(sixteen))
    assert torch.equal(y8, y16) and torch.equal(x8, x16)


def test_32_bit_images_are_refused_by_name(tree):
    root, _, _ = tree
    path = root / "val" / "ant" / "wide.tif"
    Image.fromarray(np.full((30, 40), 70000, dtype=np.int32), mode="I").save(path)
    dm = _dm(root)
    dm.setup("validate")
    with pytest.raises(RuntimeError, match=f"cannot use image {path}: its pixels are 32-bit"):
        list(dm.val_dataloader())
