"""Hyperparameter sweeps with Ray Tune over the one training loop, tracked in MLflow.

    python -m unet_dist.tune --config BASE.yaml --search SWEEP.yaml [--set key=value ...]

Ray Tune runs one trial per sampled config. Each trial is a function trainable that builds the same
TorchTrainer as ``python -m unet_dist.train`` (launch.ray_trainer, over the one loop) and fits it,
with a TuneReportCallback forwarding each report (metrics + checkpoint path) to Tune: the pattern of
Ray's "Hyperparameter Tuning with Ray Tune" guide for Train V2. ASHA stops weak trials at its rungs.

MLflow: one parent run per sweep (search space, results table, metric-vs-hyperparameter picture,
best config), one nested child run per trial (the loop's usual metrics and pictures), and only the
best trial's model registered. Rerunning the same command after the driver died resumes the sweep
(``Tuner.restore``): finished trials are neither rerun nor logged again.

Heavy imports (torch, Ray, MLflow) wait until they are needed, so a bad sweep file fails fast.
"""
from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import math
import sys
import time
from pathlib import Path

from unet_dist import cli, ray_address, storage
from unet_dist.config import Config, config_from_args, dump_yaml, from_dict, to_dict
from unet_dist.errors import UnetDistError
from unet_dist.sweep import (Sweep, check_against_base, check_cluster, load_sweep, max_steps, param_space,
                             trial_config)
from unet_dist.train import preemption

log = logging.getLogger("unet_dist.tune")
STATE_FILE = "unet_sweep.json"  # beside Tune's own experiment state: the parent run and sweep digest
# The sweep's metric names (MLflow's) -> the keys of the loop's reports and of its RunSummary.
REPORTED = {"val/miou": "val_miou"}


def _report_callback(run_id: str, total_steps: int):
    """TuneReportCallback (forwards each Train report, with its checkpoint path, to Tune) that also
    names the metric as the sweep does and the trial's MLflow run. The final step is left to
    :func:`run_trial`: Tune may stop a trial at any report it sees, and the loop still has the model to
    log after its last one. Built in the trial; it runs in the Train controller."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class Report(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            first = dict(metrics[0])
            if int(first.get("step", 0)) >= total_steps:
                return
            for name, key in REPORTED.items():
                if key in first:
                    first[name] = first[key]
            first["mlflow_run_id"] = run_id
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return Report()


def run_trial(values: dict, *, base: dict, sweep: Sweep, trials_dir: str, parent_run_id: str) -> None:
    """One Tune trial: a Ray Train run of the one loop, logging to a child run of the sweep's run."""
    import ray.tune

    from unet_dist.train import launch
    from unet_dist.train import plan as job_plan

    trial_id = ray.tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(base, "base config"), values, sweep, trial_id, trials_dir)
    # The trial's job plan, made once here; a restarted trial finds its child run in its newest
    # checkpoint (launch.open_run).
    plan = launch.open_run(job_plan.resolve(cfg), "ray", cfg.train.workers, tags={
        "mlflow.parentRunId": parent_run_id, "unet_dist.sweep": sweep.name, "tune.trial_id": trial_id,
        **{f"tune.{k}": json.dumps(v) for k, v in values.items()}})
    trainer = launch.ray_trainer(plan, callbacks=(_report_callback(plan.run_id, cfg.train.steps),),
                                 gpus_per_worker=sweep.resources.gpus_per_worker or 1.0)
    summary = launch.fit_ray(plan, trainer)
    log.info("trial %s: %s after %s steps", trial_id, summary.status, summary.steps)
    final = {"step": summary.steps or 0, "status": summary.status, "mlflow_run_id": plan.run_id,
             "checkpoint_path": summary.checkpoint}
    for name, key in REPORTED.items():
        if getattr(summary, key) is not None:
            final[name] = getattr(summary, key)
    if summary.best_miou is not None:
        final["best_miou"] = summary.best_miou
    ray.tune.report(final)


