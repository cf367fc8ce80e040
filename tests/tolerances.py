"""Tolerances derived from floating-point error bounds (not guessed), shared by the kernel tests.

A kernel's statistic is compared with the float64 oracle; besides twice PyTorch's own error at the input
precision (flash-attention's rule), it may carry the error of accumulating n values in fp32. Higham's bound
for a recursive sum of n terms is |error| <= gamma_n * sum |x_i| with gamma_n = n u / (1 - n u), u = 2^-24
(fp32 unit roundoff); blocked/tree sums do better, so this bound holds for every summation order. Each term
also carries a few ulps of the elementwise arithmetic before it is summed (activation, shift, square).
"""
U_FP32 = 2.0 ** -24
ELEMENTWISE_ULPS = 4


def fp32_accumulation_rtol(n_terms: int) -> float:
    """Bound on |error| / (sum of |terms|) for an fp32 accumulation of ``n_terms`` values."""
    nu = max(int(n_terms), 1) * U_FP32
    return nu / (1.0 - nu) + ELEMENTWISE_ULPS * U_FP32
