"""The packed layouts, one module each; importing this package registers them (`linear.register_layout`).

| kernel        | module          | weights held                              | multiply                                  |
|---------------|-----------------|-------------------------------------------|-------------------------------------------|
| `int4`        | torch_int4      | torch's int4 pack + bf16 scales/zeros     | `_weight_int4pack_mm_for_cpu`             |
| `int8`        | torch_int8      | int8 [N, K] + float32 scales              | `torch._int_mm` / `_weight_int8pack_mm`   |
| `dequant`     | dequant         | bf16 dense (the reference path)           | `F.linear`                                |
| `cpu_w4a8`    | native_w4a8     | int4 row tiles + bf16 group scales        | `native.w4a8_linear` (C, fused act quant) |
| `cpu_w8a8`    | native_w8a8     | as `int8`                                 | `native.w8a8_linear` (C) / `_int_mm`      |
| `triton_int4` | triton_int4     | the portable int4 form                    | `triton_kernels.w4a16_matmul`             |
| `triton_int8` | triton_int8     | the portable int8 form                    | `triton_kernels.int8_matmul`              |

A new layout is one module here with a `@register_layout` class (kernel name, portable form, load / export /
matmul / dequantized_weight) and its import below.
"""
from . import dequant, native_w4a8, native_w8a8, torch_int4, torch_int8, triton_int4, triton_int8  # noqa: F401
