"""A study's summary files, for the MLflow parent run and for ``cliptune report``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def write_report(result: Any, folder: Path) -> list[Path]:
    """Write best_config.yaml, trials.csv, search_space.yaml and plots/*.png of a TuneResult."""
    from cliptune.plots import write_plots

    folder.mkdir(parents=True, exist_ok=True)
    written = []
    if result.best_config is not None:
        path = folder / "best_config.yaml"
        result.best_config.to_yaml(path, **result.best_extras)
        written.append(path)
    result.trials_dataframe().to_csv(folder / "trials.csv", index=False)
    written.append(folder / "trials.csv")
    space = result.study.user_attrs.get("cliptune.search_space")
    if space is not None:
        (folder / "search_space.yaml").write_text(yaml.safe_dump(space, sort_keys=False))
        written.append(folder / "search_space.yaml")
    return written + write_plots(result.study, folder / "plots")
