"""`flashdiff sample | demo | train`: generate digits from the shipped checkpoints.

    flashdiff sample --model digits-unet --sampler ddim --steps 50 --guidance 3 \\
                     --labels 0,1,2,3,4,5,6,7,8,9 --num-per-label 4 --seed 0 \\
                     --backend auto --out samples.npz --grid grid.png
    torchrun --nproc-per-node 4 -m flashdiff sample --model digits-dit --parallel ulysses=2,cfg=2
                              # the same samples on 4 ranks (rank 0 writes them)
    flashdiff demo            # all ten digits, fused vs reference: times, agreement, grid.png
    flashdiff train --model digits-unet        # rebuild a shipped checkpoint
"""
from __future__ import annotations

import argparse
import math
import os

BACKEND_CHOICES = ("auto", "reference", "cpu", "triton", "cuda")
PARALLEL_DEGREES = ("ulysses", "ring", "cfg")  # flashdiff.distributed.parallelize's arguments
TORCHRUN_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def _device(name):
    import torch

    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _labels(text):
    try:
        labels = [int(v) for v in text.split(",") if v.strip() != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"--labels must be comma-separated digits, got {text!r}") from None
    if not labels or any(not 0 <= v <= 9 for v in labels):
        raise argparse.ArgumentTypeError(f"--labels must be digits 0..9, got {text!r}")
    return labels


def _parallel(text):
    """--parallel "ulysses=2,ring=2,cfg=2" -> {"ulysses": 2, "ring": 2, "cfg": 2} (missing ones are 1)."""
    plan = {}
    for item in (p.strip() for p in text.split(",")):
        name, eq, value = item.partition("=")
        if not eq or name.strip() not in PARALLEL_DEGREES or name.strip() in plan:
            raise argparse.ArgumentTypeError(f"--parallel takes {'=N,'.join(PARALLEL_DEGREES)}=N (each at most once), "
                                             f"got {text!r}")
        try:
            plan[name.strip()] = int(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"--parallel: {name.strip()} must be an integer, got {value!r}") from None
        if plan[name.strip()] < 1:
            raise argparse.ArgumentTypeError(f"--parallel: {name.strip()} must be >= 1, got {value!r}")
    return plan


def _check_parallel(args):
    """Refuse a --parallel run before any process group exists (every rank refuses alike, so
    none is left waiting for the others)."""
    plan = args.parallel
    missing = [v for v in TORCHRUN_ENV if v not in os.environ]
    if missing:
        raise SystemExit(f"--parallel runs one process per rank under torchrun, e.g. `torchrun --nproc-per-node "
                         f"{math.prod(plan.values())} -m flashdiff sample --parallel ...`; "
                         f"{', '.join(missing)} not set")
    world = int(os.environ["WORLD_SIZE"])
    if math.prod(plan.values()) != world:
        shown = " x ".join(f"{k}={plan.get(k, 1)}" for k in PARALLEL_DEGREES)
        raise SystemExit(f"--parallel {shown} needs {math.prod(plan.values())} ranks, but torchrun started "
                         f"{world} (WORLD_SIZE): the degrees must multiply to the world size")
    if args.model != "digits-dit":
        raise SystemExit("--parallel needs a DiT (--model digits-dit): sequence parallelism splits its tokens")
    if plan.get("cfg", 1) > 1 and args.guidance == 1.0:
        raise SystemExit("--parallel cfg=N splits the cond | uncond batch of guidance: it needs --guidance != 1")
    if args.cuda_graph:
        raise SystemExit("--cuda-graph and --parallel do not combine (the loop holds collectives)")


def _init_distributed(device_name, timeout_s):
    """One process group over torchrun's ranks: NCCL on this rank's GPU, gloo on a CPU. Returns
    the rank's device."""
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    local = int(os.environ["LOCAL_RANK"])
    device = _device(device_name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local)  # one GPU per rank
    if device.type == "cuda":
        torch.cuda.set_device(device)
    # the timeout bounds how long a rank waits for a peer that died mid-collective
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    return device


def _generate(model_name, sampler, steps, guidance, labels, seed, backend, device, cuda_graph=False, eta=0.0,
              parallel=None):
    """(images (N, H, W) in [0, 1], seconds) for one backend; with `parallel` ({"ulysses": 2, ...})
    the DiT runs on the default process group's ranks (flashdiff.distributed.parallelize) and
    every rank returns the same images."""
    import torch

    from ..models import load_pretrained
    from ..sampling import make_scheduler, sample, timed, to_images

    be = None if backend == "auto" else backend
    model = load_pretrained(model_name, backend=be, device=device)
    sched = make_scheduler(sampler, backend=be, model=model)
    if parallel:
        from ..distributed import parallelize

        model = parallelize(model, **parallel)
    gen = torch.Generator().manual_seed(seed)  # CPU generator: the same noise on every device
    x, seconds = timed(sample, model, sched, torch.tensor(labels), steps, guidance, generator=gen,
                       device=device, eta=eta, cuda_graph=cuda_graph)
    return to_images(x), seconds


