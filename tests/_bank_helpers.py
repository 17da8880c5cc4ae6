"""Builds a latent bank in a fresh process: ``python tests/_bank_helpers.py SPEC.json``.

SPEC keys: ``tfds_dir``, ``bank_dir``, ``seed``, ``num_views``, ``shard_size``, ``image_size``,
``tokenizer_seed``, ``encode_batch_size``, ``extras`` (list of view extras, e.g. ``["intensity"]``: bank.intensity_augment, ...),
``process_index`` / ``process_count`` (this process builds its share of the shards, as on a pod); ``kill_at_save``: SIGKILL this process at that call of
``np.save`` (counted over the whole build: each shard saves ``index`` and then its arrays), i.e.
in the middle of writing a shard.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _train_helpers as H  # noqa: E402


def manifest_for(spec: dict, source, tok):
  from gms_jax import bank as bank_lib

  s = int(spec["image_size"])
  f = tok.downsample
  return bank_lib.make_manifest(
    tokenizer={
      "name": "sd-vae",
      "path": "",
      "family": tok.family,
      "latent_channels": tok.latent_channels,
      "params_sha256": bank_lib.params_sha256(tok.params),
    },
    precision="float32",
    image_size=s,
    source=source,
    seed=int(spec["seed"]),
    num_views=int(spec["num_views"]),
    shard_size=int(spec["shard_size"]),
    has_std=tok.has_posterior,
    latent_shape=(s // f, s // f, tok.latent_channels),
    extras=tuple(spec.get("extras", ())),
  )


def build(spec: dict):
  import jax

  from gms_jax import bank as bank_lib
  from gms_jax import recipes
  from gms_jax.data import builder

  source = builder.prepare({"name": "sample", "tfds_dir": spec["tfds_dir"]})["train"]
  tok = H.tiny_tokenizer(int(spec.get("tokenizer_seed", 0)))
  manifest = bank_lib.prepare_manifest(spec["bank_dir"], manifest_for(spec, source, tok))
  return bank_lib.build(
    spec["bank_dir"],
    source,
    manifest,
    recipes.make_encode_fn(tok, jax.local_devices()[:1]),
    encode_batch_size=int(spec.get("encode_batch_size", 8)),
    process_index=int(spec.get("process_index", 0)),
    process_count=int(spec.get("process_count", 1)),
  )


def _main(spec_path: str) -> int:
  spec = json.loads(Path(spec_path).read_text())
  sys.modules.setdefault("torch", None)
  kill = spec.get("kill_at_save")
  if kill is not None:
    import numpy as np

    original, calls = np.save, []

    def save_then_die(*args, **kwargs):
      calls.append(1)
      if len(calls) == int(kill):
        print("KILLING mid-shard", flush=True)
        os.kill(os.getpid(), signal.SIGKILL)
      return original(*args, **kwargs)

    np.save = save_then_die
  print("BUILT", json.dumps(build(spec)), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(_main(sys.argv[1]))
