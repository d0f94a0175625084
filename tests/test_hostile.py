"""Hostile inputs to the library, the data discovery and the CLI: each gives a clear error or a documented result."""

import os
import subprocess
import sys
import textwrap
import warnings

import numpy as np
import pytest
import soundfile as sf
import torch

from s4lib import S4Block
from s4lib.fftconv import D_STATE_WARN, FFTConv
from sashimi.cli import main
from sashimi.data.datasets import AudioFolderDataset, LinkWarning, _find_audio_files
from sashimi.models.autoregressive import build_model
from sashimi.training import runtime
from sashimi.training.checkpoint import CheckpointError, load_checkpoint

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SR = 8000


def write_wav(path, seconds=0.25, freq=440.0):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    t = np.arange(int(seconds * SR)) / SR
    sf.write(path, 0.5 * np.sin(2 * np.pi * freq * t), SR)


# ----------------------------------------------------------------------------- symbolic links in data folders


def linked_folder(root):
    """Two classes of real files, a loop to the root, a loop to a parent, a second link to a file, a dangling link."""
    for c in ("down", "up"):
        for k in range(6):
            write_wav(str(root / c / f"{c}_{k}.wav"), freq=200 + 50 * k)
    os.symlink(".", root / "self")  # a loop: root/self/self/... is root
    os.symlink("..", root / "up" / "parent")  # a second loop, through a class folder
    os.symlink("down_0.wav", root / "down" / "again.wav")  # a second name for one real file
    os.symlink("missing.wav", root / "down" / "gone.wav")  # dangling
    return 12


def test_symlink_loops_index_each_file_once(tmp_path):
    n_real = linked_folder(tmp_path)
    with pytest.warns(LinkWarning, match="skipped"):
        files = _find_audio_files(str(tmp_path))
    assert len(files) == n_real
    real = {os.path.realpath(tmp_path / f) for f in files}
    assert len(real) == n_real  # each real file once, under its own (shortest) path
    assert all(f.startswith(("down/down_", "up/up_")) for f in files), files


