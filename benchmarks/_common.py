"""Shared machinery of the ``benchmarks/`` scripts (not part of the ``gms_jax`` package).

Each benchmark script is a *driver*: it prepares identical weights for both frameworks once
(PyTorch modules built from a seed, converted to Flax with the product's converters, both written
to a cache folder), then runs every measured variant in its **own subprocess** (a *worker*), so
that peak memory is attributable to one framework / one variant and the two frameworks never share
a thread pool.  Workers write one JSON record each; the driver prints a table and writes all
records plus the machine description to a JSON results file.

Workers that measure JAX never import torch (the JAX side reads the converted ``.safetensors``),
so their RSS is JAX's alone.

Timing: wall clock around a step, after ``jax.block_until_ready`` (JAX) or
``torch.cuda.synchronize`` (PyTorch on a GPU; PyTorch CPU ops are synchronous).  JAX steps are
AOT-compiled first (``jit(...).lower(...).compile()``) and compile time is reported separately.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run from a checkout without `pip install -e .`
  sys.path.insert(0, str(REPO))

DEFAULT_TAEF2 = os.environ.get("GMS_TAEF2_DIR", str(REPO.parent / "shared" / "weights" / "taef2"))
TOKENIZERS = ("sd-vae", "taef2")
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0"
SD_SCALE = 0.18215

# Peak dense throughput per device kind, FLOP/s, for MFU (vendor datasheets, SXM parts).
# "float32" on NVIDIA = TF32 tensor cores (XLA and cuDNN use TF32 for f32 convs by default).
GPU_PEAKS = {
    "H100": {"float32": 494.7e12, "bfloat16": 989.4e12, "float32_no_tf32": 66.9e12},
    "H200": {"float32": 494.7e12, "bfloat16": 989.4e12, "float32_no_tf32": 66.9e12},
    "A100": {"float32": 156e12, "bfloat16": 312e12, "float32_no_tf32": 19.5e12},
}


# ============================================================================ arguments


def base_parser(description: str) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description,
                              formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  p.add_argument("--tokenizer", choices=("sd-vae", "taef2", "both"), default=None,
                 help="default: both (--quick: sd-vae, the tiny config)")
  p.add_argument("--frameworks", choices=("jax", "torch", "both"), default="both")
  p.add_argument("--size", type=int, default=224, help="image side (latents are size/8)")
  p.add_argument("--repeats", type=int, default=5, help="timed repetitions")
  p.add_argument("--warmup", type=int, default=1, help="untimed repetitions after compilation")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                 help="compute dtype (bfloat16 is meant for GPUs; PyTorch uses autocast)")
  p.add_argument("--threads", type=int, default=os.cpu_count(),
                 help="torch.set_num_threads (XLA:CPU uses one thread per core)")
  p.add_argument("--taef2", default=DEFAULT_TAEF2,
                 help="folder with taef2_{encoder,decoder}.pth; random TAEF2 weights if missing")
  p.add_argument("--sd-vae", default="",
                 help="diffusers AutoencoderKL folder for real SD weights (default: random init; "
                      "speed does not depend on the values)")
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true",
                 help="smoke run for CI (numbers meaningless): tiny SD config only, 32x32, batch 2, "
                      "1 repeat, no warmup, 1 PyTorch thread")
  p.add_argument("--out", default="", help="results JSON (default benchmarks/results/<name>.json)")
  p.add_argument("--cache", default="", help="folder for the shared weights (default: a temp dir)")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)  # internal: JSON job spec
  return p


def apply_quick(args) -> None:
  """``--quick``: the smallest run that still goes through every code path."""
  if args.tokenizer is None:
    args.tokenizer = "sd-vae" if args.quick else "both"
  if getattr(args, "remat", "") is None:
    args.remat = "off" if args.quick else "both"
  if args.quick:
    args.size, args.repeats, args.warmup, args.threads = 32, 1, 0, 1
    if hasattr(args, "batch"):
      args.batch = 2
    if hasattr(args, "batches"):
      args.batches = "1"


def tokenizer_list(args) -> list[str]:
  return list(TOKENIZERS) if args.tokenizer == "both" else [args.tokenizer]


def framework_list(args) -> list[str]:
  return ["jax", "torch"] if args.frameworks == "both" else [args.frameworks]


# ============================================================================ machine / stats


def _git(*cmd) -> str:
  try:
    return subprocess.run(["git", *cmd], cwd=REPO, capture_output=True, text=True, timeout=10,
                          check=False).stdout.strip()
  except Exception:  # pylint: disable=broad-except
    return ""


def cpu_model() -> str:
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def cpu_peak_flops(n_cores: int) -> dict[str, Any]:
  """A rough fp32 peak for x86: cores x nominal MHz x FLOP/cycle (AVX-512: 64, AVX2+FMA: 32)."""
  mhz, flags = 0.0, set()
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.startswith("cpu MHz") and not mhz:
          mhz = float(line.split(":", 1)[1])
        elif line.startswith("flags") and not flags:
          flags = set(line.split(":", 1)[1].split())
  except OSError:
    return {}
  per_cycle = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
  return {"mhz": mhz, "flop_per_cycle_per_core": per_cycle,
          "peak_flops": n_cores * mhz * 1e6 * per_cycle,
          "note": "nominal clock x 2 FMA pipes x SIMD width; an estimate"}


def machine_info() -> dict[str, Any]:
  """Host, library versions and commit: everything a reader needs to reproduce a table."""
  import importlib.metadata as md  # pylint: disable=import-outside-toplevel
  vers = {}
  for pkg in ("jax", "jaxlib", "flax", "optax", "torch", "diffusers", "numpy"):
    try:
      vers[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      vers[pkg] = None
  n = os.cpu_count() or 1
  try:
    load = os.getloadavg()
  except OSError:
    load = None
  try:
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
  except (ValueError, OSError):
    mem_gib = None
  return {
      "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
      "commit": _git("rev-parse", "HEAD"),
      "dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
      "cpu": cpu_model(), "cpu_count": n, "mem_gib": mem_gib,
      "cpus_allowed": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
      "loadavg_at_start": load, "cpu_peak_estimate": cpu_peak_flops(n),
      "python": platform.python_version(), "platform": platform.platform(),
      "versions": vers, "XLA_FLAGS": os.environ.get("XLA_FLAGS", ""),
      "command": " ".join([Path(sys.executable).name] + sys.argv),
  }


def stats(times: Sequence[float]) -> dict[str, float]:
  """Median and spread of repeated timings (seconds)."""
  t = sorted(times)
  if not t:
    return {}
  q = statistics.quantiles(t, n=4) if len(t) >= 2 else [t[0], t[0], t[0]]
  return {"median_s": statistics.median(t), "min_s": t[0], "max_s": t[-1],
          "iqr_s": q[2] - q[0], "mean_s": statistics.fmean(t),
          "std_s": statistics.stdev(t) if len(t) >= 2 else 0.0, "n": len(t)}


def rss_bytes() -> int:
  """Current resident set size of this process."""
  try:
    with open("/proc/self/statm", encoding="utf-8") as f:
      return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
  except OSError:
    return 0


def peak_rss_bytes() -> int:
  """High-water RSS of this process since it started (``ru_maxrss``)."""
  r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return int(r) * (1 if sys.platform == "darwin" else 1024)


class RssSampler:
  """Samples the process RSS in a background thread (the heavy work runs in C++ without the GIL):
  ``with RssSampler() as s: step()`` then ``s.peak`` is the peak RSS during the block, which
  ``ru_maxrss`` cannot give once compilation has set a higher mark."""

  def __init__(self, interval_s: float = 0.005):
    self.interval_s, self.peak, self._stop = interval_s, 0, threading.Event()
    self._thread = threading.Thread(target=self._run, daemon=True)

  def _run(self):
    while not self._stop.is_set():
      self.peak = max(self.peak, rss_bytes())
      time.sleep(self.interval_s)

  def __enter__(self):
    self.peak = rss_bytes()
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak = max(self.peak, rss_bytes())


def timed(fn: Callable[[], Any], repeats: int, warmup: int, sync: Callable[[Any], Any]
          ) -> tuple[list[float], int, Any]:
  """Runs ``fn`` ``warmup`` then ``repeats`` times; returns (seconds per repeat, peak RSS during
  the repeats, last result)."""
  out = None
  for _ in range(warmup):
    out = sync(fn())
  times = []
  with RssSampler() as sampler:
    for _ in range(max(repeats, 1)):
      t0 = time.perf_counter()
      out = sync(fn())
      times.append(time.perf_counter() - t0)
  return times, sampler.peak, out


# ============================================================================ data


def make_batch(batch: int, size: int, seed: int = 0):
  """Deterministic images in [0,1] (B,S,S,3) and binary ellipse masks (B,S,S), float32 numpy."""
  import numpy as np  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:size, 0:size] / max(size - 1, 1)
  images = np.empty((batch, size, size, 3), np.float32)
  masks = np.empty((batch, size, size), np.float32)
  for i in range(batch):
    cy, cx = rng.uniform(0.3, 0.7, 2)
    ry, rx = rng.uniform(0.1, 0.3, 2)
    m = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1.0
    masks[i] = m
    base = rng.uniform(0.2, 0.8, 3)
    images[i] = np.clip(base + 0.3 * m[..., None] + 0.1 * rng.standard_normal((size, size, 3)), 0, 1)
  return images, masks


# ============================================================================ shared weights


def sd_config(quick: bool):
  from gms_jax.models.sd_vae import AutoencoderKLConfig  # pylint: disable=import-outside-toplevel
  return AutoencoderKLConfig.tiny() if quick else AutoencoderKLConfig.sd()


def diffusers_vae(cfg):
  """An (untrained-init) diffusers ``AutoencoderKL`` of ``cfg``'s architecture."""
  import diffusers  # pylint: disable=import-outside-toplevel
  n = len(cfg.block_out_channels)
  return diffusers.AutoencoderKL(
      in_channels=cfg.in_channels, out_channels=cfg.out_channels,
      down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
      block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
      latent_channels=cfg.latent_channels, norm_num_groups=cfg.norm_num_groups,
      scaling_factor=cfg.scaling_factor)


