"""The floating-point dtypes every tool accepts by name: config keys, `--dtype` flags, exports."""

import ml_dtypes
import numpy as np

FLOAT_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "bfloat16": np.dtype(ml_dtypes.bfloat16), "float16": np.dtype(np.float16),
}
