"""``hf:`` tokenizer ids: download through ``huggingface_hub``, convert once, cache the result.

Syntax: ``hf:OWNER/REPO[@REVISION][/SUBFOLDER]``, e.g. ``hf:stabilityai/sd-vae-ft-mse``,
``hf:stabilityai/stable-diffusion-2@main/vae``, ``hf:madebyollin/taesd``.

* SD-VAE family (diffusers ``AutoencoderKL``): ``config.json`` + ``diffusion_pytorch_model.safetensors``
  (or ``.bin``) of the (sub)folder, or of ``vae/`` for a pipeline repository named without a
  subfolder; the architecture and ``scaling_factor`` come from them.
* TAESD family (:data:`TAE_REPOS`: ``madebyollin/taesd``, ``taesdxl``, ``taef1``, ``taesd3``):
  ``<name>_encoder.pth`` + ``<name>_decoder.pth``.

Files come from the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``) and are downloaded only when
missing and the Hub may be used (``HF_HUB_OFFLINE=1`` forbids it).  On first use the weights are
converted and written as ``gms_jax-<family>.safetensors`` next to the downloaded files (inside the
cache snapshot of that revision), so later starts read that file and need no torch.
"""

from __future__ import annotations

import os
import re

from gms_jax import errors
from gms_jax.convert import core

PREFIX = "hf:"
TAE_REPOS = {
  "madebyollin/taesd": "taesd",
  "madebyollin/taesdxl": "taesdxl",
  "madebyollin/taef1": "taef1",
  "madebyollin/taesd3": "taesd3",
}
_SD_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


def is_hf_id(path: str) -> bool:
  return str(path).startswith(PREFIX)


def parse(spec: str) -> tuple[str, str | None, str]:
  """``hf:owner/repo@rev/sub/folder`` -> ``("owner/repo", "rev" or None, "sub/folder" or "")``."""
  m = re.fullmatch(r"hf:([\w.-]+/[\w.-]+?)(?:@([\w.-]+))?(?:/([\w./-]+?))?/?", str(spec))
  if not m:
    raise errors.ConfigError(
      f"{spec}: not a Hugging Face id; expected hf:OWNER/REPO[@REVISION][/SUBFOLDER]"
    )
  return m[1], m[2], m[3] or ""


def family_of(spec: str) -> str:
  """``"tae"`` for the TAESD-family repositories, else ``"sd-vae"``."""
  return "tae" if parse(spec)[0] in TAE_REPOS else "sd-vae"


def _offline() -> bool:
  from huggingface_hub import constants

  return bool(constants.HF_HUB_OFFLINE)


def _fetch_hint(repo: str, revision: str | None, sub: str) -> str:
  rev = f" --revision {revision}" if revision else ""
  inc = f" --include '{sub}/*'" if sub else ""
  return f"`hf download {repo}{rev}{inc}` with network access (and HF_HUB_OFFLINE unset)"


def _download(spec: str, filename: str) -> str:
  """One file of the id, from the cache or the Hub; errors are one line naming the id."""
  try:
    import huggingface_hub
  except ImportError as e:
    raise ImportError(f"{spec}: hf: ids need huggingface_hub (pip install huggingface_hub)") from e
  from huggingface_hub import errors as hf_errors

  repo, revision, sub = parse(spec)
  try:
    return huggingface_hub.hf_hub_download(
      repo, filename, subfolder=sub or None, revision=revision, local_files_only=_offline()
    )
  except (hf_errors.LocalEntryNotFoundError, hf_errors.OfflineModeIsEnabled) as e:
    from huggingface_hub import constants

    why = "HF_HUB_OFFLINE=1" if _offline() else "the Hub cannot be reached"
    raise errors.MissingPathError(
      f"{spec}: {os.path.join(sub, filename)} is not in the Hugging Face cache ({constants.HF_HUB_CACHE}) "
      f"and {why}; fetch it once with {_fetch_hint(repo, revision, sub)}"
    ) from e
  except (
    hf_errors.EntryNotFoundError,
    hf_errors.RepositoryNotFoundError,
    hf_errors.RevisionNotFoundError,
  ) as e:
    raise errors.MissingPathError(f"{spec}: {type(e).__name__}: {str(e).splitlines()[0]}") from e


def _fallback(converted: str) -> str:
  """Where the converted file goes when the Hugging Face cache is not writable."""
  from huggingface_hub import constants

  rel = os.path.relpath(converted, constants.HF_HUB_CACHE)
  return os.path.join(
    os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "gms_jax", "hf", rel
  )


def resolve(spec: str, family: str) -> str:
  """A converted gms_jax parameter file for the id (downloading/converting on first use)."""
  want = family_of(spec)
  if family != want:
    raise errors.ConfigError(
      f"{spec}: holds a {want!r} tokenizer but the config names {family!r} "
      f"(set --config.tokenizer.name={'taesd' if want == 'tae' else 'sd-vae'})"
    )
  repo, _, _ = parse(spec)
  if want == "tae":
    name = TAE_REPOS[repo]
    files = [_download(spec, f"{name}_encoder.pth"), _download(spec, f"{name}_decoder.pth")]
  else:
    try:
      files = [_download(spec, "config.json")]
    except errors.MissingPathError as first:  # a pipeline repository keeps its VAE in vae/
      if parse(spec)[2]:
        raise
      try:
        return resolve(spec.rstrip("/") + "/vae", family)
      except errors.MissingPathError:
        raise first from None
  converted = os.path.join(os.path.dirname(files[0]), f"gms_jax-{want}.safetensors")
  for candidate in (converted, _fallback(converted)):
    if os.path.isfile(candidate):
      return candidate
  if want == "tae":
    from gms_jax.convert import tae

    flat, cfg = tae.load_tae(*files)
  else:
    from gms_jax.convert import sd_vae

    weights, err = None, None
    for name in _SD_WEIGHTS:  # safetensors first: no torch needed
      try:
        weights = _download(spec, name)
        break
      except FileNotFoundError as e:
        err = err or e
    if weights is None:
      raise err
    flat, cfg = sd_vae.load_diffusers(os.path.dirname(files[0]))
  try:
    core.save_params(converted, flat, family=want, config=cfg.to_dict())
  except OSError:  # a read-only (shared) cache: keep the converted file in our own cache instead
    converted = _fallback(converted)
    core.save_params(converted, flat, family=want, config=cfg.to_dict())
  return converted
