"""common.py: the image loaders (real torchvision code on tiny files), the EMNIST orientation, run folders, errors."""
import argparse
import json
import os

import numpy as np
import pytest
import torch

import common
from conftest import make_mnist_like, write_idx


def test_mnist_loader_scales_and_holds_out_validation(tiny_mnist):
    x, y, xv, yv = common.load_image_dataset("mnist", tiny_mnist, train=True, val_size=100)
    assert x.shape == (500, 1, 28, 28) and xv.shape == (100, 1, 28, 28)
    assert x.min() == -1 and x.max() == 1 and y.dtype == torch.int64
    x2, _, xv2, _ = common.load_image_dataset("mnist", tiny_mnist, train=True, val_size=100)
    assert torch.equal(xv, xv2)  # a fixed split
    xt, yt = common.load_image_dataset("mnist", tiny_mnist, train=False)
    assert len(xt) == 200 and set(yt.tolist()) == set(range(10))


def test_emnist_comes_out_upright(tmp_path):
    """An 'L' (bar down the left, foot along the bottom) stored transposed, as EMNIST stores every glyph,
    must load as an L, not as its mirror image across the diagonal."""
    glyph = np.zeros((28, 28), np.uint8)
    glyph[4:24, 6:9] = 255   # vertical bar on the left
    glyph[21:24, 6:20] = 255  # foot at the bottom
    raw = tmp_path / "EMNIST" / "raw"
    raw.mkdir(parents=True)
    for split in ("train", "test"):
        write_idx(str(raw / f"emnist-balanced-{split}-images-idx3-ubyte"), np.stack([glyph.T] * 47))
        write_idx(str(raw / f"emnist-balanced-{split}-labels-idx1-ubyte"), np.arange(47))
    x, y = common.load_image_dataset("emnist-balanced", str(tmp_path), train=False)
    img = x[0, 0] > 0
    assert img[4:24, 6:9].all() and img[21:24, 6:20].all() and not img[6:9, 10:24].any()


def test_emnist_balanced_class_mapping():
    c = common.EMNIST_BALANCED_CLASSES
    assert len(c) == 47 and len(set(c)) == 47
    assert c[:10] == list("0123456789") and c[10] == "A" and c[35] == "Z"
    assert "a" in c and "A" in c and "c" not in c and "o" not in c  # c/C and o/O look alike: merged


def test_missing_dataset_is_a_one_line_usage_error(tmp_path):
    with pytest.raises(common.UsageError) as e:
        common.load_image_dataset("mnist", str(tmp_path / "nowhere"))
    msg = str(e.value)
    assert "MNIST" in msg and "train-images-idx3-ubyte" in msg and "--data-root" in msg and "\n" not in msg
    with pytest.raises(common.UsageError):
        common.load_image_dataset("imagenet", str(tmp_path))


def test_run_folder_writes_status_atomically(tmp_path):
    args = common.make_parser("doc").parse_args(["--out", str(tmp_path), "--run-id", "r"])
    run = common.Run("demo", args)
    assert json.load(open(run.path("config.json")))["run_id"] == "r"
    run.progress("train", 5, 10, force=True)
    st = json.load(open(run.path("status.json")))
    assert st["state"] == "running" and st["progress"] == 0.5 and st["step"] == 5
    run.log(loss=0.25)
    run.finish()
    st = json.load(open(run.path("status.json")))
    assert st["state"] == "completed" and st["progress"] == 1.0
    assert json.load(open(run.path("metrics.json")))["loss"] == 0.25
    assert open(tmp_path / "LATEST_RUN.txt").read().strip() == os.path.join("demo", "r")
    assert os.path.realpath(tmp_path / "current") == os.path.realpath(run.dir)
    assert not [f for f in os.listdir(run.dir) if ".tmp" in f]


def test_device_choice():
    assert common.get_device("cpu").type == "cpu"
    assert common.get_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError):
            common.get_device("cuda")


def test_argparse_types_reject_bad_values_in_one_line():
    three, some = common.int_list(3), common.int_list(least=2)
    assert three("64,128,256") == (64, 128, 256) and some("8,16") == (8, 16)
    for parse, bad in ((three, "64,128"), (three, "64,x,256"), (three, "64,0,256"), (some, "8")):
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)
    assert common.nonneg_int("0") == 0
    with pytest.raises(argparse.ArgumentTypeError):
        common.nonneg_int("-1")
    p = common.make_parser("doc")
    p.add_argument("--channels", type=three)
    with pytest.raises(SystemExit) as e:
        p.parse_args(["--channels", "1,2"])
    assert e.value.code == 2
