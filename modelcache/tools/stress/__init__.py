"""``modelcache stress``: one trace served by modelcache and by the baselines, every response checked.

| file | what |
|---|---|
| ``run.py`` | the run: configuration, the request threads, the report |
| ``models.py`` | generated models (or the user's files) and the output check |
| ``sizing.py`` | default model sizes and budget for the machine (scaled down when simulated) |
| ``contenders.py`` | modelcache and the baselines (LRU by count, load per request) |
| ``workload.py`` | request traces (Zipf, uniform, from a file) and Belady's offline optimum |
| ``report.py`` | the table and the plot |
"""
from .contenders import Contender, LruCountContender, ModelCacheContender, NaiveContender
from .models import ModelSpec, generate_models, output_ok, specs_from_files
from .run import Progress, Result, StressConfig, failed, run_contender, run_stress, save_json

__all__ = ["StressConfig", "run_stress", "run_contender", "failed", "save_json", "Result", "Progress",
           "ModelSpec", "generate_models", "specs_from_files", "output_ok", "Contender", "ModelCacheContender",
           "LruCountContender", "NaiveContender"]
