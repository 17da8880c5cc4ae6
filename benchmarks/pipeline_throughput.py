"""Input-pipeline throughput: images/s of augmented training batches (grain + albumentations).

    python benchmarks/pipeline_throughput.py                       # sample, batch 8, 224², workers 0 and 2
    python benchmarks/pipeline_throughput.py --dataset busi --root /path/to/busi
    python benchmarks/pipeline_throughput.py --quick --out /tmp/pipe.json   # CI smoke (seconds)

For each worker count it builds the pipeline, pulls ``--warmup`` batches (worker start-up, page
cache), then times ``--batches`` batches. ``first_batch_s`` is the time to the first batch
(includes starting worker processes). Prints a table and writes it with the machine description
to ``--out`` (default ``benchmarks/results/pipeline_throughput.json``).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common as C

NAME = "pipeline_throughput"


def _run(source, *, workers, read_threads, batch, size, warmup, batches, seed):
  from gms_jax.data import pipeline

  ds = pipeline.train_dataset(
    source,
    global_batch_size=batch,
    image_size=size,
    seed=seed,
    augment=True,
    process_index=0,
    process_count=1,
    worker_count=workers,
    prefetch_buffer=2,
    read_threads=read_threads,
  )
  t0 = time.perf_counter()
  it = iter(ds)
  next(it)
  first = time.perf_counter() - t0
  for _ in range(warmup):
    next(it)
  t1 = time.perf_counter()
  for _ in range(batches):
    b = next(it)
  elapsed = time.perf_counter() - t1
  assert b["image"].shape == (batch, size, size, 3)
  if hasattr(it, "close"):
    it.close()
  return {
    "workers": workers,
    "read_threads": read_threads,
    "batch": batch,
    "image_size": size,
    "batches": batches,
    "seconds": round(elapsed, 3),
    "images_per_s": round(batches * batch / elapsed, 1),
    "batches_per_s": round(batches / elapsed, 2),
    "first_batch_s": round(first, 2),
  }


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--dataset", default="sample")
  p.add_argument("--root", default="", help="dataset folder (default: the shipped sample)")
  p.add_argument("--tfds-dir", default="", help="default: a temporary directory")
  p.add_argument("--batch-size", type=int, default=8)
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--workers", default="0,2", help="comma-separated grain worker counts")
  p.add_argument("--read-threads", default="2", help="comma-separated threads per process")
  p.add_argument("--warmup", type=int, default=5)
  p.add_argument("--batches", type=int, default=100)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--quick", action="store_true", help="tiny run for CI: 64², 1+16 batches")
  p.add_argument("--out", default="", help="results JSON (default benchmarks/results/<name>.json)")
  args = p.parse_args(argv)
  machine = C.machine_info()
  if args.quick:
    args.image_size, args.warmup, args.batches = 64, 1, 16

  from gms_jax.data import builder

  with tempfile.TemporaryDirectory(prefix="gms_bench_tfds_") as tmp:
    t0 = time.perf_counter()
    sources = builder.prepare(
      {"name": args.dataset, "root": args.root, "tfds_dir": args.tfds_dir or tmp}
    )
    prepare_s = time.perf_counter() - t0
    train = sources["train"]
    rows = []
    for workers in [int(w) for w in args.workers.split(",") if w.strip()]:
      for threads in [int(t) for t in args.read_threads.split(",") if t.strip()]:
        rows.append(
          _run(
            train,
            workers=workers,
            read_threads=threads,
            batch=args.batch_size,
            size=args.image_size,
            warmup=args.warmup,
            batches=args.batches,
            seed=args.seed,
          )
        )
  print(
    f"# {NAME}: {args.dataset} train ({len(train)} examples), augmentation on, batch "
    f"{args.batch_size}, {args.image_size}x{args.image_size}; {machine['cpu']} "
    f"({machine['cpu_count']} cores); tfds prepare {prepare_s:.1f} s"
  )
  table = C.print_table(
    ["dataset", "workers", "read threads", "batch", "images/s", "batches/s", "first batch s"],
    [
      [
        args.dataset,
        r["workers"],
        r["read_threads"],
        f"{r['batch']}x{r['image_size']}²",
        r["images_per_s"],
        r["batches_per_s"],
        r["first_batch_s"],
      ]
      for r in rows
    ],
  )
  C.write_results(
    C.results_path(args, NAME),
    {
      "benchmark": NAME,
      "machine": machine,
      "args": {k: v for k, v in vars(args).items()},
      "records": [
        dict(r, dataset=args.dataset, train_examples=len(train), prepare_s=prepare_s) for r in rows
      ],
      "table_markdown": table,
    },
  )
  return 0


if __name__ == "__main__":
  sys.exit(main())
