"""Bad input to every command: one line on stderr, exit code 2, no traceback, no output (nor a
temporary folder) left, inputs untouched. Bugs: one line naming ``--debug`` and exit code 1;
``--debug``/``MEDSLIM_DEBUG=1`` add the traceback. Cases fail before any model work, except a
full disk and an interrupted run, which happen while the output is written."""
from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import nibabel as nib
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from conftest import SHARED, assert_user_error, tree_digest

from medslim.cli import app
from medslim.errors import MedslimError

BREAST = SHARED / "medmnist" / "breastmnist.npz"


def run(*args, env: dict | None = None):
    return CliRunner().invoke(app, [str(a) for a in args], env=env)


def stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def one_line(result, code: int) -> str:
    """The single stderr line of a failed run with exit ``code`` (no traceback)."""
    assert result.exit_code == code, (result.exit_code, result.output)
    lines = stderr_lines(result)
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.output
    return lines[0]


@pytest.fixture
def model_copy(reference_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(reference_dir, dst)
    return dst


@pytest.fixture
def nan_model(model_copy) -> tuple[Path, str]:
    """A copy of the reference model with one NaN in one weight tensor: ``(folder, tensor name)``."""
    path = model_copy / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    name = next(k for k, v in ckpt["network_weights"].items() if k.endswith("weight") and v.dim() > 1)
    ckpt["network_weights"][name].view(-1)[3] = float("nan")
    torch.save(ckpt, path)
    return model_copy, name


# --- Click usage errors: wrong values, missing / unknown options, unknown commands -------------

USAGE = [
    (["compress", "{model}", "-o", "{out}", "--df", "abc"], "'--df'"),
    (["compress", "{model}", "-o", "{out}", "--rank-min", "1.5"], "'--rank-min'"),
    (["compress", "{model}"], "--output"),
    (["compress", "{model}", "-o", "{out}", "--dff", "0.3"], "did you mean --df"),
    (["compres", "{model}", "-o", "{out}"], "'compress'"),
    (["predict", "{model}", "-i", "{out}.nii.gz"], "--output"),
    (["predict", "{model}", "-i", "{out}.nii.gz", "-o", "{out}", "--threads", "two"], "'--threads'"),
    (["evaluate", "--pred", "{model}", "--ref", "{model}", "-o", "{out}", "--tolerance", "3mm"], "'--tolerance'"),
    (["evaluate", "--pred", "{model}", "--ref", "{model}", "-o", "{out}", "--workerz", "1"], "did you mean --workers"),
    (["export-bundle", "{model}"], "--output"),
    (["export-bundle", "{model}", "-o", "{out}", "--fold", "0", "--bogus"], "No such option"),
    (["demo", "-o", "{out}", "--prune", "half"], "'--prune'"),
    (["transfer", "run", "resnet18", "--data", "{out}.npz", "-o", "{out}", "-k", "three"], "'-k'"),
    (["transfer", "select", "resnet18", "-o", "{out}"], "--data"),
    (["transfer", "runn", "resnet18"], "'run'"),
    (["prune2d", "resnet18", "--data", "{out}.npz", "-o", "{out}", "--ratio", "0.3x"], "'--ratio'"),
    (["prune2d", "resnet18", "-o", "{out}"], "--data"),
]


@pytest.mark.parametrize("args, match", USAGE, ids=[" ".join(a[:1] + a[2:][-2:]) for a, _ in USAGE])
def test_usage_errors_are_one_line_exit_2(reference_dir, tmp_path, args, match):
    out = tmp_path / "out"
    before = tree_digest(reference_dir)
    result = run(*(a.format(model=reference_dir, out=out) for a in args))
    assert_user_error(result, out, match)
    line = stderr_lines(result)[0]
    assert line.startswith("error: ") and "--help" in line, line  # where to look next
    assert tree_digest(reference_dir) == before


# --- medslim's own checks, before any model work ------------------------------------------------

def test_bad_rank_min_fails_fast(reference_dir, tmp_path):
    out = tmp_path / "out"
    for value in ("0", "-3"):
        assert_user_error(run("compress", reference_dir, "-o", out, f"--rank-min={value}"), out,
                          "--rank-min must be an integer ≥ 1")


def test_data_criterion_without_calibration_fails_fast(reference_dir, tmp_path):
    from medslim.compress import CompressConfig
    from medslim.score import list_criteria

    assert "hvs_data" in list_criteria()
    with pytest.raises(MedslimError, match="needs calibration data"):
        CompressConfig(criterion="hvs_data")
    out = tmp_path / "out"
    assert_user_error(run("compress", reference_dir, "-o", out, "--criterion", "hvs_data"), out,
                      "--criterion hvs_data needs calibration data")
    # prune2d draws its calibration images from the training split (tests/test_prune2d_data.py)


def test_bracket_in_path_is_printed_verbatim(tmp_path):
    weird = tmp_path / "we[ird]" / "[/bold] [red]model"
    out = tmp_path / "[out]"
    result = run("compress", weird, "-o", out)
    assert_user_error(result, out, f"model folder {weird} does not exist")
    result = run("export-bundle", weird, "-o", out)
    assert_user_error(result, out, str(weird))


def test_nan_weights_are_refused_naming_the_tensor(nan_model, tmp_path):
    model, name = nan_model
    before = tree_digest(model)
    out = tmp_path / "out"
    for args in (["compress", model, "-o", out],
                 ["export-bundle", model, "-o", out],
                 ["predict", model, "-i", tmp_path / "ct.nii.gz", "-o", out, "--backend", "torch"]):
        assert_user_error(run(*args), out, f"NaN values in '{name}' (1 of ")
    assert tree_digest(model) == before


def test_infinite_weights_are_refused(model_copy, tmp_path):
    path = model_copy / "fold_0" / "checkpoint_final.pth"
    ckpt = torch.load(path, map_location="cpu", weights_only=False)
    name = next(iter(k for k, v in ckpt["network_weights"].items() if v.is_floating_point()))
    ckpt["network_weights"][name].view(-1)[0] = float("inf")
    torch.save(ckpt, path)
    out = tmp_path / "out"
    assert_user_error(run("compress", model_copy, "-o", out), out, f"infinite values in '{name}'")


def test_truncated_checkpoint(model_copy, tmp_path):
    path = model_copy / "fold_0" / "checkpoint_final.pth"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 3])
    out = tmp_path / "out"
    assert_user_error(run("compress", model_copy, "-o", out), out, "cannot read checkpoint")
    assert_user_error(run("export-bundle", model_copy, "-o", out), out, "cannot read checkpoint")