def prepare_weights(args, cache: str, tokenizers: Sequence[str]) -> dict[str, dict[str, Any]]:
  """Builds each tokenizer and a mapper once, writes torch state dicts and converted Flax files.

  Returns ``{tokenizer: {"torch_tok", "torch_mapper", "flax_tok", "flax_mapper", "tok_cfg",
  "mapper_cfg", "latent_channels", "downsample", "weights"}}`` (paths and plain data).
  """
  import numpy as np  # pylint: disable=import-outside-toplevel
  import torch  # pylint: disable=import-outside-toplevel
  from gms_jax.testing import torch_refs  # pylint: disable=import-outside-toplevel
  from gms_jax.convert import core  # pylint: disable=import-outside-toplevel
  from gms_jax.convert import mapper as mapper_conv  # pylint: disable=import-outside-toplevel
  from gms_jax.models.latent_mapper import MapperConfig  # pylint: disable=import-outside-toplevel

  os.makedirs(cache, exist_ok=True)
  out = {}
  for name in tokenizers:
    rec: dict[str, Any] = {}
    if name == "sd-vae":
      from gms_jax.convert import sd_vae as sd_conv  # pylint: disable=import-outside-toplevel
      if args.sd_vae:
        import diffusers  # pylint: disable=import-outside-toplevel
        flat, cfg = sd_conv.load_diffusers(args.sd_vae)
        vae = diffusers.AutoencoderKL.from_pretrained(args.sd_vae)  # needs a diffusers folder
        rec["weights"] = f"real ({args.sd_vae})"
      else:
        cfg = sd_config(args.quick)
        torch.manual_seed(args.seed)
        vae = diffusers_vae(cfg)
        flat = sd_conv.convert_state_dict(vae.state_dict(), cfg, source="random diffusers VAE")
        rec["weights"] = "random init (diffusers AutoencoderKL defaults)"
      torch_sd = {k: v.detach().clone() for k, v in vae.state_dict().items()}
      family, lat_ch, down = "sd-vae", cfg.latent_channels, cfg.downsample_factor
      rec["tok_cfg"] = cfg.to_dict()
    else:
      from gms_jax.convert import tae as tae_conv  # pylint: disable=import-outside-toplevel
      from gms_jax.models.tae import TAEConfig  # pylint: disable=import-outside-toplevel
      folder = args.taef2
      if folder and os.path.isdir(folder):
        enc_p, dec_p = tae_conv.find_pair(folder)
        sd = tae_conv.read_pair(enc_p, dec_p)
        cfg = tae_conv.infer_config(sd, source=folder)
        torch_sd = {k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}
        rec["weights"] = f"real ({folder})"
      else:
        cfg = TAEConfig.taef2()
        torch.manual_seed(args.seed)
        enc = torch_refs.tae_encoder(cfg.latent_channels, cfg.midblock_gn)
        dec = torch_refs.tae_decoder(cfg.latent_channels, cfg.midblock_gn)
        torch_sd = {**{f"encoder.{k}": v for k, v in enc.state_dict().items()},
                    **{f"decoder.{k}": v for k, v in dec.state_dict().items()}}
        sd = {k: v.numpy() for k, v in torch_sd.items()}
        rec["weights"] = "random init (TAEF2 weights not found)"
      flat = tae_conv.convert_state_dict(sd, cfg, source="taef2")
      family, lat_ch, down = "tae", cfg.latent_channels, 8
      rec["tok_cfg"] = cfg.to_dict()

    torch.manual_seed(args.seed + 1)
    tmapper = torch_refs.ResAttnUNet_DS(in_channel=lat_ch, out_channels=lat_ch)
    mcfg = MapperConfig(in_channels=lat_ch, out_channels=lat_ch)
    mflat = mapper_conv.convert_state_dict(
        {k: v.detach().numpy() for k, v in tmapper.state_dict().items()}, mcfg, source="mapper")

    paths = {k: os.path.join(cache, f"{name}.{k}") for k in
             ("torch_tok.pt", "torch_mapper.pt", "flax_tok.safetensors", "flax_mapper.safetensors")}
    torch.save(torch_sd, paths["torch_tok.pt"])
    torch.save(tmapper.state_dict(), paths["torch_mapper.pt"])
    core.save_params(paths["flax_tok.safetensors"], flat, family=family, config=rec["tok_cfg"])
    core.save_params(paths["flax_mapper.safetensors"], mflat, family="mapper", config=mcfg.to_dict())
    rec.update(torch_tok=paths["torch_tok.pt"], torch_mapper=paths["torch_mapper.pt"],
               flax_tok=paths["flax_tok.safetensors"], flax_mapper=paths["flax_mapper.safetensors"],
               family=family, mapper_cfg=mcfg.to_dict(), latent_channels=lat_ch, downsample=down)
    out[name] = rec
  return out


