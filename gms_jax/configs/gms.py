"""GMS training configs (the paper's defaults, docs/METHOD.md): ``gms-jax train --config ARG``
(the packaged configs) or ``--config configs/gms.py:ARG`` (from a checkout).

``ARG`` is a comma-separated list (big_vision style): the first item names the dataset, the rest
are modifiers applied in order::

    configs/gms.py:busi                  # BUSI, SD VAE (set --config.tokenizer.path and data.root)
    configs/gms.py:busi,taef2            # ... with the TAEF2 tiny autoencoder as the tokenizer
    configs/gms.py:ph2,bf16              # bfloat16 compute
    configs/gms.py:smoke                 # = sample,smoke: ~1 min on a 2-core CPU, shipped data

Datasets: ``sample`` (shipped in the package, ``data/sample`` in a checkout), ``busi``, ``bus-bra``, ``ph2``, ``drive``,
``chase_db1``, ``folder`` (any GMS-layout folder; set ``data.root``).
Modifiers: ``smoke``, ``taef2`` (alias ``tae``), ``sd-vae``, ``bf16``, ``stepwise`` (per-step LR),
``fast`` (the latent-bank recipe below),
``accel`` (TPU/GPU throughput: 8 images per chip, bfloat16, sqrt LR scaling; see
benchmarks/RESULTS.md "Compiled for accelerators").

Any key can be overridden on the command line: ``--config.batch_size=16``.

The ``fast`` recipe (``configs/gms.py:busi,taef2,fast``; ``gms_jax/recipes.py``, ``bank.py``)
---------------------------------------------------------------------------------------------
The default (``recipe = "exact"``) is docs/METHOD.md §3 and is not changed by anything below.
``fast`` takes the frozen tokenizer out of the inner loop: ``bank.num_views`` (K) augmented views
of every training pair are encoded once into a latent bank in the workdir (``gms_jax/bank.py``),
and the mapper trains on the stored latents. Every deviation from docs/METHOD.md §3 (listed
again in docs/METHOD.md §6.3):

1. Augmentation: the METHOD §3 transform (same code, same probabilities), but a finite sample of
   K views per training image drawn once (view k of image i from seed ``(bank.seed, i, k)``)
   instead of a fresh draw every epoch; epoch e shows each image once, as one of its K views,
   each view once per K epochs.
2. Loss: phase 1 is the latent term only, ``sum_k MSE(out[k], z_mask)`` over the same heads
   (the Dice term and the decoder are left out); ``fast.dice_steps`` more steps (phase 2;
   0 = none) use the full METHOD §3 loss (latent MSE + Dice of the decoded heads against the
   view's stored full-resolution mask) at the constant LR ``fast.dice_learning_rate``. Latent
   noise is as in METHOD §3: ``z + std * eps`` with probability ``loss.noise_prob`` per batch,
   ``std`` the banked unscaled posterior std (0 for TAE models).
3. Schedule: ``num_epochs``, ``schedule.warmup_epochs`` and a per-step LR (``stepwise``) are set
   for a wall-clock budget, not the 1000 epochs of METHOD §3; AdamW and its hyper-parameters
   are those of METHOD §3.
4. Validation (model selection on the validation split, as in every recipe) runs every
   ``fast.eval_every_epochs`` epochs; validation images are encoded once (same values).
5. Optional (off by default): ``fast.ema_decay > 0`` keeps an exponential moving average of the
   mapper weights; it is what validation selects and what the checkpoints' ``params`` hold.
6. Optional (off by default): ``bank.intensity_augment = True`` adds image-only brightness /
   contrast (+-0.3 / +-0.4, p 0.8) and gamma (0.7-1.5, p 0.5) changes to the banked views
   (``gms_jax/data/augment.py`` ``INTENSITY_*``), aimed at other scanners; the bank manifest's
   ``augmentation`` names it, so a bank of the other kind is refused.
7. Optional (off by default): ``bank.scanner_augment = True`` adds image-only changes of the
   scanner's look after the resize: blur (sigma 0.3-1.2) or sharpening (p 0.4), elementwise
   multiplicative speckle 0.8-1.2 (p 0.4), a random tone curve (scale 0.2, p 0.4) and Gaussian
   noise (std 0.01-0.05, p 0.2) (``gms_jax/data/augment.py`` ``SCANNER_*``); the manifest names it.
"""

import ml_collections

DATASETS = ("sample", "busi", "bus-bra", "ph2", "drive", "chase_db1", "folder")
MODIFIERS = ("smoke", "taef2", "tae", "sd-vae", "bf16", "stepwise", "fast", "accel")


def _parse(arg):
  parts = [p.strip() for p in (arg or "sample").split(",") if p.strip()]
  if parts and parts[0] == "smoke":  # "smoke" alone means the shipped sample
    parts = ["sample"] + parts
  dataset, mods = parts[0], parts[1:]
  if dataset not in DATASETS:
    raise ValueError(f"unknown dataset {dataset!r} in config arg {arg!r}; one of {DATASETS}")
  bad = [m for m in mods if m not in MODIFIERS]
  if bad:
    raise ValueError(f"unknown modifier(s) {bad} in config arg {arg!r}; known: {MODIFIERS}")
  return dataset, mods


