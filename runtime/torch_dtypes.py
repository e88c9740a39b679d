"""IR dtypes <-> torch dtypes: the one table the torch executor, the encoded linear kernels and
the frontend share (a module of its own, so that none of them imports another for it)."""

from __future__ import annotations

import torch

from tcc.ir.dtypes import DType
from tcc.ir.errors import TccError

TORCH_DTYPES: dict[DType, torch.dtype] = {
    DType.F64: torch.float64, DType.F32: torch.float32, DType.F16: torch.float16, DType.BF16: torch.bfloat16, DType.I64: torch.int64,
    DType.I32: torch.int32, DType.I16: torch.int16, DType.I8: torch.int8, DType.I4: torch.int8,
    DType.B1: torch.int8, DType.BOOL: torch.bool,
}


def dtype_from_torch(dtype: torch.dtype) -> DType:
    for ir_dtype in (DType.F64, DType.F32, DType.F16, DType.BF16, DType.I64, DType.I32, DType.I16, DType.I8, DType.BOOL):
        if TORCH_DTYPES[ir_dtype] == dtype:
            return ir_dtype
    raise TccError(f"no IR dtype for torch dtype {dtype}")