# ============================================================================ JAX side


def product_config(size: int, dtype: str):
  """The trainer's default config (``configs/gms.py``, SPEC §3 numbers) at ``size``², ``dtype``."""
  import importlib.util  # pylint: disable=import-outside-toplevel
  mod_spec = importlib.util.spec_from_file_location("gms_bench_config",
                                                    REPO / "configs" / "gms.py")
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  config = mod.get_config("sample")
  config.data.image_size = size
  config.precision = dtype
  return config


def jax_backend() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  d = jax.devices()[0]
  return {"platform": d.platform, "device_kind": d.device_kind, "device_count": jax.device_count()}


def jax_dtype(name: str):
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  return None if name == "float32" else jnp.bfloat16


def jax_load(spec: dict[str, Any], *, remat: bool = False):
  """Tokenizer and mapper ``(tok, mapper_graphdef, mapper_params)`` from the converted files."""
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from gms_jax import tokenizers  # pylint: disable=import-outside-toplevel
  from gms_jax.convert import core  # pylint: disable=import-outside-toplevel
  from gms_jax.models.latent_mapper import MapperConfig, ResAttnUNet_DS  # pylint: disable=import-outside-toplevel
  dtype = jax_dtype(spec["dtype"])
  tok = tokenizers.load(spec["family"], spec["flax_tok"], dtype=dtype, remat_decoder=remat)
  flat, _, mcfg = core.load_params(spec["flax_mapper"])
  mapper = nnx.eval_shape(lambda: ResAttnUNet_DS(MapperConfig.from_dict(mcfg), rngs=nnx.Rngs(0),
                                                 dtype=dtype))
  core.apply_flat(mapper, flat, source=spec["flax_mapper"])
  graphdef, params = nnx.split(mapper, nnx.Param)
  return tok, graphdef, params