@pytest.mark.parametrize("command", [
    ["compress", "{model}", "-o", "{out}"],
    ["export-bundle", "{model}", "-o", "{out}"],
    ["demo", "-o", "{out}"],
    ["evaluate", "--pred", "{model}", "--ref", "{model}", "-o", "{out}"],
    ["prune2d", "resnet18", "--data", str(BREAST), "-o", "{out}"],
    ["transfer", "select", "resnet18", "--data", str(BREAST), "-o", "{out}"],
], ids=lambda c: c[0] if c[0] != "transfer" else "transfer select")
def test_output_under_a_regular_file(reference_dir, tmp_path, command):
    blocker = tmp_path / "notes.txt"
    blocker.write_text("a file, not a folder")
    out = blocker / "out"
    result = run(*(a.format(model=reference_dir, out=out) for a in command))
    line = one_line(result, 2)
    assert f"{blocker} is a file, not a folder" in line, line
    assert blocker.read_text() == "a file, not a folder"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


@pytest.mark.parametrize("command, match", [
    (["compress", "{model}", "-o", "{out}"], "pass --overwrite"),
    (["demo", "-o", "{out}"], "choose a new or empty folder"),
    (["export-bundle", "{model}", "-o", "{out}"], "already exists"),
], ids=["compress", "demo", "export-bundle"])
def test_existing_output_without_overwrite(reference_dir, tmp_path, command, match):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    before = tree_digest(out)
    line = one_line(run(*(a.format(model=reference_dir, out=out) for a in command)), 2)
    assert match in line and str(out) in line, line
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no temporary sibling


