"""End-to-end: 50-step DDIM + CFG sampling with the compact models of flashdiff.models
(DiT-S/2, DiT-B/2, UNet-S at 32×32×4 on a GPU; the 8×8 digit models on a CPU): eager
reference vs fused vs fused + CUDA graph (GPU) vs torch.compile of the reference.
extra_info["value"] is images/s. Skipped with the reason when a model is missing."""
OP = "e2e"


def test_sampling(bench_row):
    bench_row()
