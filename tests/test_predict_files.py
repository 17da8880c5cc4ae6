"""``gms-jax predict`` on a real folder of a user's files, and after being killed.

* Every file in a folder is predicted or listed as not read: WebP and GIF are read like PNG, a
  text file and a hidden file are listed on stderr; the masks are the same as for PNG copies.
* One orientation rule, the displayed one: a JPEG whose EXIF orientation is 6 (rotate 90°) gets
  the mask of the rotated image, at the rotated size (training and evaluation read images the
  same way: ``gms_jax.data.checks``).
* Killed with SIGKILL while writing masks, then run again into the same ``--out``: the rerun
  recognises its own temporary and partial files, finishes, and the folder equals an
  uninterrupted run's; the manifest lists only files that exist.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import cli_env, gms_jax_command, run_cli
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
SAMPLE = sorted((REPO / "gms_jax" / "assets" / "sample" / "images").glob("*.png"))
MANIFEST = ".gms-jax-output.json"


def _masks(folder: Path) -> dict[str, np.ndarray]:
  return {
    str(p.relative_to(folder)): np.asarray(Image.open(p)) for p in sorted(folder.rglob("*.png"))
  }


@pytest.mark.slow
def test_webp_gif_ppm_tga_exif_and_unreadable_files_in_a_folder(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  src = tmp_path / "in"
  src.mkdir()
  rgb = Image.open(SAMPLE[0]).convert("RGB")
  rgb.save(src / "a.png")
  rgb.save(src / "b.webp", lossless=True)
  rgb.save(src / "c.gif")  # palette: not bit-exact, only read
  tall = Image.open(SAMPLE[1]).convert("RGB").resize((48, 32))
  exif = Image.Exif()
  exif[0x0112] = 6  # orientation: the stored image is shown rotated by 90 degrees
  tall.save(src / "d.jpg", exif=exif, quality=95)
  rgb.save(src / "e.ppm")  # other formats Pillow reads: lossless, so the PNG's mask
  rgb.save(src / "f.tga")
  (src / "notes.txt").write_text("not an image")
  (src / ".hidden.png").write_bytes(b"")
  p = run_cli("predict", "--workdir", workdir, src, "--out", tmp_path / "out")
  assert p.returncode == 0, p.stderr[-3000:]
  assert "wrote 6 masks" in p.stdout
  listed = [ln for ln in p.stderr.splitlines() if "not read:" in ln]
  assert len(listed) == 2 and any("notes.txt" in ln for ln in listed)
  assert any(".hidden.png" in ln for ln in listed)
  masks = _masks(tmp_path / "out")
  assert set(masks) == {"a.png", "b.png", "c.png", "d.png", "e.png", "f.png"}
  np.testing.assert_array_equal(masks["a.png"], masks["b.png"])  # lossless WebP = the PNG
  np.testing.assert_array_equal(masks["a.png"], masks["e.png"])
  np.testing.assert_array_equal(masks["a.png"], masks["f.png"])
  assert masks["c.png"].shape == masks["a.png"].shape
  assert masks["d.png"].shape == (48, 32)  # shown 32 wide x 48 high after the 90 degree turn


@pytest.mark.slow
def test_predict_killed_then_rerun_finishes_like_an_uninterrupted_run(smoke_run, tmp_path):
  workdir, _, _ = smoke_run
  src = tmp_path / "in"
  for k in range(8):  # 320 images: five chunks of 64, so a kill lands between masks
    d = src / f"d{k}"
    d.mkdir(parents=True)
    for img in SAMPLE:
      (d / img.name).write_bytes(img.read_bytes())
  whole = tmp_path / "whole"
  p = run_cli("predict", "--workdir", workdir, src, "--out", whole)
  assert p.returncode == 0, p.stderr[-3000:]
  out = tmp_path / "out"
  proc = subprocess.Popen(
    gms_jax_command() + ["predict", "--workdir", str(workdir), str(src), "--out", str(out)],
    env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    if out.is_dir() and sum(1 for _ in out.rglob("*.png")) >= 70:
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait(timeout=60)
  assert proc.returncode == -9, "predict finished before it could be killed"
  n_before = sum(1 for _ in out.rglob("*.png"))
  assert 70 <= n_before < 320
  # A killed writer's temporary file, as SIGKILL during a PNG write leaves it.
  (out / "d0" / ".tmp-k1lled_x.png").write_bytes(b"")
  p = run_cli("predict", "--workdir", workdir, src, "--out", out)
  assert p.returncode == 0, p.stderr[-3000:]
  got, want = _masks(out), _masks(whole)
  assert set(got) == set(want) and len(got) == 320
  for name in want:
    np.testing.assert_array_equal(got[name], want[name])
  assert not list(out.rglob(".tmp-*"))
  manifest = json.loads((out / MANIFEST).read_text())
  assert sorted(manifest["files"]) == sorted(got) and "planned" not in manifest


def test_evaluate_killed_then_rerun_leaves_no_staging_folder(smoke_run, tmp_path):
  """evaluate writes into a hidden staging folder beside --out and renames it at the end; after a
  SIGKILL the rerun removes the killed run's staging folder (marked with host and PID) and
  finishes; a staging-like folder without our marker, or of a live process, is left alone."""
  workdir, tfds, _ = smoke_run
  out = tmp_path / "eval"
  foreign = tmp_path / ".eval.tmp-user"  # a user's folder that only looks like ours
  foreign.mkdir()
  live = tmp_path / ".eval.tmp-live"  # a staging folder of a running evaluate (this process)
  live.mkdir()
  (live / ".gms-jax-staging.json").write_text(
    json.dumps({"host": __import__("socket").gethostname(), "pid": __import__("os").getpid()})
  )
  args = ["evaluate", "--workdir", str(workdir), "--split", "all", "--out", str(out)]
  proc = subprocess.Popen(
    gms_jax_command() + args + [f"--tfds-dir={tfds}"],
    env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
  )  # fmt: skip
  deadline = time.time() + 300
  staged = []
  while time.time() < deadline and proc.poll() is None:
    staged = [
      d for d in tmp_path.glob(".eval.tmp-*") if d not in (foreign, live) and (d / "masks").is_dir()
    ]
    if staged and any((staged[0] / "masks").iterdir()):
      proc.send_signal(signal.SIGKILL)
      break
    time.sleep(0.01)
  proc.wait(timeout=60)
  assert proc.returncode == -9, "evaluate finished before it could be killed"
  assert staged and staged[0].is_dir() and not out.exists()
  p = run_cli(*args, f"--tfds-dir={tfds}")
  assert p.returncode == 0, p.stderr[-3000:]
  left = sorted(d.name for d in tmp_path.glob(".eval.*"))
  assert left == sorted([foreign.name, live.name]), left
  summary = json.loads((out / "summary.json").read_text())
  assert summary["n"] == 40
  manifest = json.loads((out / MANIFEST).read_text())
  assert ".gms-jax-staging.json" not in manifest["files"]
  assert not (out / ".gms-jax-staging.json").exists()


def test_only_our_own_temporaries_count_as_ours(tmp_path):
  """A killed predict's temporaries (write_atomic's names) are its own and removed on rerun; a
  user's file that merely starts with ".tmp-" makes the folder foreign and is never removed."""
  from gms_jax import outputs
  from gms_jax.errors import OutputError

  out = tmp_path / "out"
  out.mkdir()
  outputs.write_manifest(str(out), "predict", ["a.png"])
  (out / "a.png").write_bytes(b"x")
  (out / ".tmp-ab12_xyz.png").write_bytes(b"")  # as tempfile.mkstemp names them
  assert outputs.check_owned(str(out), "predict") == "own"
  assert outputs.remove_own_temporaries(str(out)) == 1
  (out / ".tmp-notes.txt").write_text("mine")
  with pytest.raises(OutputError, match=r"\.tmp-notes\.txt"):
    outputs.check_owned(str(out), "predict")
  assert outputs.remove_own_temporaries(str(out)) == 0
  assert (out / ".tmp-notes.txt").read_text() == "mine"
