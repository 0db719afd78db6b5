"""Block-sparse attention: the planner (NumPy), the XLA schedules, and the fused CPU kernel."""

from transformer.attention.block_sparse.attention import block_sparse_attention
from transformer.attention.block_sparse.plan import Plan, make_plan
