"""Shared test fixtures: tiny datasets in torchvision's on-disk layout, so the real loaders run."""
import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def write_idx(path, array):
    """Write an IDX file (the MNIST format): magic (0, 0, dtype 0x08 = ubyte, ndim), dims, data."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    with open(path, "wb") as f:
        f.write(struct.pack(">BBBB", 0, 0, 0x08, array.ndim))
        f.write(struct.pack(f">{array.ndim}I", *array.shape))
        f.write(array.tobytes())
    with open(path, "rb") as src, gzip.open(path + ".gz", "wb") as dst:  # torchvision checks the .gz too
        dst.write(src.read())


def digit_images(labels, size=28, seed=0):
    """Synthetic 'digits': class k is a bright bar at a class-specific position and angle, plus noise.
    Distinct per class (so a classifier can learn them) and varied within a class."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] - (size - 1) / 2
    out = np.zeros((len(labels), size, size))
    for i, k in enumerate(labels):
        a = np.pi * k / 10 + rng.normal(0, 0.05)
        d = np.abs(np.cos(a) * yy - np.sin(a) * xx - (k % 3 - 1) * 4)
        out[i] = np.clip(1.5 - d / 1.5, 0, 1) * (np.hypot(yy, xx) < size / 2.2)
    out = np.clip(out + rng.normal(0, 0.05, out.shape), 0, 1)
    return (out * 255).astype(np.uint8)


def make_mnist_like(root, folder="MNIST", n_train=600, n_test=200, n_classes=10, prefix="", splits=("train", "t10k"),
                    transpose=False):
    """Synthetic images in torchvision's raw layout. transpose=True stores each image transposed, as EMNIST does."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    for split, n in zip(splits, (n_train, n_test)):
        labels = np.arange(n) % n_classes
        images = digit_images(labels, seed=n)
        write_idx(os.path.join(raw, f"{prefix}{split}-images-idx3-ubyte"),
                  images.transpose(0, 2, 1) if transpose else images)
        write_idx(os.path.join(raw, f"{prefix}{split}-labels-idx1-ubyte"), labels)
    return root


def make_emnist_like(root, n_train=47 * 12, n_test=47 * 4):
    """A tiny EMNIST 'balanced' (47 classes), stored transposed like the real files."""
    return make_mnist_like(root, "EMNIST", n_train, n_test, 47, "emnist-balanced-", ("train", "test"), transpose=True)


@pytest.fixture(scope="session")
def tiny_mnist(tmp_path_factory):
    """A data root holding a tiny synthetic MNIST (600 train, 200 test) in torchvision's layout."""
    return str(make_mnist_like(tmp_path_factory.mktemp("data")))


@pytest.fixture(scope="session")
def tiny_emnist(tmp_path_factory):
    """A data root holding a tiny synthetic EMNIST balanced split (564 train, 188 test) in torchvision's layout."""
    return str(make_emnist_like(tmp_path_factory.mktemp("emnist")))


def run_script(*args, timeout=300):
    """Run a project script as a user would; returns the CompletedProcess (never raises on failure)."""
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


CORE_START = "# ==== core: the method, with torch, numpy and math only (tests/test_core.py runs this span alone) ===="
CORE_END = "# ==== end of core ===="


def core_source(script):
    """The span between the two core markers of `script` (a file name in the project root)."""
    src = open(os.path.join(ROOT, script), encoding="utf-8").read()
    assert src.count(CORE_START) == 1 and src.count(CORE_END) == 1, f"{script}: the two core markers, once each"
    return src.split(CORE_START)[1].split(CORE_END)[0]


def core_namespace(script, **modules):
    """Run the core of `script` alone, as a reader who copies it would: in a fresh namespace that holds only math,
    numpy as np, torch, torch.nn as nn and torch.nn.functional as F, plus `modules` (for a script that imports another
    script: that script's core namespace, as a module-like object). Returns the namespace."""
    import math
    import types
    import torch
    ns = {"__name__": f"core_of_{script[:-3]}", "math": math, "np": np, "torch": torch, "nn": torch.nn,
          "F": torch.nn.functional}
    ns.update({k: types.SimpleNamespace(**v) if isinstance(v, dict) else v for k, v in modules.items()})
    exec(compile(core_source(script), f"{script}:core", "exec"), ns)
    return ns


def interrupt(args, ready, sig, timeout=120):
    """Start a project script (args as for run_script), wait until the file `ready` exists (say, the first
    checkpoint: training is under way), send `sig`; return a CompletedProcess (returncode, stdout, stderr)."""
    import signal as _signal
    import time
    p = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    t0 = time.time()
    while not os.path.exists(ready) and p.poll() is None and time.time() - t0 < timeout:
        time.sleep(0.02)
    assert p.poll() is None, "the run ended before it could be interrupted"
    p.send_signal(sig if isinstance(sig, int) else getattr(_signal, sig))
    out, err = p.communicate(timeout=timeout)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def run_in_process(module, *args):
    """Run `module`.main through harness.main as `python module.py args` would, in this process (no interpreter and
    torch start-up: fast); returns a CompletedProcess with the exit code and the captured stdout and stderr."""
    import contextlib
    import io
    import harness
    out, err, argv = io.StringIO(), io.StringIO(), sys.argv
    sys.argv = [f"{module.__name__}.py", *args]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            harness.main(module.main)
        code = 0
    except SystemExit as e:
        code = e.code or 0
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(sys.argv, code, out.getvalue(), err.getvalue())