# ------------------------------------------------------------------------------------------ driver
def _open_parent(cfg: Config, sweep: Sweep, exp_dir: storage.Location, restoring: bool) -> str:
    """The sweep's MLflow run: the one in the state file when resuming, else a new one."""
    import mlflow
    from unet_dist.tracking import start_run

    state_path = exp_dir / STATE_FILE
    state = json.loads(state_path.read_text()) if state_path.exists() else {}
    if restoring and state:
        if state.get("digest") != sweep.digest:
            raise UnetDistError(f"{sweep.source}: changed since sweep '{sweep.name}' started in {exp_dir}; "
                                "give the changed sweep a new 'name' (or remove that folder)")
        return start_run(cfg, resume_run_id=state["parent_run_id"], tags={})
    parent_cfg = from_dict(to_dict(cfg))
    parent_cfg.mlflow.run_name = sweep.name
    run_id = start_run(parent_cfg, resume_run_id=None, tags={
        "unet_dist.sweep": sweep.name, "launcher": "ray-tune", "tune.metric": sweep.metric,
        "tune.mode": sweep.mode, "tune.storage": str(exp_dir)})
    client = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri)
    client.log_text(run_id, Path(sweep.source).read_text(), "sweep/search.yaml")
    client.log_text(run_id, dump_yaml(cfg), "sweep/base_config.yaml")
    for key, spec in sweep.space.items():
        client.log_param(run_id, f"space.{key}", json.dumps(spec)[:6000])
    state_path.write_json({"parent_run_id": run_id, "digest": sweep.digest, "source": sweep.source}, indent=2)
    return run_id


def _child_runs(client, parent_run_id: str) -> dict[str, object]:
    """Trial id -> its MLflow run (the newest, should a trial have been started twice)."""
    exp = client.get_run(parent_run_id).info.experiment_id
    runs = client.search_runs([exp], f"tags.`mlflow.parentRunId` = '{parent_run_id}'",
                              order_by=["attributes.start_time ASC"], max_results=10000)
    return {r.data.tags.get("tune.trial_id"): r for r in runs}


def trial_status(errored: bool, reported: str | None, step: int | None, steps: int) -> str:
    """How a trial ended, from what Tune saw: its error, and the loop's status in its last report
    ("running" until the loop's own last one). Not from the child run's MLflow status: when ASHA stops
    a trial, its ``trainer.fit()`` may see the abort and mark the run FAILED before Tune kills it."""
    if errored:
        return "error"
    if reported not in (None, "running", "finished", preemption.STATUS):
        return "failed"  # the loop stopped it, e.g. non-finite weights
    if step is not None and step >= steps:
        return "finished"
    return "stopped_early"


def _rows(results, cfg: Config, sweep: Sweep, trials_dir: storage.Location, children: dict) -> list[dict]:
    """One row per trial: its values, how it ended, its score, MLflow run and newest checkpoint."""
    from unet_dist import checkpoint

    rows = []
    for res in results:
        metrics = res.metrics or {}
        trial_id = metrics.get("trial_id")
        run = children.get(trial_id)
        step = metrics.get("step")
        status = trial_status(res.error is not None, metrics.get("status"), step,
                              int(res.config.get("train.steps", cfg.train.steps)))
        latest = checkpoint.find_latest(trials_dir / trial_id) if trial_id else None
        rows.append({"trial_id": trial_id, **{k: res.config.get(k) for k in sweep.space}, "status": status,
                     "step": step, sweep.metric: metrics.get(sweep.metric), "best_miou": metrics.get("best_miou"),
                     "mlflow_run_id": run.info.run_id if run else None,
                     "checkpoint": str(latest) if latest else None})
    return sorted(rows, key=lambda r: str(r["trial_id"]))


def results_table(rows: list[dict]) -> str:
    buf = io.StringIO()
    if rows:
        writer = csv.DictWriter(buf, fieldnames=list(rows[0]))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: json.dumps(v) if isinstance(v, (list, dict)) else v for k, v in row.items()})
    return buf.getvalue()


def _best(rows: list[dict], sweep: Sweep) -> dict | None:
    scored = [r for r in rows if isinstance(r.get(sweep.metric), (int, float)) and math.isfinite(r[sweep.metric])]
    if not scored:
        return None
    pick = max if sweep.mode == "max" else min
    # Prefer a trial that ran to the end: its model was logged and can be registered.
    finished = [r for r in scored if r["status"] == "finished"]
    return pick(finished or scored, key=lambda r: r[sweep.metric])


