"""`sparse-ofa demo`: Prune Once for All on the real all-MiniLM-L6-v2, end to end (`run`), and its plot."""
from .run import DemoConfig, format_summary, quick_config, run_demo

__all__ = ["DemoConfig", "format_summary", "quick_config", "run_demo"]
