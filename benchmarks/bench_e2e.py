"""End-to-end: 50-step DDIM + CFG sampling with the compact models of flashdiff.models
(DiT-S/2, DiT-B/2, UNet-S at 32×32×4 on a GPU; the 8×8 digit models on a CPU): eager
torch eager vs torch.compile vs flashdiff patch vs flashdiff patch+graph (GPU).
extra_info["value"] is images/s. Skipped with the reason when a model is missing."""
OP = "e2e"


def test_sampling(bench_row):
    bench_row()