# ------------------------------------------------------------------ sample
def add_sample_parser(subparsers):
    p = subparsers.add_parser("sample", help="generate digits from a shipped checkpoint",
                              description="Generate class-conditional digits; writes an .npz "
                                          "(images (N, H, W) in [0, 1], labels (N,)) and a PNG grid.")
    p.add_argument("--model", default="digits-unet", choices=["digits-unet", "digits-dit"])
    p.add_argument("--sampler", default="ddim", choices=["ddim", "ddpm", "euler", "dpmpp"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0, help="classifier-free guidance scale (1 = none)")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    p.add_argument("--labels", type=_labels, default=list(range(10)), help="comma-separated digits")
    p.add_argument("--num-per-label", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backend", default="auto", choices=BACKEND_CHOICES)
    p.add_argument("--device", default=None, help="cpu | cuda[:i] (default: cuda when available)")
    p.add_argument("--cuda-graph", action="store_true", help="capture the loop as one CUDA graph (CUDA only)")
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = auto, see sampling.pick_threads)")
    p.add_argument("--out", default="samples.npz")
    p.add_argument("--grid", default="grid.png", help="PNG grid path ('' = none)")
    p.add_argument("--parallel", type=_parallel, default=None, metavar="ulysses=N,ring=N,cfg=N",
                   help="sample on several ranks under torchrun (digits-dit): the degrees multiply to the "
                        "world size; NCCL on GPUs, gloo on CPUs; the same samples as one process, written "
                        "by rank 0")
    p.add_argument("--dist-timeout", type=float, default=300.0, metavar="S",
                   help="with --parallel: seconds a rank waits for its peers before giving up (default 300)")
    p.set_defaults(func=sample_command)
    return p


def sample_command(args) -> int:
    import numpy as np

    from ..sampling import pick_threads, save_grid

    pick_threads(args.threads)
    if args.steps < 1 or args.num_per_label < 1:
        raise SystemExit("--steps and --num-per-label must be >= 1")
    labels = [v for v in args.labels for _ in range(args.num_per_label)]
    plan = getattr(args, "parallel", None)
    if plan:
        _check_parallel(args)
        device = _init_distributed(args.device, args.dist_timeout)
    else:
        device = _device(args.device)
    images, seconds = _generate(args.model, args.sampler, args.steps, args.guidance, labels, args.seed,
                                args.backend, device, args.cuda_graph, args.eta, parallel=plan)
    if plan:
        import torch.distributed as dist

        # not in a `finally`: after a failure, destroy would wait for peers that may be gone
        rank = dist.get_rank()
        # every rank past its last collective before any tears down: a gloo rank destroying its
        # groups while a peer's transport threads still talk to it aborted ("terminate called
        # without an active exception", seen once in CI)
        dist.barrier()
        dist.destroy_process_group()
        if rank != 0:  # every rank holds the same images: rank 0 alone writes them
            return 0
    np.savez(args.out, images=images.numpy().astype(np.float32), labels=np.array(labels, dtype=np.int64))
    if args.grid:
        save_grid(images, args.grid, nrow=args.num_per_label if len(args.labels) > 1 else 10)
    ranks = f", {math.prod(plan.values())} ranks ({','.join(f'{k}={v}' for k, v in plan.items())})" if plan else ""
    print(f"{len(labels)} samples ({args.model}, {args.sampler}, {args.steps} steps, guidance {args.guidance}, "
          f"backend {args.backend}{ranks}) in {seconds:.2f}s -> {args.out}" + (f", {args.grid}" if args.grid else ""))
    return 0


# ------------------------------------------------------------------ demo
def add_demo_parser(subparsers):
    p = subparsers.add_parser("demo", help="all ten digits, fused path vs reference path: times, agreement, grid.png")
    p.add_argument("--model", default="digits-unet", choices=["digits-unet", "digits-dit"])
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--guidance", type=float, default=3.0)
    p.add_argument("--num-per-label", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--threads", type=int, default=0, help="CPU threads (0 = auto, see sampling.pick_threads)")
    p.add_argument("--grid", default="grid.png")
    p.set_defaults(func=demo_command)
    return p


def demo_command(args) -> int:
    import torch

    from ..sampling import pick_threads, save_grid
    from ..train import digit_classifier

    pick_threads(args.threads)
    device = _device(args.device)
    labels = [d for d in range(10) for _ in range(args.num_per_label)]
    print(f"flashdiff demo: {args.model}, DDIM {args.steps} steps, guidance {args.guidance}, "
          f"{len(labels)} digits on {device}")
    fused, t_fused = _generate(args.model, "ddim", args.steps, args.guidance, labels, args.seed, "auto", device)
    ref, t_ref = _generate(args.model, "ddim", args.steps, args.guidance, labels, args.seed, "reference", device)
    diff = float((fused - ref).abs().max())
    clf = digit_classifier()
    target = torch.tensor(labels).numpy()
    acc_f = float((clf.predict(fused.reshape(len(labels), -1).numpy()) == target).mean())
    acc_r = float((clf.predict(ref.reshape(len(labels), -1).numpy()) == target).mean())
    print(f"  fused (auto):  {t_fused:6.2f}s   recognised {acc_f:.0%}")
    print(f"  reference:     {t_ref:6.2f}s   recognised {acc_r:.0%}")
    print(f"  speed-up {t_ref / t_fused:.2f}x; agreement: max |fused - reference| = {diff:.2e} (pixels in [0, 1])")
    grid = torch.cat([fused.reshape(10, args.num_per_label, *fused.shape[1:]),
                      ref.reshape(10, args.num_per_label, *ref.shape[1:])], dim=1)
    save_grid(grid.reshape(-1, *fused.shape[1:]), args.grid, nrow=2 * args.num_per_label)
    print(f"  wrote {args.grid} (each row one digit: fused | reference)")
    return 0


# ------------------------------------------------------------------ train
def add_train_parser(subparsers):
    from ..train import add_arguments, run

    p = subparsers.add_parser("train", help="train the digit checkpoints (or --eval: measure them)")
    add_arguments(p)
    p.set_defaults(func=run)
    return p