def _finish_parent(cfg: Config, sweep: Sweep, parent_run_id: str, rows: list[dict], children: dict,
                   wall_s: float) -> dict | None:
    """Results table, picture, best config and the best model's registration, on the parent run."""
    import mlflow

    from unet_dist import viz

    client = mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri)
    for row in rows:  # an early-stopped trial's run was cut off mid-way (left RUNNING, or FINISHED by
        run = children.get(row["trial_id"])  # MLflow's exit hook): say so
        if run is not None and row["status"] == "stopped_early" and run.info.status != "KILLED":
            client.set_tag(run.info.run_id, "tune.stopped_early", "true")
            client.set_terminated(run.info.run_id, "KILLED")
    client.log_text(parent_run_id, results_table(rows), "sweep/results.csv")
    client.log_text(parent_run_id, json.dumps(rows, indent=2, default=str), "sweep/results.json")
    log_keys = [k for k, spec in sweep.space.items() if "loguniform" in spec]
    picture = viz.sweep_scatter(rows, list(sweep.space), sweep.metric, log_keys)
    client.log_image(parent_run_id, picture, "sweep/metric_vs_hyperparameters.png")
    stopped = sum(r["status"] == "stopped_early" for r in rows)
    client.log_metric(parent_run_id, "trials", len(rows))
    client.log_metric(parent_run_id, "trials_stopped_early", stopped)
    client.log_metric(parent_run_id, "sweep_wall_s", wall_s)
    best = _best(rows, sweep)
    if best is None:
        client.set_terminated(parent_run_id, "FAILED")
        return None
    client.log_metric(parent_run_id, f"best/{sweep.metric}", float(best[sweep.metric]))
    client.log_dict(parent_run_id, {k: best[k] for k in sweep.space}, "sweep/best_config.yaml")
    client.set_tag(parent_run_id, "best_trial_id", best["trial_id"])
    client.set_tag(parent_run_id, "best_run_id", best["mlflow_run_id"] or "")
    client.set_tag(parent_run_id, "best_checkpoint", best["checkpoint"] or "")
    parent_tags = client.get_run(parent_run_id).data.tags
    if cfg.mlflow.registered_model and best["mlflow_run_id"] and "registered_version" not in parent_tags:
        models = mlflow.search_logged_models(
            experiment_ids=[client.get_run(parent_run_id).info.experiment_id],
            filter_string=f"source_run_id = '{best['mlflow_run_id']}'", output_format="list")
        if models:
            version = mlflow.register_model(f"models:/{models[0].model_id}", cfg.mlflow.registered_model)
            client.set_tag(parent_run_id, "registered_version", f"{cfg.mlflow.registered_model}/{version.version}")
            best["registered"] = f"models:/{cfg.mlflow.registered_model}/{version.version}"
        else:
            log.warning("best trial %s logged no model (it did not finish): nothing registered", best["trial_id"])
    elif "registered_version" in parent_tags:
        best["registered"] = f"models:/{parent_tags['registered_version']}"
    client.set_terminated(parent_run_id, "FINISHED")
    return best


def _driver_resources(sweep: Sweep) -> dict:
    """What each trial's own process reserves. It only waits on its Train run, so by default it takes
    no CPU (a trial of N 1-CPU workers fits N CPUs); Tune refuses an all-zero request, hence one byte
    of the ``memory`` resource."""
    cpus = sweep.resources.driver_cpus
    return {"CPU": cpus} if cpus > 0 else {"CPU": 0, "memory": 1}


