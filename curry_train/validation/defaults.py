"""What ``curry-bench`` runs unless told otherwise: the layouts it sets side by side, the models it compiles,
the pipeline it measures. Plain data (no torch): the command's --help lists them."""

from __future__ import annotations

# --layouts' defaults: data parallelism and tensor parallelism (with and without sequence parallelism) on
# 2 ranks, FSDP x TP on 4.
LAYOUTS = {
    "dp": ("parallel=dp", "trainer.devices=2"),
    "tp": ("parallel=tp", "trainer.devices=2"),
    "tp+sp": ("parallel=tp", "parallel.tp.sequence_parallel=true", "trainer.devices=2"),
    "fsdp+tp": ("parallel=fsdp+tp", "trainer.devices=4"),
}
LAYOUT_KEYS = ("parallel", "+parallel", "trainer.devices", "trainer.num_nodes")  # each layout sets these itself
# --compare's defaults: --layouts' and FSDP (ZeRO-3) on 2 ranks.
COMPARE_LAYOUTS = {
    "dp": LAYOUTS["dp"],
    "fsdp": ("parallel=fsdp", "trainer.devices=2"),
    **{name: layout for name, layout in LAYOUTS.items() if name != "dp"},
}
# --compile's models: the debug model and a ~100M-parameter Llama
COMPILE_MODELS: dict[str, tuple[str, ...]] = {
    "debug": (),
    "llama-100m": (
        "model.name=llama_100m",
        "model.dim=768",
        "model.n_layers=16",
        "model.n_heads=12",
        "model.n_kv_heads=4",
        "model.ffn_dim=2048",
    ),
}
# --compile --layouts: the layouts compiled against eager (one process, data parallel, FSDP, TP, FSDP x TP)
COMPILE_LAYOUTS = {
    "1 process": (),
    "dp 2": LAYOUTS["dp"],
    "fsdp 2": COMPARE_LAYOUTS["fsdp"],
    "tp 2": LAYOUTS["tp"],
    "fsdp 2 x tp 2": LAYOUTS["fsdp+tp"],
}
# --pipeline: equal stages for P=2 with 2 stages per rank: 4 stages of 2 blocks (the debug model has 4 blocks)
PIPELINE_DEFAULTS = ("model.n_layers=8",)