def cost_flops(compiled) -> float | None:
  """FLOPs of a compiled XLA executable from its cost analysis (None if unavailable)."""
  try:
    ca = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(ca, (list, tuple)):
    ca = ca[0] if ca else None
  if not ca:
    return None
  f = ca.get("flops")
  return float(f) if f is not None and f > 0 else None


def memory_analysis(compiled) -> dict[str, int]:
  """XLA's static buffer assignment for a compiled executable: ``temp_size_in_bytes`` is the
  scratch (activations kept for the backward pass, workspaces) the step needs besides its
  arguments and outputs."""
  try:
    ma = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except
    return {}
  if ma is None:
    return {}
  keys = ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes",
          "alias_size_in_bytes", "generated_code_size_in_bytes")
  return {k: int(getattr(ma, k)) for k in keys if getattr(ma, k, None) is not None}


def jax_memory_stats() -> dict[str, Any]:
  import jax  # pylint: disable=import-outside-toplevel
  try:
    ms = jax.devices()[0].memory_stats() or {}
  except Exception:  # pylint: disable=broad-except
    ms = {}
  keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: int(ms[k]) for k in keep if k in ms}


# ============================================================================ PyTorch side


def torch_setup(threads: int):
  import torch  # pylint: disable=import-outside-toplevel
  torch.set_num_threads(max(1, threads))
  dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
  return torch, dev


