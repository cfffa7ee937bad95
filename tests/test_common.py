"""common.py and harness.py: the IDX loader on tiny files (plain, .gz, truncated, missing), the EMNIST orientation,
the command line (num, presets, --out, resumed, the rank in a torchrun process's error), the plot helpers, run folders,
how main ends a run, and TrainLoop on a tiny model against the same steps written out plainly: exact resume after an
interrupt, a crash or the time budget, NaN detection, early stopping."""
import argparse
import json
import math
import os
import signal
import types

import numpy as np
import pytest
import torch
import torch.nn as nn

import common
import harness
from conftest import write_idx


@pytest.fixture(autouse=True)
def no_leftover_harness_state():
    """Run.active / TrainLoop.active are process-wide; main() installs signal handlers: restore all three."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    harness.Run.active = harness.TrainLoop.active = None
    for s, h in handlers.items():
        signal.signal(s, h)


# ----------------------------------------------------------------------------- image data
def idx_set(root, n=6, folder="MNIST", prefixes=("train", "t10k")):
    """Tiny IDX files (plain and .gz) with known bytes: image k holds (k * 784 + pixel) mod 256, label k mod 10."""
    raw = os.path.join(root, folder, "raw")
    os.makedirs(raw, exist_ok=True)
    images = (np.arange(n * 784) % 256).reshape(n, 28, 28).astype(np.uint8)
    for prefix in prefixes:
        write_idx(os.path.join(raw, f"{prefix}-images-idx3-ubyte"), images)
        write_idx(os.path.join(raw, f"{prefix}-labels-idx1-ubyte"), np.arange(n) % 10)
    return raw, images


def test_idx_files_load_exactly_plain_or_gz(tmp_path):
    raw, images = idx_set(tmp_path)
    x, y = common.load_image_dataset("mnist", str(tmp_path), train=False)
    assert x.shape == (6, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x[:, 0], torch.tensor(images, dtype=torch.float32) / 127.5 - 1)  # 0 -> -1, 255 -> 1
    assert y.tolist() == [0, 1, 2, 3, 4, 5]
    for f in os.listdir(raw):  # only the .gz files left: the same tensors
        if not f.endswith(".gz"):
            os.remove(os.path.join(raw, f))
    xg, yg = common.load_image_dataset("mnist", str(tmp_path), train=False)
    assert torch.equal(x, xg) and torch.equal(y, yg)


def test_mnist_loader_scales_and_holds_out_validation(tiny_mnist):
    x, y, xv, yv = common.load_image_dataset("mnist", tiny_mnist, train=True, val_size=100)
    assert x.shape == (500, 1, 28, 28) and xv.shape == (100, 1, 28, 28) and len(y) == 500 and len(yv) == 100
    assert x.min() == -1 and x.max() == 1 and y.dtype == torch.int64
    x2, _, xv2, _ = common.load_image_dataset("mnist", tiny_mnist, train=True, val_size=100)
    assert torch.equal(xv, xv2) and torch.equal(x, x2)  # a fixed split
    full, _, none, _ = common.load_image_dataset("mnist", tiny_mnist, train=True, val_size=0)
    assert len(full) == 600 and len(none) == 0
    # the split is a permutation: train and validation together are the whole training file, each image once
    assert sorted(map(tuple, torch.cat([x, xv]).flatten(1)[:, ::97].tolist())) == \
        sorted(map(tuple, full.flatten(1)[:, ::97].tolist()))
    xt, yt = common.load_image_dataset("mnist", tiny_mnist, train=False)
    assert len(xt) == 200 and set(yt.tolist()) == set(range(10))
    with pytest.raises(common.UsageError, match="validation size 600 must be below the 600 training images"):
        common.load_image_dataset("mnist", tiny_mnist, train=True, val_size=600)


@pytest.mark.parametrize("case", ["truncated", "truncated_gz", "not_idx", "counts"])
def test_a_broken_idx_file_is_named_in_one_line(tmp_path, case):
    raw, _ = idx_set(tmp_path)
    path = os.path.join(raw, "t10k-images-idx3-ubyte")
    if case == "truncated":
        data = open(path, "rb").read()
        open(path, "wb").write(data[:-100])
        want = f"{path} is truncated or not an IDX file of bytes"
    elif case == "truncated_gz":
        os.remove(path)
        path += ".gz"
        data = open(path, "rb").read()
        open(path, "wb").write(data[:len(data) // 2])
        want = f"cannot read {path}: "
    elif case == "not_idx":
        open(path, "w").write("<html>404 not found</html>")  # what a failed download leaves
        want = f"{path} is truncated or not an IDX file of bytes"
    else:
        write_idx(os.path.join(raw, "t10k-labels-idx1-ubyte"), np.arange(5))
        want = f"{raw}: (6, 28, 28) images do not match (5,) labels"
    with pytest.raises(common.UsageError) as e:
        common.load_image_dataset("mnist", str(tmp_path), train=False)
    msg = str(e.value)
    assert msg.startswith(want) and "\n" not in msg and "download" not in msg, msg


def test_a_missing_dataset_is_one_line_and_creates_no_folders(tmp_path):
    nowhere = tmp_path / "nowhere"
    with pytest.raises(common.UsageError) as e:
        common.load_image_dataset("mnist", str(nowhere))
    msg = str(e.value)
    assert "MNIST" in msg and "train-images-idx3-ubyte" in msg and "--data-root" in msg and "\n" not in msg
    assert not nowhere.exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(common.UsageError):
        common.load_image_dataset("fashion-mnist", str(tmp_path / "empty"), train=False)
    assert os.listdir(tmp_path / "empty") == []


def test_an_unknown_dataset_is_a_usage_error(tmp_path):
    with pytest.raises(common.UsageError, match="imagenet"):
        common.load_image_dataset("imagenet", str(tmp_path))


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
    assert y.tolist() == list(range(47))


def test_device_choice():
    assert common.get_device("cpu").type == "cpu"
    assert common.get_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(common.UsageError, match="--device cuda: not available"):
            common.get_device("cuda")


# ----------------------------------------------------------------------------- the command line
def type_error(parse, s):
    with pytest.raises(argparse.ArgumentTypeError) as e:
        parse(s)
    return str(e.value)


def test_num_checks_kind_range_and_finiteness():
    steps, p, w = common.num(int, 1, 10**7), common.num(float, 0, 1, open_lo=True), common.num(float, 0)
    assert steps("7") == 7 and isinstance(steps("7"), int) and p("1") == 1.0 and p("0.25") == 0.25 and w("0") == 0.0
    assert type_error(steps, "0") == "must be in [1, 10000000], got 0"
    assert type_error(steps, "1000000000000") == "must be in [1, 10000000], got 1000000000000"  # says the limit
    assert type_error(steps, "1.5") == "expected an integer, got '1.5'"
    assert type_error(steps, "1e12") == "expected an integer, got '1e12'"
    assert type_error(p, "0") == "must be in (0, 1], got 0"
    assert type_error(p, "1.01") == "must be in (0, 1], got 1.01"
    assert type_error(p, "x") == "expected a number, got 'x'"
    for bad in ("nan", "inf", "-inf", "-0.5"):
        assert type_error(w, bad) == f"must be in [0, inf], got {bad}"


def test_num_without_bounds_still_rejects_nan_and_says_so():
    finite = common.num(float)
    assert finite("-3.5") == -3.5 and finite("1e300") == 1e300
    msg = type_error(finite, "nan")
    assert "nan" in msg and "None" not in msg, msg
    assert "None" not in type_error(common.num(int, None, 5), "6")
    assert type_error(common.num(int, -5, 0), "1") == "must be in [-5, 0], got 1"  # an upper bound of 0 is a bound


def test_num_list_checks_every_element():
    channels, ws = common.num_list(int, 1, 4096), common.num_list(float, 0)
    assert channels("64,128,256") == (64, 128, 256) and channels("8") == (8,) and ws("0,1.5,3") == (0.0, 1.5, 3.0)
    assert type_error(channels, "64,0,256") == "must be in [1, 4096], got 0"
    assert type_error(channels, "64,x") == "expected an integer, got 'x'"
    assert type_error(channels, "64,,2") == "expected an integer, got ''"
    assert type_error(ws, "1,nan") == "must be in [0, inf], got nan"


PRESETS = {"full": dict(train_steps=1000, batch_size=64, channels=(32, 64)),
           "cpu": dict(train_steps=300, batch_size=32, channels=(16, 32)),
           "quick": dict(train_steps=5, batch_size=4, channels=(8, 8))}


def parser(presets=PRESETS):
    p = common.make_parser("demo: a script.\n\nMore text.", presets)
    p.add_argument("--train-steps", type=common.num(int, 1, 10**6))
    p.add_argument("--batch-size", "--batch", type=common.num(int, 1, 4096))
    p.add_argument("--channels", type=common.num_list(int, 1, 512))
    p.add_argument("--lr", type=common.num(float, 0, 10, open_lo=True), default=0.1)
    p.add_argument("--resume", default=None)
    return p


def exits_2(capsys, argv, p=None):
    """parse fails: exit code 2 and one line on stderr, which is returned."""
    with pytest.raises(SystemExit) as e:
        common.parse(p or parser(), argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1, err
    return err


def test_presets_default_quick_named_and_explicit_flags_win(tmp_path, capsys):
    out = ["--out", str(tmp_path)]
    a = common.parse(parser(), out)
    assert (a.train_steps, a.batch_size, a.channels, a.lr) == (1000, 64, (32, 64), 0.1)
    assert (a.preset, a.quick) == ("full", False)
    assert a.explicit == ["out"]
    a = common.parse(parser(), ["--quick", *out])
    assert (a.train_steps, a.batch_size, a.channels) == (5, 4, (8, 8))
    a = common.parse(parser(), ["--preset", "cpu", *out])
    assert (a.train_steps, a.batch_size, a.channels) == (300, 32, (16, 32))
    a = common.parse(parser(), ["--quick", "--train-steps", "7", *out])
    assert (a.train_steps, a.batch_size) == (7, 4) and a.explicit == ["out", "quick", "train_steps"]
    a = common.parse(parser(), ["--preset", "cpu", "--batch=9", "--channels", "3,5", *out])  # an old name, "=" form
    assert (a.train_steps, a.batch_size, a.channels) == (300, 9, (3, 5))
    assert a.explicit == ["batch_size", "channels", "out", "preset"]
    assert "invalid choice: 'quick'" in exits_2(capsys, ["--preset", "quick", *out])  # quick is --quick
    single = parser({"default": dict(train_steps=10, batch_size=2, channels=(4,)), "quick": PRESETS["quick"]})
    assert common.parse(single, out).train_steps == 10 and not hasattr(common.parse(single, out), "preset")
    assert "unrecognized arguments: --preset" in exits_2(capsys, ["--preset", "default", *out], single)
    err = exits_2(capsys, ["--train-steps", "0", *out])
    assert "argument --train-steps: must be in [1, 1000000], got 0" in err and err.endswith("(see --help)\n")


def test_out_must_take_the_run_before_any_work(tmp_path, capsys, monkeypatch):
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder")
    for out in (a_file, a_file / "sub" / "deeper"):
        err = exits_2(capsys, ["--out", str(out)])
        assert f"--out {out}: cannot write there ({a_file} is a file)" in err
    ro = tmp_path / "read_only"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: let the check see the folder as a user would
        real = os.access
        monkeypatch.setattr(os, "access", lambda p, mode, **kw: False if os.path.abspath(p) == str(ro) else
                            real(p, mode, **kw))
    err = exits_2(capsys, ["--out", str(ro / "new" / "sub")])
    assert f"--out {ro / 'new' / 'sub'}: cannot write there ({ro} is read-only)" in err
    assert os.listdir(ro) == []
    ro.chmod(0o755)
    fresh = tmp_path / "fresh" / "outputs"
    assert common.parse(parser(), ["--out", str(fresh)]).out == str(fresh) and not (tmp_path / "fresh").exists()


def test_under_torchrun_a_usage_error_names_the_rank(tmp_path, capsys, monkeypatch):
    """Every rank checks the same input; the line of whichever fails first must say which rank it is, both for a
    flag argparse rejects and for a UsageError raised later; a single process says nothing of ranks."""
    assert (common.rank_tag({}), common.rank_tag({"RANK": "2", "WORLD_SIZE": "1"})) == ("", "")
    assert common.rank_tag({"RANK": "2", "WORLD_SIZE": "4"}) == "rank 2: "
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    assert "error: rank 3: argument --seed: invalid int value" in exits_2(capsys, ["--seed", "x"])

    def script_main():
        raise common.UsageError("--batch-size 3: not divisible by 4")
    with pytest.raises(SystemExit) as e:
        harness.main(script_main)
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().endswith("error: rank 3: --batch-size 3: not divisible by 4")
    monkeypatch.setenv("WORLD_SIZE", "1")
    assert "error: argument --seed" in exits_2(capsys, ["--seed", "x"])


def test_resumed_keeps_the_checkpoints_settings(tmp_path):
    ckpt = {"config": {"train_steps": 100, "batch_size": 8, "channels": (4, 4), "lr": 0.5, "seed": 3, "quick": False,
                       "out": "elsewhere", "run_id": "r0", "device": "cuda", "resume": None, "explicit": ["lr"]},
            "loop": {}}
    args = common.parse(parser(), ["--out", str(tmp_path), "--resume", "c.pt", "--batch-size", "8"])
    args = harness.resumed(args, ckpt)
    assert (args.train_steps, args.batch_size, args.channels, args.lr, args.seed) == (100, 8, (4, 4), 0.5, 3)
    assert (args.out, args.run_id, args.device, args.resume) == (str(tmp_path), None, "auto", "c.pt")  # its place
    args = common.parse(parser(), ["--out", str(tmp_path), "--train-steps", "200"])
    assert harness.resumed(args, ckpt, may_change=("train_steps",)).train_steps == 200
    assert harness.resumed(common.parse(parser(), ["--out", str(tmp_path)]), ckpt, ("train_steps",)).train_steps == 100
    keeps = "the run being resumed has {}, and a resumed run keeps its settings"
    for argv, may, want in ((["--batch-size", "16"], (), "--batch-size 16: " + keeps.format(8)),
                            (["--lr", "0.2"], ("train_steps", "max_minutes"),
                             "--lr 0.2: " + keeps.format(0.5) + " (only train_steps, max_minutes may change)")):
        with pytest.raises(common.UsageError) as e:
            harness.resumed(common.parse(parser(), ["--out", str(tmp_path), *argv]), ckpt, may)
        assert str(e.value) == want
    with pytest.raises(common.UsageError, match="older format"):  # no training state: it can be sampled, not resumed
        harness.resumed(common.parse(parser(), ["--out", str(tmp_path)]), {"config": ckpt["config"]})


# ----------------------------------------------------------------------------- plots
def test_plot_helpers_draw_what_they_are_given(tmp_path, monkeypatch):
    """plot_panels: one axes per panel (the spare cell of a 2 x 2 grid hidden), a curve per entry plus the floor and
    the band; image_row: one image per panel, a colour bar only where asked."""
    import matplotlib.pyplot as plt
    figs, save = [], common.save_fig
    monkeypatch.setattr(common, "save_fig", lambda fig, path: (figs.append(fig), save(fig, path)))
    xs = np.arange(1, 5)
    common.plot_panels(str(tmp_path / "p.png"), [
        dict(curves={"a": (xs, xs ** 2, "o-"), "b": (xs, xs, "k*", {"ms": 12})}, floor=2.0, logx=True, logy=True,
             title="first", ylabel="FID"),
        dict(curves={"c": (xs, -xs)}, band=(xs, -xs - 1, -xs + 1)), dict(curves={"d": (xs, xs)})], ncols=2)
    common.plot_panels(str(tmp_path / "q.png"), [dict(curves={"e": (xs, xs)}), dict(curves={"f": (xs, xs)})])
    common.image_row(str(tmp_path / "r.png"), [(torch.zeros(1, 1, 28, 28), "zero", dict(cmap="gray", vmin=-1, vmax=1)),
                                               (torch.rand(28, 28), "heat", dict(cmap="magma", colorbar=True))], "t")
    panels, one_row, row = figs
    shown = [ax for ax in panels.axes if ax.axison]
    assert len(panels.axes) == 4 and len(shown) == 3
    assert [len(ax.lines) for ax in shown] == [3, 1, 1]  # a, b and the floor's line; c; d
    assert (shown[0].get_xscale(), shown[0].get_yscale(), shown[1].get_yscale()) == ("log", "log", "linear")
    assert list(shown[0].lines[2].get_ydata()) == [2.0, 2.0]  # the floor, at its y
    assert (shown[0].get_title(), shown[0].get_ylabel()) == ("first", "FID")
    assert [t.get_text() for t in shown[0].get_legend().get_texts()] == ["a", "b", "real-data floor"]
    assert len(shown[1].collections) == 1 and shown[0].lines[1].get_markersize() == 12  # the band; b's keywords
    assert len({ax.get_position().y0 for ax in one_row.axes}) == 1  # without ncols: one row
    assert len(row.axes) == 3 and sum(len(ax.images) for ax in row.axes) == 2  # two images and one colour bar
    gray = row.axes[0].images[0]
    assert (gray.get_cmap().name, gray.get_clim()) == ("gray", (-1, 1))
    assert row.axes[0].get_title() == "zero" and row.axes[1].images[0].get_cmap().name == "magma"
    assert os.path.getsize(tmp_path / "p.png") > 1000 and os.path.getsize(tmp_path / "r.png") > 1000
    plt.close("all")


# ----------------------------------------------------------------------------- run folders and how a run ends
def run_args(out, run_id="r", **kw):
    return argparse.Namespace(out=str(out), run_id=run_id, quick=False, seed=0, **kw)


def test_run_folder_files_are_written_whole(tmp_path, monkeypatch):
    renamed, real = [], os.replace
    monkeypatch.setattr(os, "replace", lambda src, dst: (renamed.append((str(src), str(dst))), real(src, dst))[1])
    run = harness.Run("demo", run_args(tmp_path, lr=0.5))
    assert run.dir == os.path.join(str(tmp_path), "demo", "r")
    assert json.load(open(run.path("config.json"))) == {"script": "demo", **vars(run_args(tmp_path, lr=0.5))}
    st = json.load(open(run.path("status.json")))
    assert (st["state"], st["phase"], st["step"], st["progress"], st["message"]) == ("running", "start", 0, 0.0, None)
    open(run.path("loss.png"), "wb").close()
    run.progress("train", 5, 10, force=True)
    st = json.load(open(run.path("status.json")))
    assert (st["state"], st["phase"], st["step"], st["total"], st["progress"]) == ("running", "train", 5, 10, 0.5)
    assert st["figures"] == ["loss.png"]
    run.log(loss=0.25, eval={"fid": torch.tensor(1.5)})
    run.log(acc=0.75)  # merged into metrics.json
    assert json.load(open(run.path("metrics.json"))) == {"loss": 0.25, "eval": {"fid": 1.5}, "acc": 0.75}
    run.report("demo: a model card", ["What it is.", "How to use it."], {"lr": 0.5, "steps": 10},
               {"loss": 0.123456789, "state": "ok"})
    card = open(run.path("report.md")).read().splitlines()
    assert card[:5] == ["# demo: a model card (run r)", "", "What it is.", "", "How to use it."]
    assert {"## Configuration", "| lr | 0.5 |", "| steps | 10 |", "## Final figures", "| loss | 0.123457 |",
            "| state | ok |", "## Plots", "- [loss.png](loss.png)"} <= set(card)
    run.finish()
    st, metrics = json.load(open(run.path("status.json"))), json.load(open(run.path("metrics.json")))
    assert st["state"] == "completed" and st["progress"] == 1.0 and "wall_time_s" in metrics
    assert 10 < metrics["peak_rss_mb"] < 10**5  # this process (python + torch) in MB, not kB or bytes
    assert harness.Run.active is None
    written = {os.path.basename(dst) for src, dst in renamed if ".tmp" in os.path.basename(src)}
    assert written >= {"config.json", "status.json", "metrics.json", "LATEST_RUN.txt", "current", "report.md"}
    assert not [f for d in (tmp_path, run.dir) for f in os.listdir(d) if ".tmp" in f]


def test_window_rows_give_each_windows_loss_statistics():
    """Windows of 2 and 4 steps with losses 1..6: mean, population std, extremes and median by hand."""
    loop = {"losses": [1.0, 2.0, 3.0, 4.0, 5.0, 6.0],
            "history": {"step": [2, 6], "train": [1.5, 4.5], "epoch": [1, 2], "lr": [0.1, 0.05]}}
    rows = harness.window_rows(loop)
    assert rows[0] == {"step": 2, "loss_mean": 1.5, "loss_std": 0.5, "loss_min": 1.0, "loss_max": 2.0,
                       "loss_median": 1.5, "epoch": 1, "lr": 0.1}
    assert rows[1]["loss_std"] == pytest.approx(math.sqrt(1.25)) and rows[1]["loss_median"] == 4.5
    assert (rows[1]["loss_mean"], rows[1]["loss_min"], rows[1]["loss_max"], rows[1]["epoch"]) == (4.5, 3.0, 6.0, 2)
    assert "train" in loop["history"] and harness.window_rows({"losses": [], "history": {}}) == []


def test_latest_run_and_current_name_the_newest_run(tmp_path):
    first = harness.Run("demo", run_args(tmp_path, "a"))
    assert open(tmp_path / "LATEST_RUN.txt").read() == os.path.join("demo", "a") + "\n"
    second = harness.Run("other", run_args(tmp_path, "b"))
    assert open(tmp_path / "LATEST_RUN.txt").read() == os.path.join("other", "b") + "\n"
    assert os.readlink(tmp_path / "current") == os.path.join("other", "b")  # relative: the outputs folder can move
    assert os.path.realpath(tmp_path / "current") == os.path.realpath(second.dir) != os.path.realpath(first.dir)
    assert sorted(os.listdir(tmp_path)) == ["LATEST_RUN.txt", "current", "demo", "other"]  # no dashboard.html here
    stamped = harness.Run("demo", argparse.Namespace(out=str(tmp_path), run_id=None, quick=True))
    assert stamped.run_id.endswith("-quick") and os.path.isdir(stamped.dir)


@pytest.mark.parametrize("raised, code, state, message", [
    (common.UsageError("--data x.pt: no such file"), 2, "failed", "--data x.pt: no such file"),
    (harness.RunError("loss is nan at step 7"), 1, "failed", "loss is nan at step 7 (hint)"),
    (harness.Interrupted("SIGTERM"), 143, "interrupted", "interrupted by SIGTERM (hint)"),
    (KeyboardInterrupt(), 130, "interrupted", "interrupted by SIGINT (hint)"),
    (ValueError("bad thing\nsecond line"), 1, "failed", "ValueError: bad thing (hint)")])
def test_main_records_how_the_run_ended(tmp_path, capsys, raised, code, state, message):
    def script_main():
        if not isinstance(raised, common.UsageError):  # a usage error found before the run folder exists
            run = harness.Run("demo", run_args(tmp_path))
            run.hint = " (hint)"
        raise raised
    with pytest.raises(SystemExit) as e:
        harness.main(script_main)
    assert e.value.code == code
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.endswith(f": {'error: ' if code < 128 else ''}{message}"), last
    st_path = tmp_path / "demo" / "r" / "status.json"
    if isinstance(raised, common.UsageError):
        assert not st_path.exists()
    else:
        st = json.load(open(st_path))
        assert (st["state"], st["message"]) == (state, message)


# ----------------------------------------------------------------------------- TrainLoop on a tiny model
X = torch.linspace(-1, 1, 64).reshape(32, 2)
Y = X @ torch.tensor([[2.0], [-1.0]]) + 0.5


def tiny_model(seed=1):
    torch.manual_seed(seed)
    model = nn.Linear(2, 1)
    return model, torch.optim.Adam(model.parameters(), lr=0.05)


def step_loss(model, gen):
    """One step's loss; its random numbers (a batch and noise) all come from `gen`."""
    idx = torch.randint(0, len(X), (8,), generator=gen)
    noise = 0.1 * torch.randn(8, 1, generator=gen)
    return (model(X[idx]) - Y[idx] - noise).square().mean()


