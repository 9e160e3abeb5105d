"""IAPT's learned activation: a safe Padé (rational) function, R(x) = P(x) / (1 + |Q(x)|), elementwise,
P of order 6 (a_0..a_6), Q of order 5 without a constant (b_1..b_5) (Molina et al., 2019; MiLoRA §3.4).

GELU_NUMERATOR / GELU_DENOMINATOR start R at GELU (the exact, erf form). They were fitted once, in float64, by
nonlinear least squares on 2,001 evenly spaced points of [-3, 3] (scipy.optimize.least_squares, started from the
linearised problem P(x) - GELU(x) Q(x) = GELU(x), then re-weighted towards the largest errors). Maximum error on
[-3, 3]: 4.4e-5 (the test re-checks it). The fit makes Q practically even and non-negative, so the denominator
never falls below 1. Outside [-3, 3] R grows like 0.056 x^2: the spec's "approximate GELU" holds on the fitted
range only, as for every Padé activation.
"""

from __future__ import annotations

import torch
from torch import nn

NUMERATOR_ORDER, DENOMINATOR_ORDER = 6, 5

GELU_NUMERATOR = (4.4220199347977057e-05, 4.9999999963515135e-01, 3.9829821416735983e-01, 1.7069964978617075e-01,
                  7.1139149111100544e-02, 2.0268390564730343e-02, 2.2738612789596994e-03)
GELU_DENOMINATOR = (1.7894833303097556e-07, 3.4139915416090316e-01, 2.9809435954147876e-08, 4.0536783803997334e-02,
                    -1.0188814075467121e-09)


def rational(x: torch.Tensor, numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    """P(x) / (1 + |Q(x)|), by Horner's rule, in float32 at least (x^6 overflows half precision early)."""
    dtype = torch.promote_types(x.dtype, torch.float32)
    x, a, b = x.to(dtype), numerator.to(dtype), denominator.to(dtype)
    p = a[-1].expand_as(x)
    for coef in a.flip(0)[1:]:
        p = p * x + coef
    q = b[-1].expand_as(x)
    for coef in b.flip(0)[1:]:
        q = q * x + coef
    return p / (1 + (q * x).abs())


class RationalActivation(nn.Module):
    """One layer's activation: 7 numerator + 5 denominator coefficients (the bi-level 'architecture' Θ)."""

    def __init__(self):
        super().__init__()
        self.numerator = nn.Parameter(torch.tensor(GELU_NUMERATOR, dtype=torch.float32))
        self.denominator = nn.Parameter(torch.tensor(GELU_DENOMINATOR, dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rational(x, self.numerator, self.denominator)
