"""Trial-level parallelism of Optuna tuning on PostgreSQL: 1 worker against 2 on one study.

    .venv/bin/python benchmarks/tune_scaling.py [--trials 8] [--epochs 3] [--users 6000]

Starts a Prefect server (so that no `cdsr tune` starts a temporary one) and, per measurement, a
throwaway PostgreSQL cluster on 127.0.0.1 (``tune.storage`` = its URL); builds a small synthetic
dataset once; then runs ``--trials`` trials of a SASRec study with one ``cdsr tune --worker 0``
process, and the same number with two processes at once (``--worker 0`` and ``--worker 1``,
``--worker-trials`` half each). Every worker has one thread (``OMP_NUM_THREADS=1``, so torch's
intra-op pool is 1) and no pruning (every trial costs the same ``--epochs``). Printed: the wall
time of each measurement (first worker started to last worker exited, start-up included), the
span of its trials (first trial started to last trial finished, from the study), and the ratios.
Target: 2 workers take about half the wall time of one (MET when the ratio is <= 0.6). Needs
two free cores; other work on the machine shows in the figures, so a calibration follows: the
speed-up of two single-thread matmul loops at once over one (before and after), whose inverse is the best ratio the
machine allowed at that moment.

The helpers that start the servers are the tests' (tests/servers.py, loaded by file path, as
tests/helpers.py for the dataset): one way to start a throwaway cluster, not a second copy in src.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.6


def _load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tests" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


servers = _load("servers")
helpers = _load("helpers")


def write_params(tmp: Path, storage: str, epochs: int, users: int) -> Path:
    dataset = {**helpers.TINY, "generator": {**helpers.TINY["generator"], "users": users, "items_per_domain": 400}}
    params = {
        "train": {"epochs": epochs, "batch_size": 64, "progress": False, "patience": 100},
        "evaluate": {"protocols": ["full"], "max_len": 30},
        "models": {"sasrec": {"d": 64, "layers": 2, "heads": 1, "max_len": 30}},
        "tune": {"storage": storage, "epochs": epochs, "runs_dir": str(tmp / "runs"), "tuned_dir": str(tmp / "tuned"),
                 "pruner": {"kind": "none"},
                 "search_space": {"sasrec": {"train.lr": {"low": 0.0005, "high": 0.01, "log": True},
                                             "model.dropout": {"low": 0.0, "high": 0.3}}}},
        "mlflow": {"tracking_uri": f"sqlite:///{tmp / 'mlflow.db'}"},
        "datasets": {"t": dataset},
    }
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def build_data(root: Path, users: int) -> None:
    from cdsr.data.build import build

    build(helpers.make_cfg(**{**helpers.TINY, "generator": {**helpers.TINY["generator"], "users": users,
                                                               "items_per_domain": 400}}), root, log=lambda s: None)


def measure(workers: int, trials: int, epochs: int, users: int, data: Path, env: dict[str, str]) -> dict:
    """Wall time of ``workers`` concurrent `cdsr tune` processes finishing ``trials`` trials."""
    import optuna

    with tempfile.TemporaryDirectory(prefix=f"cdsr-scale{workers}-") as d, servers.postgres_cluster("optuna") as url:
        tmp = Path(d)
        params = write_params(tmp, url, epochs, users)
        cmd = [str(servers.BIN / "cdsr"), "tune", "--dataset", "t", "--model", "sasrec", "--params", str(params),
               "--root", str(data), "--trials", str(trials), "--worker-trials", str(trials // workers)]
        t0 = time.perf_counter()
        procs = [servers.start([*cmd, "--worker", str(k)], env, tmp / f"worker{k}.log", cwd=ROOT)
                 for k in range(workers)]
        try:
            codes = [p.wait(timeout=3600) for p in procs]
        finally:
            for p in procs:
                servers.stop(p, grace=0)
        wall = time.perf_counter() - t0
        for k, c in enumerate(codes):
            if c != 0:
                raise SystemExit(f"worker {k} exited with {c}:\n{servers.tail(tmp / f'worker{k}.log')}")
        done = [t for t in optuna.load_study(study_name="t/sasrec", storage=url).get_trials(deepcopy=False)
                if t.state.name == "COMPLETE"]
    span = (max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)).total_seconds()
    busy = sum((t.datetime_complete - t.datetime_start).total_seconds() for t in done)
    return {"workers": workers, "trials": len(done), "wall": wall, "span": span, "trial_mean": busy / len(done)}


SPIN = ("import time, torch; torch.set_num_threads(1); a = torch.randn(256, 256); t = time.perf_counter()\n"
        "for _ in range(4000): a @ a\nprint(time.perf_counter() - t)")


def calibrate() -> float:
    """What the machine gives two single-thread processes now: the speed-up of two at once over one
    (2.0 on two idle cores; less when other work holds a core). 1 / it is the best ratio reachable."""
    def spin(n: int) -> float:
        procs = [subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.PIPE, text=True) for _ in range(n)]
        return max(float(p.communicate()[0]) for p in procs)

    one, two = spin(1), spin(2)
    return 2 * one / two


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--trials", type=int, default=8, help="trials per measurement (even)")
    ap.add_argument("--epochs", type=int, default=3, help="epochs per trial")
    ap.add_argument("--users", type=int, default=6000, help="users of the synthetic dataset")
    a = ap.parse_args()
    if a.trials < 2 or a.trials % 2:
        ap.error("--trials: an even number >= 2")
    why = servers.postgres_missing()
    if why:
        raise SystemExit(f"cannot start PostgreSQL: {why}")
    with tempfile.TemporaryDirectory(prefix="cdsr-scale-") as d, servers.prefect_server(Path(d)) as (api, _):
        tmp = Path(d)
        build_data(tmp / "data", a.users)
        env = {**servers.base_env(tmp), "PREFECT_API_URL": api, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        print(f"{a.trials} trials x {a.epochs} epochs, SASRec on {a.users} synthetic users; one thread per worker; "
              f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.2f}")
        before = calibrate()
        rows = [measure(w, a.trials, a.epochs, a.users, tmp / "data", env) for w in (1, 2)]
        after = calibrate()
    print(f"{'workers':>7s} {'trials':>6s} {'wall s':>8s} {'trial span s':>12s} {'mean trial s':>12s}")
    for r in rows:
        print(f"{r['workers']:7d} {r['trials']:6d} {r['wall']:8.1f} {r['span']:12.1f} {r['trial_mean']:12.1f}")
    ratio, span_ratio = rows[1]["wall"] / rows[0]["wall"], rows[1]["span"] / rows[0]["span"]
    print(f"wall ratio (2 workers / 1) {ratio:.2f}, trial-span ratio {span_ratio:.2f}; target about 0.5 "
          f"(<= {TARGET}): {'MET' if ratio <= TARGET else 'NOT MET'}; load average now {os.getloadavg()[0]:.2f}")
    print(f"calibration before / after: two single-thread matmul loops at once run {before:.2f} / {after:.2f}x as "
          f"fast as one (2.00 on two idle cores): the best ratio this machine allowed is about "
          f"{1 / before:.2f} / {1 / after:.2f}")


if __name__ == "__main__":
    main()