# --- evaluate: label maps that are not label maps ----------------------------------------------

def _save(data: np.ndarray, path: Path) -> None:
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(path))


@pytest.fixture
def label_folders(tmp_path) -> tuple[Path, Path]:
    pred, ref = tmp_path / "pred", tmp_path / "ref"
    pred.mkdir(), ref.mkdir()
    labels = np.zeros((12, 10, 8), np.uint8)
    labels[2:8, 2:8, 2:6] = 1
    labels[5:8, 4:7, 3:5] = 2
    _save(labels, ref / "c0.nii.gz")
    _save(np.roll(labels, 1, axis=0), pred / "c0.nii.gz")
    return pred, ref


@pytest.mark.parametrize("value, match", [(np.nan, "NaN or infinite values"), (1.5, "non-integer values (e.g. 1.5)")],
                         ids=["nan", "fraction"])
def test_evaluate_refuses_non_label_values(label_folders, tmp_path, value, match):
    pred, ref = label_folders
    bad = np.asanyarray(nib.load(str(pred / "c0.nii.gz")).dataobj).astype(np.float32)
    bad[0, 0, 0] = value
    _save(bad, pred / "c0.nii.gz")
    before = tree_digest(pred) + tree_digest(ref)
    out = tmp_path / "out"
    result = run("evaluate", "--pred", pred, "--ref", ref, "-o", out, "--workers", "1")
    assert_user_error(result, out, match)
    assert str(pred / "c0.nii.gz") in stderr_lines(result)[0]
    assert tree_digest(pred) + tree_digest(ref) == before


def test_evaluate_accepts_float_maps_with_integral_values(label_folders, tmp_path):
    pred, ref = label_folders
    data = np.asanyarray(nib.load(str(pred / "c0.nii.gz")).dataobj).astype(np.float32)  # 0.0, 1.0, 2.0
    _save(data, pred / "c0.nii.gz")
    result = run("evaluate", "--pred", pred, "--ref", ref, "--workers", "1")
    assert result.exit_code == 0, result.output


@pytest.mark.parametrize("breakage, match", [
    ("shape", "prediction shape (11, 10, 8) != reference shape (12, 10, 8)"),
    ("affine", "prediction and reference affines differ"),
    ("2d", "expected a 3D label map"),
])
def test_evaluate_refuses_maps_on_another_grid(label_folders, tmp_path, breakage, match):
    pred, ref = label_folders
    data = np.asanyarray(nib.load(str(pred / "c0.nii.gz")).dataobj)
    if breakage == "shape":
        _save(data[:-1], pred / "c0.nii.gz")
    elif breakage == "affine":
        nib.save(nib.Nifti1Image(data, np.diag([1.0, 1.0, 1.5, 1.0])), str(pred / "c0.nii.gz"))
    else:
        _save(data[:, :, 3], pred / "c0.nii.gz")
    before = tree_digest(pred) + tree_digest(ref)
    out = tmp_path / "out"
    assert_user_error(run("evaluate", "--pred", pred, "--ref", ref, "-o", out, "--workers", "1"), out, match)
    assert tree_digest(pred) + tree_digest(ref) == before


# --- images that do not fit the model: 2D for 3D, wrong channel count ----------------------------

HIPPO_IMAGE = SHARED / "Task04_Hippocampus" / "imagesTr" / "hippocampus_004.nii.gz"


def _image(path: Path, how: str) -> Path:
    """A Hippocampus MRI (36 × 52 × 38) as a 2D slice, a one-slice volume, or two channels in one 4D file."""
    img = nib.load(str(HIPPO_IMAGE))
    data = np.asanyarray(img.dataobj).astype(np.float32)
    data = {"2d": data[:, :, 19], "slice": data[:, :, 19:20], "4d": np.stack([data, data], -1)}.get(how, data)
    nib.save(nib.Nifti1Image(data, img.affine), str(path))
    return path