def torch_load(spec: dict[str, Any], dev):
  """``(encode, decode_raw, mapper)`` as PyTorch callables on ``dev`` with the shared weights.

  ``encode(x01 NCHW) -> (z scaled, std unscaled)``; ``decode_raw(z scaled) -> NCHW`` in the
  family's own range (SD about [-1,1], TAE about [0,1]).  Frozen modules have requires_grad=False.
  """
  import torch  # pylint: disable=import-outside-toplevel
  from gms_jax.testing import torch_refs  # pylint: disable=import-outside-toplevel
  sd = torch.load(spec["torch_tok"], map_location="cpu", weights_only=True)
  if spec["family"] == "sd-vae":
    from gms_jax.models.sd_vae import AutoencoderKLConfig  # pylint: disable=import-outside-toplevel
    vae = diffusers_vae(AutoencoderKLConfig.from_dict(spec["tok_cfg"]))
    vae.load_state_dict(sd)
    vae.requires_grad_(False)
    vae.eval().to(dev)
    scale = float(spec["tok_cfg"].get("scaling_factor", SD_SCALE))

    def encode(x01):
      post = vae.encode(2.0 * x01 - 1.0).latent_dist
      return scale * post.mean, post.std

    def decode_raw(z):
      return vae.decode(z / scale).sample

    modules = [vae]
  else:
    c = spec["tok_cfg"]
    enc = torch_refs.tae_encoder(c["latent_channels"], c["midblock_gn"])
    dec = torch_refs.tae_decoder(c["latent_channels"], c["midblock_gn"])
    enc.load_state_dict({k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")})
    dec.load_state_dict({k[len("decoder."):]: v for k, v in sd.items() if k.startswith("decoder.")})
    for m in (enc, dec):
      m.requires_grad_(False)
      m.eval().to(dev)

    def encode(x01):
      z = enc(x01)
      return z, torch.zeros_like(z)

    decode_raw = dec
    modules = [enc, dec]
  mapper = torch_refs.ResAttnUNet_DS(in_channel=spec["latent_channels"],
                                     out_channels=spec["latent_channels"])
  mapper.load_state_dict(torch.load(spec["torch_mapper"], map_location="cpu", weights_only=True))
  mapper.to(dev)
  return encode, decode_raw, mapper, modules


class TorchWorker(NamedTuple):
  """What every PyTorch worker starts from (``torch_worker_setup``)."""
  torch: Any
  dev: Any
  family: str
  encode: Callable
  decode_raw: Callable
  mapper: Any
  rec: dict[str, Any]  # the record's common fields: threads, device, impl, RSS after setup


def torch_worker_setup(job: dict[str, Any]) -> TorchWorker:
  """Threads, device, the shared weights (``torch_load``) and the record's common fields."""
  torch, dev = torch_setup(job["threads"])
  family = job["spec"]["family"]
  encode, decode_raw, mapper, _ = torch_load(job["spec"], dev)
  rec = {"threads": torch.get_num_threads(), "interop_threads": torch.get_num_interop_threads(),
         "device": str(dev), "rss_after_setup_bytes": rss_bytes(),
         "impl": "diffusers AutoencoderKL" if family == "sd-vae" else "torch_refs TAE"}
  return TorchWorker(torch, dev, family, encode, decode_raw, mapper, rec)


def torch_images(images, dev):
  """NHWC float numpy images -> a contiguous NCHW tensor on ``dev``."""
  import torch  # pylint: disable=import-outside-toplevel
  return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous().to(dev)


def torch_decode_mask(family: str, decode_raw, z):
  """SPEC §3 ``decode``: decoder -> mean over RGB -> (x+1)/2 for SD -> clamp [0,1]; (B,H,W)."""
  g = decode_raw(z).float().mean(dim=1)
  if family == "sd-vae":
    g = (g + 1.0) / 2.0
  return g.clamp(0.0, 1.0)


def torch_dice(pred, target, smooth=1e-5):
  """MONAI ``DiceLoss()`` defaults on (B,H,W) maps: per sample, then mean over the batch."""
  dims = tuple(range(1, pred.ndim))
  inter = (pred * target).sum(dims)
  denom = pred.sum(dims) + target.sum(dims)
  return (1.0 - (2.0 * inter + smooth) / (denom + smooth)).mean()


def torch_sync(dev):
  import torch  # pylint: disable=import-outside-toplevel
  if dev.type == "cuda":
    torch.cuda.synchronize()


def torch_memory_stats(dev) -> dict[str, Any]:
  import torch  # pylint: disable=import-outside-toplevel
  if dev.type != "cuda":
    return {}
  return {"peak_bytes_in_use": int(torch.cuda.max_memory_allocated()),
          "peak_bytes_reserved": int(torch.cuda.max_memory_reserved())}


# ============================================================================ driver helpers


def run_worker(script: str, job: dict[str, Any], *, timeout_s: float | None = None) -> dict[str, Any]:
  """Runs ``python script --worker JOB`` in a fresh process; returns its JSON record (or an error
  record with the exit status and the tail of stderr, e.g. when the kernel killed it for memory)."""
  fd, result_path = tempfile.mkstemp(prefix="gms_bench_", suffix=".json")
  os.close(fd)
  job = dict(job, result_path=result_path)
  env = dict(os.environ)
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if job.get("quick"):  # smoke runs: skip LLVM optimisation (halves XLA:CPU compile time)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()
  t0 = time.perf_counter()
  try:
    proc = subprocess.run([sys.executable, script, "--worker", json.dumps(job)], env=env,
                          capture_output=True, text=True, timeout=timeout_s, check=False)
    rc, err = proc.returncode, proc.stderr
  except subprocess.TimeoutExpired as e:
    rc, err = "timeout", (e.stderr or b"").decode(errors="replace") if isinstance(e.stderr, bytes) \
        else (e.stderr or "")
  wall = time.perf_counter() - t0
  try:
    with open(result_path, encoding="utf-8") as f:
      rec = json.load(f)
  except (OSError, ValueError):
    rec = None
  finally:
    if os.path.exists(result_path):
      os.remove(result_path)
  if rec is None:
    hint = " (killed: out of memory?)" if rc in (-9, 137) else ""
    rec = {k: job.get(k) for k in ("framework", "tokenizer", "variant", "batch", "size")}
    rec["error"] = f"worker exit status {rc}{hint}: " + "\n".join(err.strip().splitlines()[-8:])
  rec["worker_wall_s"] = wall
  return rec


def finish_record(rec: dict[str, Any], step_peak_rss: int, dev=None) -> dict[str, Any]:
  """Adds the memory fields every worker ends with: the RSS peak sampled during the timed calls,
  the process's lifetime peak RSS, and device memory (JAX's allocator stats, or CUDA's for a torch
  ``dev``)."""
  rec.update(step_peak_rss_bytes=step_peak_rss, ru_maxrss_bytes=peak_rss_bytes(),
             device_memory=jax_memory_stats() if dev is None else torch_memory_stats(dev))
  return rec


def pool_rounds(recs: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """One record from the same variant's workers in several rounds (``--rounds``): the timed
  repeats pooled (stats recomputed), each round's median kept, peak RSS the highest; the first
  failed round's record if any failed."""
  failed = [r for r in recs if "error" in r]
  if failed:
    return failed[0]
  rec = dict(recs[0])
  if len(recs) == 1 or "times_s" not in rec:
    return rec
  times = [t for r in recs for t in r["times_s"]]
  rec.update(stats(times), times_s=times, rounds=len(recs),
             round_medians_s=[r["median_s"] for r in recs],
             step_peak_rss_bytes=max(r["step_peak_rss_bytes"] for r in recs),
             ru_maxrss_bytes=max(r.get("ru_maxrss_bytes") or 0 for r in recs),
             worker_wall_s=sum(r.get("worker_wall_s") or 0.0 for r in recs))
  return rec


def worker_main(args, jax_worker: Callable, torch_worker: Callable) -> int:
  """The ``--worker JOB`` entry point of a benchmark script: run the job, write its record."""
  job = json.loads(args.worker)
  rec = (jax_worker if job["framework"] == "jax" else torch_worker)(job)
  write_worker_result(job, rec)
  return 0


def write_worker_result(job: dict[str, Any], rec: dict[str, Any]) -> None:
  base = {k: job.get(k) for k in ("framework", "tokenizer", "variant", "batch", "size", "dtype")}
  base["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "")
  with open(job["result_path"], "w", encoding="utf-8") as f:
    json.dump({**base, **rec}, f, indent=1, default=str)


def results_path(args, name: str) -> str:
  return args.out or str(REPO / "benchmarks" / "results" / f"{name}.json")


def write_results(path: str, payload: dict[str, Any]) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(payload, f, indent=1, default=str)
  print(f"\nwrote {path}")


def fmt(x, spec: str = ".3g", none: str = "-") -> str:
  if x is None:
    return none
  if isinstance(x, str):
    return x
  return format(x, spec)


def print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
  """A GitHub-markdown table (also readable in a terminal); returns the text it printed."""
  cells = [[str(c) for c in r] for r in rows]
  widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
  line = lambda r: "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"
  text = "\n".join([line(headers), "|" + "|".join("-" * (w + 2) for w in widths) + "|"]
                   + [line(r) for r in cells])
  print(text)
  return text


def cache_dir(args) -> tuple[str, Any]:
  """The weights cache folder and a cleanup handle (a TemporaryDirectory, or None if given)."""
  if args.cache:
    return args.cache, None
  tmp = tempfile.TemporaryDirectory(prefix="gms_bench_")
  return tmp.name, tmp


def gib(b) -> float | None:
  return None if b is None else b / 2**30