def test_symlink_loops_never_leak_between_splits(tmp_path):
    linked_folder(tmp_path)
    seen = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for split in ("train", "val", "test"):
            try:
                ds = AudioFolderDataset(tmp_path, split, sample_rate=SR, sample_len=SR // 4, quantizer=None)
            except ValueError:  # an empty split is allowed
                continue
            for f in ds.files:
                real = os.path.realpath(tmp_path / f)
                assert real not in seen, f"{f} is in {split} and in {seen[real]}"
                seen[real] = split
    assert len(seen) == 12


def test_two_symlink_loops_do_not_hang_discovery(tmp_path):
    """Two loops made os.walk(followlinks=True) exponential; the walk must stay bounded."""
    write_wav(str(tmp_path / "a" / "x.wav"))
    os.symlink("..", tmp_path / "a" / "back")
    os.symlink(".", tmp_path / "a" / "here")
    os.symlink("a", tmp_path / "b")
    code = (f"import warnings; warnings.simplefilter('ignore'); from sashimi.data.datasets import _find_audio_files; "
            f"print(_find_audio_files({str(tmp_path)!r}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "['a/x.wav']"


# ----------------------------------------------------------------------------- s4lib API edges


@pytest.fixture(scope="module")
def stepping_block():
    torch.manual_seed(0)
    block = S4Block(4, d_state=8, backend="naive").eval()
    block.setup_step()
    return block


@pytest.mark.parametrize("state, error, match", [
    (lambda B: torch.zeros(B, 1, 4, dtype=torch.complex64), ValueError, r"state must have shape \(2, H=4, n=4\)"),
    (lambda B: torch.zeros(B + 1, 4, 4, dtype=torch.complex64), ValueError, "state must have shape"),
    (lambda B: None, TypeError, r"default_state\(2\)"),
    (lambda B: torch.zeros(B, 4, 4), TypeError, "complex"),
])
def test_step_rejects_bad_states(stepping_block, state, error, match):
    x = torch.randn(2, 4)
    for layer in (stepping_block, stepping_block.layer):
        with pytest.raises(error, match=match):
            layer.step(x, state(2))
    y, s = stepping_block.step(x, stepping_block.default_state(2))  # the right state still works
    assert y.shape == (2, 4) and s.shape == (2, 4, 4)


@pytest.mark.parametrize("mode", ["dplr", "diag"])
def test_empty_batch_gives_empty_output_and_gradients(mode):
    block = S4Block(4, d_state=8, mode=mode, backend="naive")
    x = torch.randn(0, 4, 16, requires_grad=True)
    y, _ = block(x)
    assert y.shape == (0, 4, 16)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert all(p.grad is None or torch.all(p.grad == 0) for p in block.layer.kernel.parameters())


@pytest.mark.parametrize("lengths, error, match", [
    (torch.tensor([3, 4, 5]), ValueError, "one length per sequence: 2 expected, got 3"),
    (torch.tensor([-1, 4]), ValueError, r"in \[0, 16\]"),
    (torch.tensor([4, 17]), ValueError, r"in \[0, 16\]"),
    (torch.tensor([1.5, 4.0]), TypeError, "integers"),
])
def test_lengths_are_checked(lengths, error, match):
    block = S4Block(4, d_state=8, backend="naive")
    with pytest.raises(error, match=match):
        block(torch.randn(2, 4, 16), lengths=lengths)
    y, _ = block(torch.randn(2, 4, 16), lengths=[0, 16])  # the bounds themselves are fine
    assert y.shape == (2, 4, 16)


@pytest.mark.parametrize("override, match", [
    (dict(hurwitz="no"), "hurwitz must be True or False"),
    (dict(unet=1), "unet must be True or False"),
    (dict(ssm_lr=-1), "ssm_lr must be a finite number >= 0"),
    (dict(ssm_lr=float("inf")), "ssm_lr must be a finite number >= 0"),
    (dict(dropout=float("nan")), "dropout"),
    (dict(dt_min=float("nan")), "dt_min"),
])
def test_build_model_rejects_bad_settings(override, match):
    with pytest.raises(ValueError, match=match):
        build_model("tiny", **override)


def test_large_d_state_warns_and_documented_size_does_not():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FFTConv(2, d_state=D_STATE_WARN, mode="diag", backend="naive")
    with pytest.warns(UserWarning, match=f"d_state={2 * D_STATE_WARN} is above {D_STATE_WARN}"):
        FFTConv(2, d_state=2 * D_STATE_WARN, mode="diag", backend="naive")


# ----------------------------------------------------------------------------- CLI flags and files


def test_demo_refuses_bad_n_before_training(tmp_path, capsys):
    assert main(["demo", "--n", "0", "--out", str(tmp_path / "demo"), "--no-progress"]) == 1
    assert "n must be an int >= 1" in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()  # nothing trained, nothing written


def test_train_negative_seed_names_the_flag(tmp_path, capsys):
    args = ["train", "--preset", "tiny", "--out", str(tmp_path / "run"), "--seed", "-1", "--max-steps", "1",
            "--no-progress"]
    assert main(args) == 1
    assert "seed must be" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_zero_byte_checkpoint_says_why(tmp_path):
    path = tmp_path / "last.pt"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match="empty"):
        load_checkpoint(str(path))


# ----------------------------------------------------------------------------- threads under torchrun


@pytest.mark.parametrize("requested, local, cores, threads, warns", [
    (None, 1, 2, None, False),  # one process: torch's choice
    (None, 2, 2, 1, False),  # torchrun on 2 cores: 1 each, whatever OMP_NUM_THREADS says
    (None, 2, 8, 4, False),
    (None, 3, 2, 1, True),  # more processes than cores: 1 each, and a warning
    (2, 2, 2, 2, True),  # --threads is obeyed, with a warning
    (1, 2, 2, 1, False),
    (4, 1, 2, 4, True),
])
def test_thread_choice(requested, local, cores, threads, warns):
    got, warning = runtime.choose_threads(requested, local, cores)
    assert got == threads
    assert (warning is not None) == warns
    if warning:
        assert "exceed" in warning and "--threads" in warning


def test_torchrun_processes_get_their_share_of_the_cores(monkeypatch):
    monkeypatch.setattr(runtime, "available_cores", lambda: 2)
    before = torch.get_num_threads()
    messages = []
    try:
        torch.set_num_threads(2)  # as with OMP_NUM_THREADS=2 exported
        assert runtime.configure_threads(None, runtime.Processes(0, 2, local_world_size=2), messages.append) == 1
        assert messages == []
        assert runtime.configure_threads(2, runtime.Processes(0, 2, local_world_size=2), messages.append) == 2
        assert runtime.configure_threads(2, runtime.Processes(1, 2, local_world_size=2), messages.append) == 2
        assert len(messages) == 1  # once: from the first local process only
    finally:
        torch.set_num_threads(before)


def test_setup_processes_reads_the_local_process_count(monkeypatch):
    code = textwrap.dedent("""
        import os
        from sashimi.training.runtime import setup_processes
        p = setup_processes()
        print(p.world_size, p.local_world_size)
    """)
    env = dict(os.environ, PYTHONPATH=REPO, RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(29500 + os.getpid() % 1000))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["1", "1"]
