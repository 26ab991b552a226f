"""The coefficient row of a step plan, shared by every backend.

One float32 row per step (or per step and sample) holds every scalar of the update
(DESIGN.md, "One step kernel, many methods")::

    e_i   = uncond_i + G*(cond_i - uncond_i)                  (guidance, when on)
    x0    = clamp(AS*(AX*x + AE0*e_0 + AE1*e_1), -R, R)
    s     = sqrt(max(VAR - var_table[idx_n, i], 0))  or 1
    out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + CM0*m_0 + CM1*m_1 + CM2*m_2 + CLAST*x_last
          + COFF*offset[n] + CROW*row_table[idx_n, i] + CZ*s*z           (k = 0, 1, 2)

Mirrors ``csrc/include/fastdiff/layout.h``; ``tests/test_layout.py`` checks that they agree.
"""

G, AS, AX, AE0, AE1, R, VAR, OUT = range(8)
CX, CE0, CE1, CX0, CM0, CM1, CM2, CLAST, COFF, CROW, CZ, PER_OUT = range(12)
MAX_OUT = 3
NUM_COEF = 40

ROW_NAMES = ("G", "AS", "AX", "AE0", "AE1", "R", "VAR")
OUT_NAMES = ("CX", "CE0", "CE1", "CX0", "CM0", "CM1", "CM2", "CLAST", "COFF", "CROW", "CZ")

# Storage dtype codes of the native kernels.
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2

# Philox counter word 3: which use of the noise stream (so uses never share numbers).
STREAM_STEP, STREAM_INIT, STREAM_CATEGORICAL, STREAM_TRAIN = 0, 1, 2, 3


def out(k: int, term: int) -> int:
    """Column of output k's coefficient `term` (one of CX ... CZ)."""
    return OUT + k * PER_OUT + term


def names() -> list[str]:
    """The name of every column, e.g. 'AX' or 'out1.CX0' (padding columns are 'pad')."""
    cols = list(ROW_NAMES)
    cols += [f"out{k}.{n}" for k in range(MAX_OUT) for n in OUT_NAMES]
    return cols + ["pad"] * (NUM_COEF - len(cols))
