"""Logging scores to MLflow: one run per scored folder (the CLI's --mlflow); validation during training logs
through the training run's own tracker instead."""

from __future__ import annotations

from pathlib import Path


def log_to_mlflow(tracking_uri: str, experiment: str, run_name: str, info: dict, summary: dict,
                  files: dict[str, Path]) -> str:
    """A new run with the settings as params, the summary's means as metrics (metric and task/metric) and the
    report files as artifacts; returns the run id."""
    import mlflow

    from hcustom_mc import console
    from hcustom_mc.eval.score import flat_metrics

    console.quiet_third_party_loggers()
    mlflow.set_tracking_uri(tracking_uri)
    if mlflow.get_experiment_by_name(experiment) is None and tracking_uri.startswith("sqlite:///"):
        # a file store's artifacts beside its database, not in the current folder
        root = Path(tracking_uri[len("sqlite:///"):]).parent
        mlflow.create_experiment(experiment, artifact_location=(root / "mlartifacts").resolve().as_uri())
    mlflow.set_experiment(experiment)
    with mlflow.start_run(run_name=run_name) as run:
        mlflow.log_params({k: str(v)[:500] for k, v in info.items()})
        mlflow.log_metrics(flat_metrics(summary))
        for path in files.values():
            mlflow.log_artifact(str(path))
        return run.info.run_id