def run_sweep(cfg: Config, sweep: Sweep) -> dict:
    import ray
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    from unet_dist.train import launch, multinode
    from unet_dist.train import plan as job_plan

    cfg = job_plan.locate(cfg)
    check_against_base(sweep, cfg)
    cfg = launch.preflight(cfg).cfg
    base = storage.location(cfg.train.checkpoint_dir)  # a path or a store: never Path() of a URL
    exp_dir = base / sweep.name
    trials_dir = exp_dir / "trials"
    launch.init_ray()
    multinode.check_ray_cluster(cfg)
    check_cluster(sweep, ray.cluster_resources())
    exp_fs, exp_path = exp_dir.ray_storage()
    restoring = tune.Tuner.can_restore(exp_path, storage_filesystem=exp_fs)
    parent_run_id = _open_parent(cfg, sweep, exp_dir, restoring)

    trainable = tune.with_resources(
        tune.with_parameters(run_trial, base=to_dict(cfg), sweep=sweep, trials_dir=str(trials_dir),
                             parent_run_id=parent_run_id),
        _driver_resources(sweep))
    if restoring:
        log.info("resuming sweep %s from %s", sweep.name, exp_dir)
        tuner = tune.Tuner.restore(exp_path, trainable, resume_unfinished=True, resume_errored=True,
                                   storage_filesystem=exp_fs)
    else:
        a = sweep.asha
        scheduler = ASHAScheduler(time_attr="step", max_t=max_steps(sweep, cfg), grace_period=a.grace_period,
                                  reduction_factor=a.reduction_factor) if a.enabled else FIFOScheduler()
        from ray.tune.search import BasicVariantGenerator

        tuner = tune.Tuner(
            trainable, param_space=param_space(sweep),
            # The concurrency limit goes to the generator: Tune ignores max_concurrent_trials when a
            # BasicVariantGenerator is passed (we pass one for its seed).
            tune_config=tune.TuneConfig(metric=sweep.metric, mode=sweep.mode, num_samples=sweep.num_samples,
                                        scheduler=scheduler, search_alg=BasicVariantGenerator(
                                            random_state=sweep.seed, max_concurrent=sweep.max_concurrent_trials)),
            run_config=tune.RunConfig(name=sweep.name, storage_path=base.ray_storage()[1], storage_filesystem=exp_fs,
                                      failure_config=tune.FailureConfig(max_failures=1)),
        )
    start = time.perf_counter()
    results = tuner.fit()
    wall = time.perf_counter() - start
    import mlflow

    children = _child_runs(mlflow.tracking.MlflowClient(cfg.mlflow.tracking_uri), parent_run_id)
    rows = _rows(results, cfg, sweep, trials_dir, children)
    best = _finish_parent(cfg, sweep, parent_run_id, rows, children, wall)
    return {"sweep": sweep.name, "parent_run_id": parent_run_id, "trials": rows, "best": best,
            "wall_s": round(wall, 1), "storage": str(exp_dir)}


def summary_lines(summary: dict, metric: str) -> list[str]:
    def fmt(v):
        return "n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else (f"{v:.4f}" if isinstance(v, float) else str(v))

    rows = summary["trials"]
    lines = [f"sweep {summary['sweep']}: {len(rows)} trials, "
             f"{sum(r['status'] == 'stopped_early' for r in rows)} stopped early, {summary['wall_s']:.1f} s",
             f"  {'trial':<14} {'status':<14} {'step':>6} {metric:>10}  config"]
    for r in rows:
        values = {k: v for k, v in r.items() if "." in k}
        lines.append(f"  {str(r['trial_id']):<14} {r['status']:<14} {str(r['step']):>6} {fmt(r.get(metric)):>10}  "
                     f"{json.dumps(values)}")
    best = summary["best"]
    if best:
        lines += [f"best trial       {best['trial_id']} ({metric} {fmt(best[metric])})",
                  f"best checkpoint  {best['checkpoint']}",
                  f"best MLflow run  {best['mlflow_run_id']}",
                  f"registered       {best.get('registered', 'no')}",
                  f"evaluate it:     python -m unet_dist.evaluate --model {best['checkpoint']} --shards <dir>"]
    lines.append(f"MLflow run  {summary['parent_run_id']} (sweep parent)")
    return lines


def parse(argv: list[str] | None) -> tuple[argparse.Namespace, Config, Sweep]:
    """Arguments, base config and sweep file, all checked (every trial config the space can make
    included), before Ray, torch or MLflow is imported."""
    parser = cli.parser("python -m unet_dist.tune", __doc__, config=True)
    parser.add_argument("--search", required=True, metavar="SWEEP.yaml", type=cli.non_empty,
                        help="the sweep file (jobs/sweeps/; its keys: docs/sweeps.md)")
    parser.add_argument("--summary-json", metavar="FILE", type=cli.non_empty,
                        help="also write the sweep's summary as JSON")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    cfg = config_from_args(args)
    sweep = load_sweep(args.search)
    check_against_base(sweep, cfg)
    ray_address.check()
    return args, cfg, sweep


def main(argv: list[str] | None = None) -> None:
    cli.run_main(lambda: run_tune(*parse(argv)))


def run_tune(args: argparse.Namespace, cfg: Config, sweep: Sweep) -> None:
    summary = run_sweep(cfg, sweep)
    print("\n".join(summary_lines(summary, sweep.metric)))
    if args.summary_json:
        Path(args.summary_json).write_text(json.dumps(summary, indent=2, default=str))
    if summary["best"] is None:
        raise UnetDistError(f"sweep {sweep.name}: no trial reported {sweep.metric}")


if __name__ == "__main__":
    main()