def reference(n, seed=0):
    """The same n steps written out plainly, with no harness: each step's loss and the weights after each step."""
    model, opt = tiny_model()
    gen = torch.Generator().manual_seed(seed)
    losses, weights = [], []
    for _ in range(n):
        loss = step_loss(model, gen)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    return losses, weights


def train(run, total, every, resume=None, before=None, after=None, vals=None, model_seed=1, **kw):
    """The loop as a method script writes it. before(i, loss) may replace the loss of step index i (0-based);
    after(i, loop, model) runs at the end of the step's body; vals: the val_loss of each evaluation."""
    model, opt = tiny_model(model_seed)
    loop = harness.TrainLoop(run, total, every, {"model": model, "optimizer": opt}, 0, {"lr": 0.05}, resume=resume,
                             **kw)
    for i in loop:
        loss = step_loss(model, loop.gen)
        loss = before(i, loss) if before else loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        after and after(i, loop, model)
        if loop.record(loss):
            loop.evaluate(**({"val_loss": vals[len(loop.history.get("step", []))]} if vals else {}))
    return loop, model


def same_weights(model, weights):
    return all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())


def load(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_trainloop_runs_the_plain_steps_and_checkpoints(tmp_path):
    losses, weights = reference(10)
    run = harness.Run("demo", run_args(tmp_path))
    loop, model = train(run, 10, 4)
    assert loop.s["losses"] == losses and same_weights(model, weights[-1])  # exactly the plain loop
    assert loop.s["step"] == 10 and loop.start == 0 and loop.stop_reason is None
    assert loop.history["step"] == [4, 8, 10]
    assert loop.history["train"] == pytest.approx([np.mean(losses[:4]), np.mean(losses[4:8]), np.mean(losses[8:])],
                                                  rel=1e-6)
    ck = load(run.path("checkpoint.pt"))
    assert (ck["script"], ck["kind"], ck["config"], ck["loop"]["step"], ck["loop"]["open"]) == \
        ("demo", "model", {"lr": 0.05}, 10, [])
    assert ck["loop"]["losses"] == losses and all(torch.equal(ck["model"][k], v) for k, v in weights[-1].items())
    metrics = json.load(open(run.path("metrics.json")))
    assert (metrics["train_steps"], metrics["stop_reason"], metrics["step"]) == (10, "steps", 10)
    assert metrics["train_loss"] == pytest.approx(np.mean(losses[8:]), rel=1e-6)


@pytest.mark.parametrize("how", ["signal", "crash", "time budget"])
def test_a_stopped_run_resumes_exactly(tmp_path, monkeypatch, how):
    """Stop after step 6 (SIGTERM pending: mid-window), crash in step 7 (after the checkpoint of step 5), or run out
    of time after step 3 (late: the window closes at step 4); resume; the same losses and weights as unbroken."""
    losses, weights = reference(10)
    run = harness.Run("demo", run_args(tmp_path))
    clock = [0.0]
    monkeypatch.setattr(harness, "time", types.SimpleNamespace(time=lambda: clock[0]))  # a clock the test moves

    def after(i, loop, model):
        if how == "signal" and i == 5:
            loop.signal = "SIGTERM"  # what harness's handler does when SIGTERM arrives mid-step
        if how == "crash" and i == 6:
            raise RuntimeError("the machine went away")
        if how == "time budget" and i == 2:
            clock[0] = 3600.0  # an hour later: past the 1-minute budget
    if how == "time budget":
        loop, _ = train(run, 10, 5, after=after, max_minutes=1)
        assert loop.stop_reason == "time budget" and loop.s["step"] == 4 and loop.history["step"] == [4]
        done, window = 4, []
    else:
        with pytest.raises(harness.Interrupted if how == "signal" else RuntimeError) as e:
            train(run, 10, 5, after=after)
        if how == "signal":
            assert str(e.value) == "SIGTERM"
            assert run.hint == f" at step 6; --resume {run.path('checkpoint.pt')} continues it"
        done, window = (6, losses[5:6]) if how == "signal" else (5, [])
    ck = load(run.path("checkpoint.pt"))
    assert ck["loop"]["step"] == done and ck["loop"]["open"] == window and ck["loop"]["losses"] == losses[:done - len(
        window)]
    assert all(torch.equal(ck["model"][k], v) for k, v in weights[done - 1].items())  # the state after step `done`
    resumed, model = train(harness.Run("demo", run_args(tmp_path, "r2")), 10, 5, resume=ck, model_seed=99)
    assert resumed.start == done and resumed.s["step"] == 10
    assert resumed.s["losses"] == losses and same_weights(model, weights[-1])


def test_a_nan_loss_names_its_step_and_keeps_the_last_good_checkpoint(tmp_path):
    losses, weights = reference(10)
    run = harness.Run("demo", run_args(tmp_path))
    path = run.path("checkpoint.pt")
    with pytest.raises(harness.RunError) as e:  # step 6 (index 5) goes NaN: found when its window closes at step 8
        train(run, 10, 4, before=lambda i, loss: loss * float("nan") if i == 5 else loss)
    assert str(e.value) == f"loss is nan at step 6; the last good checkpoint is kept at {path}"
    ck = load(path)
    assert ck["loop"]["step"] == 4 and all(torch.equal(ck["model"][k], v) for k, v in weights[3].items())
    assert not [f for f in os.listdir(run.dir) if ".tmp" in f]

    run = harness.Run("demo", run_args(tmp_path, "early"))
    with pytest.raises(harness.RunError) as e:  # in the first window: nothing to keep yet
        train(run, 10, 4, before=lambda i, loss: loss + float("inf") if i == 1 else loss)
    assert str(e.value) == "loss is inf at step 2; no checkpoint was written yet"
    assert not os.path.exists(run.path("checkpoint.pt"))

    def poison(i, loop, model):  # finite losses, but a weight overflows in step 8 (index 7)
        if i == 7:
            with torch.no_grad():
                model.weight[0, 0] = float("inf")
    run = harness.Run("demo", run_args(tmp_path, "weights"))
    with pytest.raises(harness.RunError) as e:
        train(run, 10, 4, after=poison)
    assert str(e.value) == f"a weight is not finite after step 8; the last good checkpoint is kept at " \
                           f"{run.path('checkpoint.pt')}"
    assert load(run.path("checkpoint.pt"))["loop"]["step"] == 4


def test_early_stopping_after_patience_evaluations_without_a_new_best(tmp_path):
    """val_loss 5, 4 (best), 4.5 (1), 3 (best: back to 0), 4 (1), 3 (equal is not better: 2 = patience): stop at the
    6th evaluation, step 12."""
    losses, _ = reference(12)
    run = harness.Run("demo", run_args(tmp_path))
    loop, _ = train(run, 100, 2, vals=[5.0, 4.0, 4.5, 3.0, 4.0, 3.0, 0.1, 0.1], patience=2)
    assert loop.stop_reason == "early stopping" and loop.s["step"] == 12
    assert loop.history["val_loss"] == [5.0, 4.0, 4.5, 3.0, 4.0, 3.0] and loop.history["step"] == [2, 4, 6, 8, 10, 12]
    assert (loop.s["best"], loop.s["bad"]) == (3.0, 2) and loop.s["losses"] == losses
    metrics = json.load(open(run.path("metrics.json")))
    assert (metrics["stop_reason"], metrics["train_steps"], metrics["val_loss"]) == ("early stopping", 12, 3.0)
    assert load(run.path("checkpoint.pt"))["loop"]["step"] == 12
    loop, _ = train(None, 12, 2, vals=[5.0, 4.0, 4.5, 3.0, 4.0, 3.0], patience=0)  # no patience: no early stop
    assert loop.stop_reason is None and loop.s["step"] == 12


def test_a_loop_without_a_run_writes_nothing_and_still_checks(tmp_path):
    """How evaluate.py trains its judge: no run folder, no checkpoint, the NaN check and the interrupt still work."""
    losses, _ = reference(6)
    loop, _ = train(None, 6, 4)
    assert loop.s["losses"] == losses and loop.path is None
    with pytest.raises(harness.RunError, match="^loss is nan at step 3; no checkpoint was written yet$"):
        train(None, 6, 4, before=lambda i, loss: loss * float("nan") if i == 2 else loss)
    with pytest.raises(harness.Interrupted):
        train(None, 6, 4, after=lambda i, loop, model: setattr(loop, "signal", "SIGINT") if i == 0 else None)
    assert harness.TrainLoop.active is None