@pytest.mark.parametrize("layout, files, match", [
    ("folder", {"c_0000.nii.gz": "2d"}, "c_0000.nii.gz is a 2D image (shape (36, 52)); model "),
    ("file", {"ct.nii.gz": "slice"}, "ct.nii.gz is a single slice (shape (36, 52, 1))"),
    ("folder", {"c_0000.nii.gz": "3d", "c_0001.nii.gz": "3d"}, "case c has 2 channel file(s) (c_0000, c_0001)"),
    ("folder", {"c_0000.nii.gz": "3d", "d_0001.nii.gz": "3d"}, "case d has 1 channel file(s) (d_0001)"),
    ("file", {"ct.nii.gz": "4d"}, "ct.nii.gz has 4 axes (shape (36, 52, 38, 2))"),
], ids=["2d-image", "single-slice", "two-channels", "wrong-channel", "4d-file"])
def test_predict_refuses_images_that_do_not_fit_the_model(reference_dir, tmp_path, layout, files, match):
    """The reference model is 3D with one channel; nnU-Net would pad a slice into its patch or
    ignore a channel file and write a plausible segmentation (exit 0 before)."""
    images = tmp_path / "images"
    images.mkdir()
    for name, how in files.items():
        _image(images / name, how)
    source = images if layout == "folder" else images / next(iter(files))
    before, out = tree_digest(images), tmp_path / "out"
    assert_user_error(run("predict", reference_dir, "-i", source, "-o", out, "--backend", "torch"), out, match)
    assert tree_digest(images) == before


def test_evaluate_refuses_images_that_do_not_fit_the_model(reference_dir, tmp_path):
    images, labels = tmp_path / "images", tmp_path / "labels"
    images.mkdir(), labels.mkdir()
    for name in ("c_0000.nii.gz", "c_0001.nii.gz"):
        _image(images / name, "3d")
    shutil.copy(SHARED / "Task04_Hippocampus" / "labelsTr" / "hippocampus_004.nii.gz", labels / "c.nii.gz")
    before, out = tree_digest(images) + tree_digest(labels), tmp_path / "out"
    result = run("evaluate", "--model", reference_dir, "--images", images, "--ref", labels, "-o", out)
    assert_user_error(result, out, "case c has 2 channel file(s)")
    assert tree_digest(images) + tree_digest(labels) == before


# --- the machine refuses: a full disk ------------------------------------------------------------
# Unprivileged tests cannot mount a small tmpfs. RLIMIT_FSIZE makes the kernel refuse every write
# past N bytes (EFBIG; SIGXFSZ ignored, as a shell's `ulimit -f` with a trap would) on the same
# write() path where a full disk refuses it (ENOSPC); torch.save reports either as a RuntimeError
# without an errno. ENOSPC itself is raised in-process below.

_FSIZE_DRIVER = """
import resource, signal, sys
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]),) * 2)
from medslim.cli import main
sys.argv = ["medslim", *sys.argv[2:]]
main()
"""


def run_process(driver: str, *args, timeout: float = 600) -> SimpleNamespace:
    """``python -c driver *args`` (``driver`` ends by calling ``medslim.cli.main``), as a
    CliRunner result: ``exit_code``, ``stdout``, ``stderr``, ``output``."""
    p = subprocess.run([sys.executable, "-c", driver, *map(str, args)], capture_output=True, text=True,
                       timeout=timeout)
    return SimpleNamespace(exit_code=p.returncode, stdout=p.stdout, stderr=p.stderr, output=p.stdout + p.stderr)


@pytest.mark.parametrize("command, limit, match", [
    (["compress", "{model}", "-o", "{out}"], 200_000, "the file system refused a write (a full disk or a file size limit)"),
    (["evaluate", "--pred", "{pred}", "--ref", "{ref}", "-o", "{out}", "--workers", "1"], 100,
     "a file exceeds the file size limit"),
], ids=["compress", "evaluate"])
def test_full_disk_is_one_line_and_leaves_nothing(reference_dir, label_folders, tmp_path, command, limit, match):
    pred, ref = label_folders
    before = tree_digest(reference_dir) + tree_digest(pred) + tree_digest(ref)
    out = tmp_path / "out"
    result = run_process(_FSIZE_DRIVER, limit, *(a.format(model=reference_dir, pred=pred, ref=ref, out=out)
                                                 for a in command))
    assert_user_error(result, out, match)
    assert f"cannot write {out}" in stderr_lines(result)[0]
    assert tree_digest(reference_dir) + tree_digest(pred) + tree_digest(ref) == before


