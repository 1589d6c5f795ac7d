"""`flashdiff sample | demo | train`: generate digits from the shipped checkpoints.

    flashdiff sample --model digits-unet --sampler ddim --steps 50 --guidance 3 \\
                     --labels 0,1,2,3,4,5,6,7,8,9 --num-per-label 4 --seed 0 \\
                     --backend auto --out samples.npz --grid grid.png
    flashdiff demo            # all ten digits, fused vs reference: times, agreement, grid.png
    flashdiff train --model digits-unet        # rebuild a shipped checkpoint
"""
from __future__ import annotations

import argparse

BACKEND_CHOICES = ("auto", "reference", "cpu", "triton", "cuda")


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


def _generate(model_name, sampler, steps, guidance, labels, seed, backend, device, cuda_graph=False, eta=0.0):
    """(images (N, H, W) in [0, 1], seconds) for one backend."""
    import torch

    from ..models import load_pretrained
    from ..sampling import make_scheduler, sample, timed, to_images

    be = None if backend == "auto" else backend
    model = load_pretrained(model_name, backend=be, device=device)
    sched = make_scheduler(sampler, backend=be, model=model)
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
    p.set_defaults(func=sample_command)
    return p


def sample_command(args) -> int:
    import numpy as np

    from ..sampling import pick_threads, save_grid

    pick_threads(args.threads)
    if args.steps < 1 or args.num_per_label < 1:
        raise SystemExit("--steps and --num-per-label must be >= 1")
    labels = [v for v in args.labels for _ in range(args.num_per_label)]
    images, seconds = _generate(args.model, args.sampler, args.steps, args.guidance, labels, args.seed,
                                args.backend, _device(args.device), args.cuda_graph, args.eta)
    np.savez(args.out, images=images.numpy().astype(np.float32), labels=np.array(labels, dtype=np.int64))
    if args.grid:
        save_grid(images, args.grid, nrow=args.num_per_label if len(args.labels) > 1 else 10)
    print(f"{len(labels)} samples ({args.model}, {args.sampler}, {args.steps} steps, guidance {args.guidance}, "
          f"backend {args.backend}) in {seconds:.2f}s -> {args.out}" + (f", {args.grid}" if args.grid else ""))
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
