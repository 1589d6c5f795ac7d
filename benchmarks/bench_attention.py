"""Attention forward: flashdiff backends vs F.scaled_dot_product_attention under each SDPA
backend that runs (flash, efficient, cudnn, math on a GPU; the default on a CPU).
Rate: TFLOP/s with forward FLOPs = 4·B·H·Sq·Skv·D; ceiling: the measured matmul rate."""
OP = "attention"


def test_attention(bench_row):
    bench_row()