def test_no_space_left_is_one_line(label_folders, tmp_path, monkeypatch):
    import medslim.evaluate.outputs as outputs

    def full(path, *args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(outputs, "write_csv", full)
    pred, ref = label_folders
    out = tmp_path / "out"
    assert_user_error(run("evaluate", "--pred", pred, "--ref", ref, "-o", out, "--workers", "1"), out,
                      f"cannot write {out}: the disk is full")


# --- an interrupted run: Ctrl-C, SIGTERM, SIGKILL while the output is being written --------------

_HANG_AFTER_SAVE_DRIVER = """
import pathlib, sys, time, torch
marker, save = pathlib.Path(sys.argv[1]), torch.save
def save_then_hang(obj, f, *args, **kwargs):  # the checkpoint is written, the rest of the folder not yet
    save(obj, f, *args, **kwargs)
    marker.touch()
    time.sleep(600)
torch.save = save_then_hang
from medslim.cli import main
sys.argv = ["medslim", *sys.argv[2:]]
main()
"""


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL], ids=lambda s: s.name)
def test_interrupted_compress_leaves_no_output_and_the_next_run_succeeds(reference_dir, tmp_path, sig):
    """Ctrl-C and SIGTERM: one line, exit 130, the half-written folder removed. SIGKILL cannot be
    handled: only a hidden ``.out.tmp-…`` sibling stays, never taken for ``out``, and the next
    run removes it (its process is gone) and writes ``out``."""
    before, out, marker = tree_digest(reference_dir), tmp_path / "out", tmp_path / "checkpoint_written"
    # as from a terminal: a shell without job control starts background jobs with SIGINT ignored,
    # and pytest's children would inherit that (Python then installs no KeyboardInterrupt handler)
    proc = subprocess.Popen([sys.executable, "-c", _HANG_AFTER_SAVE_DRIVER, str(marker), "compress",
                             str(reference_dir), "-o", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 600
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the compress run never reached its checkpoint"
            time.sleep(0.2)
        assert not out.exists() and len(list(tmp_path.glob(".out.tmp-*"))) == 1  # writing, out of sight
        proc.send_signal(sig)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert not out.exists()
    if sig == signal.SIGKILL:
        assert proc.returncode == -signal.SIGKILL
        assert len(list(tmp_path.glob(".out.tmp-*"))) == 1
    else:
        line = one_line(SimpleNamespace(exit_code=proc.returncode, stderr=stderr, output=stdout + stderr), 130)
        assert line == "error: interrupted", line
        assert not list(tmp_path.glob(".out.*")), "temporary folder left behind"
    result = run("compress", reference_dir, "-o", out)
    assert result.exit_code == 0, result.output
    assert (out / "fold_0" / "checkpoint_final.pth").is_file() and (out / "compression_report.json").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint_written", "out"]
    assert tree_digest(reference_dir) == before


def test_only_temporaries_of_dead_processes_on_this_host_are_removed(tmp_path):
    import socket

    from medslim.atomic import remove_stale_temporaries

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host, out = socket.gethostname(), tmp_path / "out"
    names = {f".out.tmp-{host}-{dead.pid}-x1": False, f".out.tmp-{host}-{os.getpid()}-x2": True,
             f".out.tmp-{host}-1-x3": True, f".out.tmp-other-host-{dead.pid}-x4": True, f".out2.tmp-{host}-{dead.pid}-x5": True}
    for name in names:
        (tmp_path / name).mkdir()
    assert remove_stale_temporaries(out) == [tmp_path / f".out.tmp-{host}-{dead.pid}-x1"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(n for n, stays in names.items() if stays)


# --- bugs: one line with a pointer to --debug; --debug shows the traceback ----------------------

def _raise(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc
    return fail


def evaluate_with(monkeypatch, tmp_path, exc: BaseException, *global_args: str, env: dict | None = None):
    import medslim.evaluate

    monkeypatch.setattr(medslim.evaluate, "evaluate_command", _raise(exc))
    return run(*global_args, "evaluate", "--pred", tmp_path, "--ref", tmp_path, env=env)


def test_internal_error_is_one_line_pointing_to_debug(monkeypatch, tmp_path):
    result = evaluate_with(monkeypatch, tmp_path, RuntimeError("boom [/red] in [bold]x\nsecond line"))
    line = one_line(result, 1)
    assert "internal error (RuntimeError: boom [/red] in [bold]x)" in line, line
    assert "medslim --debug" in line and "MEDSLIM_DEBUG=1" in line


@pytest.mark.parametrize("how", ["option", "env"])
def test_debug_shows_the_traceback(monkeypatch, tmp_path, how):
    exc = RuntimeError("boom")
    result = (evaluate_with(monkeypatch, tmp_path, exc, "--debug") if how == "option"
              else evaluate_with(monkeypatch, tmp_path, exc, env={"MEDSLIM_DEBUG": "1"}))
    assert result.exit_code == 1
    assert "Traceback (most recent call last)" in result.stderr and "RuntimeError: boom" in result.stderr
    assert stderr_lines(result)[-1].startswith("error: internal error (RuntimeError: boom)")


def test_user_error_with_markup_in_message(monkeypatch, tmp_path):
    line = one_line(evaluate_with(monkeypatch, tmp_path, MedslimError("bad [/] label [b]x[/b]")), 2)
    assert line == "error: bad [/] label [b]x[/b]"


def test_os_error_naming_a_file_is_a_user_error(monkeypatch, tmp_path):
    exc = PermissionError(13, "Permission denied", str(tmp_path / "[locked]"))
    line = one_line(evaluate_with(monkeypatch, tmp_path, exc), 2)
    assert f"Permission denied: '{tmp_path / '[locked]'}'" in line


def test_exit_codes_pass_through(monkeypatch, tmp_path):
    import typer

    result = evaluate_with(monkeypatch, tmp_path, typer.Exit(3))
    assert result.exit_code == 3 and not result.stderr.strip()
    result = evaluate_with(monkeypatch, tmp_path, SystemExit(4))
    assert result.exit_code == 4


def test_consoles_print_brackets_verbatim():
    from medslim.cli_common import console, out_console

    for c in (console, out_console):
        with c.capture() as cap:
            c.print("wrote /tmp/[/x] [bold]y[/bold]", soft_wrap=True, highlight=False)
        assert cap.get().strip() == "wrote /tmp/[/x] [bold]y[/bold]"


def test_help_still_works():
    result = run("--help")
    assert result.exit_code == 0 and "--debug" in result.stdout and "compress" in result.stdout
    result = run("compress", "--help")
    assert result.exit_code == 0 and "--rank-min" in result.stdout and not result.stderr.strip()
    result = run("transfer", "run", "--help")
    assert result.exit_code == 0 and "--method" in result.stdout


def test_console_script_main(monkeypatch, capsys, reference_dir, tmp_path):
    """``main()`` (the installed ``medslim``) behaves as ``app`` under CliRunner."""
    from medslim.cli import main

    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # typer's app() installs its own
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # main()'s SIGTERM handler: not in pytest
    out = tmp_path / "out"
    for argv, match in ((["compress", str(reference_dir), "-o", str(out), "--df", "abc"], "'--df'"),
                        (["compress", str(reference_dir), "-o", str(out), "--prunee", "0.5"], "did you mean --prune"),
                        (["compress", str(reference_dir), "-o", str(out), "--df", "2"], "--df must be in (0, 1]")):
        monkeypatch.setattr(sys, "argv", ["medslim", *argv])
        with pytest.raises(SystemExit) as e:
            main()
        assert e.value.code == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and match in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
