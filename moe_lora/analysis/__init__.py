"""Router load analysis: record routing during forwards, compute per-layer load statistics, write a report
(report.json, PNG plots, index.html; schema in SCHEMA.md) and monitor routers live during training.

    from moe_lora.analysis import RoutingRecorder, build_report, write_report_dir

    with RoutingRecorder(model) as rec:
        for batch in batches:
            rec.set_attention_mask(batch["attention_mask"])
            model(**batch)
    layers = list(rec.metrics().values())
    report = build_report(layers, model="tiny-llama", adapter=None, data=None, num_sequences=..., num_tokens=...,
                          labels=rec.label_names)
    write_report_dir(report, "out/")
"""

from .monitor import RouterCollapseWarning, RouterMonitor, write_tensorboard
from .outputs import write_report_dir
from .recorder import RoutingRecorder, router_info
from .report import (
    SCHEMA_VERSION,
    build_report,
    compare_rows,
    format_comparison,
    read_report,
    summarize,
    validate_report,
)
from .stats import RoutingAccumulator, RoutingRecord, layer_metrics, task_expert_nmi

__all__ = [
    "SCHEMA_VERSION",
    "RouterCollapseWarning",
    "RouterMonitor",
    "RoutingAccumulator",
    "RoutingRecord",
    "RoutingRecorder",
    "build_report",
    "compare_rows",
    "format_comparison",
    "layer_metrics",
    "read_report",
    "router_info",
    "summarize",
    "task_expert_nmi",
    "validate_report",
    "write_report_dir",
    "write_tensorboard",
]