def get_config(arg="sample"):
  """Returns the config for ``arg`` (see the module docstring)."""
  dataset, mods = _parse(arg)
  c = ml_collections.ConfigDict()
  c.seed = 2333  # model init, latent noise and data order (docs/METHOD.md §3)

  # ---------------------------------------------------------------- data (gms_jax.data.builder)
  c.data = ml_collections.ConfigDict()
  c.data.name = dataset
  c.data.root = ""  # "" = data/sample for "sample"; required for every other dataset
  c.data.split_file = ""  # "" = the dataset's default (split.json / GMS pickle / seeded ratio)
  c.data.test_fraction = 0.2  # ratio split only
  c.data.val_fraction = 0.1  # validation is carved out of train; checkpoints are chosen on it
  c.data.split_seed = 2333
  c.data.image_size = 224  # docs/METHOD.md §3; latents are image_size / 8
  c.data.augment = True  # docs/METHOD.md §3 train-time augmentation
  # Classes (docs/METHOD.md §7): 0 = from the data (a folder whose dataset.json declares "labels"
  # is multi-class, any other is binary); a value > 0 must match the data (set it for `compile`).
  # Training writes the resolved number and the class names into the workdir's config.json.
  c.data.num_classes = 0
  c.data.class_names = ()
  c.data.tfds_dir = ""  # "" = ~/tensorflow_datasets
  c.data.worker_count = 0  # grain worker processes (0 = threads in the trainer process)
  c.data.prefetch_buffer = 2

  # ---------------------------------------------------------------- frozen tokenizer
  c.tokenizer = ml_collections.ConfigDict()
  c.tokenizer.name = "sd-vae"  # "sd-vae" (GMS) or "taef2"
  # sd-vae: your checkpoint (diffusers folder/.safetensors, LDM .ckpt, or `gms-jax convert` output).
  # taef2: "" = the packaged weights, or a folder with taef2_{encoder,decoder}.pth.
  # Or a Hugging Face id: hf:stabilityai/sd-vae-ft-mse, hf:REPO@REVISION/SUBFOLDER, hf:madebyollin/taesd.
  c.tokenizer.path = ""
  c.tokenizer.scaling_factor = 0.0  # sd-vae latent scale; 0 = the VAE's config.json, else 0.18215
  c.tokenizer.remat_decoder = False  # recompute decoder activations in the backward pass, per block

  # ---------------------------------------------------------------- latent mapper (METHOD §2)
  c.mapper = ml_collections.ConfigDict()
  c.mapper.ch = 32  # in/out channels come from the tokenizer's latent channels
  c.mapper.ch_mult = (1, 2, 4, 4)
  # "" = random init (METHOD §2); else start from these weights (fresh optimizer): an official
  # best_model.pth, a `gms-jax convert` output or a workdir. Recorded in the workdir metadata.
  c.mapper.init = ""

  # ---------------------------------------------------------------- loss (docs/METHOD.md §3)
  c.loss = ml_collections.ConfigDict()
  c.loss.rec_weight = 1.0  # latent MSE
  c.loss.dice_weight = 1.0  # MONAI Dice of the decoded mask
  c.loss.noise_prob = 0.5  # per batch: image latent += std * N(0, 1)
  c.loss.heads = ("level2", "level1", "out")
  # The heads' decodes: "auto" = one decoder call for all heads on GPU/TPU, one per head on CPU
  # (faster there); "true" / "false" force it. Same loss either way (tests/test_loss.py).
  c.loss.batch_decode = "auto"
  c.loss.batch_encode = "auto"  # images and masks: one encoder call on GPU/TPU, two on CPU

  # ---------------------------------------------------------------- optimisation (METHOD §3)
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 2e-3  # AdamW
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.01
  # Peak LR = learning_rate * (global batch / lr_base_batch) ** p, p = 0 ("none": as given),
  # 0.5 ("sqrt", the usual rule for Adam when the batch grows) or 1 ("linear").
  c.optimizer.lr_scaling = "none"
  c.optimizer.lr_base_batch = 8
  c.schedule = ml_collections.ConfigDict()
  c.schedule.warmup_epochs = 5  # linear from 0, then cosine to 0 at the last epoch
  c.schedule.per_epoch = True  # LR changes once per epoch (the original); False = every step

  c.batch_size = 8  # global, over all devices and hosts
  # > 0: global batch = this x the device count (pods, where 8 does not split over the chips);
  # the LR then follows optimizer.lr_scaling.
  c.per_device_batch_size = 0
  c.num_epochs = 1000
  c.num_train_steps = -1  # -1 = num_epochs * steps_per_epoch(train split)
  c.precision = "float32"  # compute dtype of mapper and tokenizer: "float32" or "bfloat16"
  c.recipe = "exact"  # "exact" (METHOD §3) or "fast" (latent bank; see the module docstring)
  # C > 2 classes only (docs/METHOD.md §7): "channels" = one mask latent per foreground class
  # (chosen by measurement, docs/results/multiclass.md); "palette" = the label map painted in
  # one colour per class, one latent, decoded to the nearest colour. Binary tasks ignore it.
  c.mask_coding = "channels"

  # ---------------------------------------------------------------- latent bank (recipe "fast")
  c.bank = ml_collections.ConfigDict()
  c.bank.dir = ""  # "" = WORKDIR/bank; another folder shares one bank between runs
  c.bank.num_views = 8  # K augmented views per training pair
  c.bank.seed = 2333  # view k of record i is drawn from (seed, i, k)
  c.bank.shard_size = 64  # records per shard (the unit of atomic writes and of resumption)
  c.bank.encode_batch_size = 8  # images (and masks) per encoder call while building
  # Not METHOD §3: stronger image-only brightness/contrast/gamma in the banked views, for other
  # scanners (gms_jax/data/augment.py INTENSITY_*); recorded in the bank manifest.
  c.bank.intensity_augment = False
  # Not METHOD §3: image-only blur/sharpen, speckle, tone curve and noise after the resize
  # (gms_jax/data/augment.py SCANNER_*); recorded in the bank manifest.
  c.bank.scanner_augment = False

  # ---------------------------------------------------------------- fast recipe
  c.fast = ml_collections.ConfigDict()
  c.fast.dice_steps = 0  # phase 2: N more steps with the decoder Dice term (the METHOD §3 loss)
  c.fast.dice_learning_rate = 2e-4  # constant LR of phase 2 (phase 1 ends at LR 0)
  c.fast.eval_every_epochs = 5  # validation when eval_every_steps <= 0
  # > 0: validate, select and save the EMA of the mapper weights (decay min(d, (1+s)/(10+s)))
  c.fast.ema_decay = 0.0

  # ---------------------------------------------------------------- logging / eval / checkpoints
  c.log_every_steps = 50
  c.eval_every_steps = -1  # validation Dice; -1 = once per epoch
  c.eval_batch_size = 8  # global; the last batch is padded
  c.checkpoint_every_steps = -1  # -1 = at every validation (checkpoints then carry val Dice)
  c.keep_checkpoints = 3  # the last k; the best by validation Dice is kept in addition

  # Persistent XLA compilation cache ("" = off): a restarted job reuses its compiled step.
  c.compilation_cache_dir = ""
  # CPU only, "" = XLA's defaults: ops XLA hands to its YNNPACK library fusions in every jit of
  # training (comma list of dot, reduce, eltwise, individual_dot, individual_convolution;
  # experimental in jaxlib 0.10.2). "dot,reduce": 1.4-1.6x faster banked steps and bank encodes
  # on a 2-core AVX2 host (benchmarks/cpu_fusion.py, docs/results/cpu_hosts.md). Ignored on GPU/TPU.
  c.cpu_library_fusion = ""

  # ---------------------------------------------------------------- multi-host (main() only)
  c.distributed = ml_collections.ConfigDict()
  c.distributed.initialize = False  # call jax.distributed.initialize() in main()
  c.distributed.coordinator_address = ""  # "" = auto-detect (TPU pods, SLURM, ...)
  c.distributed.num_processes = -1  # -1 = auto-detect
  c.distributed.process_id = -1  # -1 = auto-detect
  c.distributed.timeout_s = 300  # jax.distributed initialization timeout

  for m in mods:
    if m == "smoke":  # ~1 min on a 2-core CPU: 30 steps at 32x32 with the TAEF2 tokenizer
      c.data.image_size = 32
      c.tokenizer.name = "taef2"
      c.num_epochs = 10  # 3 steps per epoch on the 29 training images of the sample
      c.schedule.warmup_epochs = 1
      c.schedule.per_epoch = False
      c.log_every_steps = 5
      c.eval_every_steps = 15
      c.keep_checkpoints = 2
    elif m in ("taef2", "tae"):
      c.tokenizer.name = "taef2"
    elif m == "sd-vae":
      c.tokenizer.name = "sd-vae"
    elif m == "bf16":
      c.precision = "bfloat16"
    elif m == "stepwise":
      c.schedule.per_epoch = False
    elif m == "fast":  # the latent-bank recipe (deviations: see the module docstring)
      c.recipe = "fast"
      c.schedule.per_epoch = False
      c.bank.num_views = 4
      c.fast.dice_steps = 30
      if "smoke" not in mods:  # sized for ~150 min on BUSI at 224² on the 2-core CPU (a plan
        c.num_epochs = 95  # from measured pieces, docs/results/fast_recipe_sizing.md)
        c.schedule.warmup_epochs = 5
        c.log_every_steps = 100
    elif m == "accel":  # estimated best on v4-8 and H100 (benchmarks/RESULTS.md), fits both
      c.per_device_batch_size = 8  # the paper's 8 is 2 per v4-8 chip: ~4x the cost per image
      c.precision = "bfloat16"
      c.optimizer.lr_scaling = "sqrt"  # 2e-3 at the paper's batch 8 -> 4e-3 at 32 (v4-8)
  return c
