"""The coefficient row of a step plan and the native step's parameters, shared by every backend.

The step's terms - what each column below multiplies - are defined once, in the glossary of
``docs/architecture.md`` ("The step's terms"). In short, per sample n with plan row c::

    x0    = clamp(AS*(AX*x + AE0*e_0 + AE1*e_1), -R, R)     e_i = (1 - G)*uncond_i + G*cond_i when guided
    out_k = CX*x + CE0*e_0 + CE1*e_1 + CX0*x0 + CM0*m_0 + CM1*m_1 + CM2*m_2 + CLAST*x_last
          + COFF*offset[n] + CDELTA*delta_table[k_n] + CZ*s*z,   s = sqrt(max(VAR - var_table[k_n], 0)) or 1

An input whose weight is 0 is not read: it contributes exactly 0, even where it holds inf or NaN.
Mirrors ``csrc/include/fastdiff/layout.h``; ``backends.native`` refuses a ``fastdiff._C`` whose
layout or parameter list differs from this file's.
"""

G, AS, AX, AE0, AE1, R, VAR, OUT = range(8)
CX, CE0, CE1, CX0, CM0, CM1, CM2, CLAST, COFF, CDELTA, CZ, PER_OUT = range(12)
MAX_OUT = 3
NUM_COEF = 40

ROW_NAMES = ("G", "AS", "AX", "AE0", "AE1", "R", "VAR")
OUT_NAMES = ("CX", "CE0", "CE1", "CX0", "CM0", "CM1", "CM2", "CLAST", "COFF", "CDELTA", "CZ")

# Columns that may hold +-inf: the x0 scale AS is 1/alpha_t, infinite where alpha_t = 0 (zero terminal
# SNR), and then x0 = (x - sigma*e)/0 is +-inf before its clamp, as in diffusers.
MAY_BE_INF = (AS,)

# Storage dtype codes of the native kernels.
FLOAT32, FLOAT16, BFLOAT16 = 0, 1, 2

# The parameters of the native step (``StepParams`` in csrc/include/fastdiff/step.cuh), by name. Python
# builds the argument tuple in ``fastdiff._C.step_fields`` order from these names.
STEP_FIELDS = (
    "batch", "numel", "dtype", "x", "e0", "e1", "eu0", "eu1", "m0", "m1", "m2", "x_last", "offset",
    "component", "delta_table", "var_table", "table_rows", "noise", "seeds", "noise_step", "noise_domain",
    "coef", "coef_rows", "row", "rows", "rows_len", "clamp", "n_out", "out0", "out1", "out2",
)


def out(k: int, term: int) -> int:
    """Column of output k's coefficient `term` (one of CX ... CZ)."""
    return OUT + k * PER_OUT + term


def names() -> list[str]:
    """The name of every column, e.g. 'AX' or 'out1.CX0' (padding columns are 'pad')."""
    cols = list(ROW_NAMES)
    cols += [f"out{k}.{n}" for k in range(MAX_OUT) for n in OUT_NAMES]
    return cols + ["pad"] * (NUM_COEF - len(cols))


def constants() -> dict[str, int]:
    """Every named constant of the layout, as ``fastdiff._C.layout`` reports its own."""
    row = {n: i for i, n in enumerate(ROW_NAMES)}
    term = {n: i for i, n in enumerate(OUT_NAMES)}
    return {**row, "OUT": OUT, **term, "PER_OUT": PER_OUT, "MAX_OUT": MAX_OUT, "NUM_COEF": NUM_COEF}
