"""The experiment: train every (D_M, seed) run (and its metadata-free cooldown branch), evaluate figures A-C with
the exact Bayes references, summarise the issue's targets. Every run's training and evaluation are saved in its
directory as they finish, so a rerun resumes. ``cfg.workers > 1`` trains and evaluates up to that many runs at once
in spawned processes on the same device (each one the same ``Runner`` call as the sequential path; a cooldown
starts once its parent run is done)."""
from __future__ import annotations

import functools
import json
import math
import os
import statistics
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path

import torch

from .. import distributed
from . import evaluate as ev, inference
from .config import PCFGRunConfig
from .grammar import LeveledPCFG
from .inference import inside
from .model import build_model, num_parameters
from .train import train_run


def resolve_device(cfg: PCFGRunConfig) -> torch.device:
    """"auto"/"cuda": this process's GPU (cuda:LOCAL_RANK under torchrun) if there is one, else cpu."""
    if cfg.device in ("auto", "cuda"):
        return distributed.default_device()
    return torch.device(cfg.device)


def run_keys(cfg: PCFGRunConfig) -> list[tuple[str, int, int, bool]]:
    """(key, D_M, seed, cooldown) of every model, in training order (a cooldown after its base run)."""
    keys = []
    for seed in cfg.seeds:
        for d in cfg.meta_depths:
            keys.append((f"dm{d}_s{seed}", d, seed, False))
            if cfg.cooldown_steps and d > 0:
                keys.append((f"dm{d}_s{seed}_cool", d, seed, True))
    return keys


class Evaluator:
    """The shared held-out sets and their DP (computed once), and the per-model evaluation."""

    STATE = ("loss_set", "probe_train", "probe_test", "pool", "prompts", "reference")

    def __init__(self, cfg: PCFGRunConfig, pcfg: LeveledPCFG, device, log=print, load: Path | None = None):
        """load: a file written by ``save`` (worker processes take the parent's sets instead of redoing the DP)."""
        self.cfg, self.pcfg, self.device = cfg, pcfg, device
        if load is not None:
            self.__dict__.update(torch.load(load, weights_only=False))   # each tensor on the device it was saved from
            return
        t0 = time.time()
        s = cfg.eval_seed
        self.loss_set = ev.eval_set(pcfg, cfg.eval_sequences, s, device)
        self.probe_train = pcfg.sample(cfg.probe_train, seed=s + 1)
        self.probe_test = ev.eval_set(pcfg, cfg.probe_test, s + 2, device)
        self.pool = pcfg.sample(20 * cfg.gen_samples, seed=s + 3)
        self.prompts = ev.prompt_sets(self.pool, cfg.positions, cfg.gen_samples)
        used = torch.unique(torch.cat(list(self.prompts.values())))
        pool_dp = inside(pcfg, self.pool.terminals[used].to(device), self.pool.lengths[used].to(device))
        remap = torch.full((len(self.pool.lengths),), -1, dtype=torch.long)
        remap[used] = torch.arange(len(used))
        sub = type(self.pool)(self.pool.terminals[used], self.pool.lengths[used], self.pool.meta[used])
        self.reference = {
            "loss": ev.bayes_losses(pcfg, self.loss_set, cfg.meta_depths),
            "probe_ceiling": ev.bayes_probe_ceiling(self.probe_test, cfg.positions).tolist(),
            "identification": ev.identification_reference(pool_dp, sub, {k: remap[i] for k, i in self.prompts.items()}),
            "prompt_counts": {str(k): len(i) for k, i in self.prompts.items()},
            "dp_seconds": time.time() - t0}
        log(f"evaluation sets and exact DP: {self.reference['dp_seconds']:.1f}s")

    def save(self, path: Path) -> None:
        torch.save({k: getattr(self, k) for k in self.STATE}, path)

    def probes(self, model) -> list:
        cfg, pos = self.cfg, self.cfg.positions
        xtr = ev.probe_features(model, self.pcfg, self.probe_train, pos, cfg, self.device)
        xte = ev.probe_features(model, self.pcfg, self.probe_test.docs, pos, cfg, self.device)
        acc = ev.fit_probes(xtr, self.probe_train.meta, ev.position_valid(self.probe_train, pos), xte,
                            self.probe_test.docs.meta, ev.position_valid(self.probe_test.docs, pos),
                            self.pcfg.num_alternatives, cfg.probe_steps, self.device)
        return acc.tolist()                                                                  # [L+1, P, D]

    def __call__(self, model, meta_depth: int, seed: int) -> dict:
        t0 = time.time()
        out = {"loss": ev.loss_by_mode(model, self.pcfg, self.loss_set, meta_depth, self.cfg, self.device),
               "probes": self.probes(model),
               "grammar": ev.grammatical_accuracy(model, self.pcfg, self.pool, self.prompts, self.cfg, self.device,
                                                  seed=10_000 + seed)}
        out["eval_seconds"] = time.time() - t0
        return out


class Runner:
    """What one process needs to train and evaluate runs: the grammar, the device and (rank 0) the evaluator."""

    def __init__(self, cfg: PCFGRunConfig, progress: bool = True, log=print, eval_sets: Path | None = None):
        self.cfg, self.progress, self.log = cfg, progress, log
        self.runs = Path(cfg.out) / "runs"
        self.device = resolve_device(cfg)
        self.pcfg = LeveledPCFG(**cfg.grammar_kwargs())
        self.evaluator = Evaluator(cfg, self.pcfg, self.device, log, load=eval_sets) if distributed.is_main() \
            else None

    def __call__(self, key: str, d: int, seed: int, cool: bool) -> dict | None:
        """Train run ``key`` (every rank under torchrun) and evaluate it (rank 0, which returns its metrics entry;
        other ranks return None). Finished training and evaluation are loaded from the run directory."""
        run_dir = self.runs / key
        branch = self.runs / f"dm{d}_s{seed}" / "branch.pt" if cool else None
        model, train = train_run(self.cfg, self.pcfg, d, seed, run_dir, self.device, branch_from=branch,
                                 progress=self.progress, log=self.log)
        if self.evaluator is None:
            return None
        done = run_dir / "eval.json"
        if self.cfg.resume and done.exists():
            result = json.loads(done.read_text())
        else:
            result = self.evaluator(model, d, seed)
            done.write_text(json.dumps(result))
        g = result["grammar"]
        self.log(f"{key}: all-MASK loss {result['loss']['mask']['average']:.4f}, metadata loss "
                 f"{result['loss']['meta']['average']:.4f}; grammatical accuracy "
                 + " ".join(f"k={k}:{v['accuracy']:.2f}" for k, v in g.items()) + f" ({result['eval_seconds']:.0f}s)")
        return _entry(d, seed, cool, train, result)


def _entry(d: int, seed: int, cool: bool, train: dict, result: dict) -> dict:
    """A run's entry of metrics["runs"]: its keys, training summary and evaluation."""
    return {"meta_depth": d, "seed": seed, "cooldown": cool, "train": train, **result}


def load_finished(cfg: PCFGRunConfig, keys: list) -> tuple[dict, list]:
    """(entries, [not made]) of the runs as their directories hold them: a run counts when both its train.json
    and eval.json exist (``cfg.report_only``: e.g. runs evaluated on a machine that is gone, without weights)."""
    runs, missing = {}, []
    for key, d, seed, cool in keys:
        files = [Path(cfg.out) / "runs" / key / f"{name}.json" for name in ("train", "eval")]
        if all(f.exists() for f in files):
            runs[key] = _entry(d, seed, cool, *(json.loads(f.read_text()) for f in files))
        else:
            missing.append(key)
    return runs, missing


def _late(cfg: PCFGRunConfig, key: str, started: float) -> bool:
    """Whether run ``key`` is past the time limit: start no new run after it (a finished one is still loaded)."""
    return bool(cfg.time_limit_s) and time.time() - started > cfg.time_limit_s and \
        not (Path(cfg.out) / "runs" / key / "eval.json").exists()


def _skip(cfg: PCFGRunConfig, key: str, skipped: list, log) -> None:
    skipped.append(key)
    log(f"{key}: skipped (time limit of {cfg.time_limit_s:.0f}s reached)")


def run_sequential(runner: Runner, keys: list, started: float) -> tuple[dict, list]:
    """({key: metrics entry} (rank 0), [skipped keys]) training the runs one after another (every rank)."""
    runs, skipped = {}, []
    for key, d, seed, cool in keys:
        if distributed.broadcast_object(_late(runner.cfg, key, started)):      # rank 0's clock decides for every rank
            _skip(runner.cfg, key, skipped, runner.log)
            continue
        entry = runner(key, d, seed, cool)
        if entry is not None:
            runs[key] = entry
    return runs, skipped


_WORKER: Runner | None = None


WORKER_GPU_SHARE = 0.95   # of the GPU's memory, split evenly among the workers (the rest: CUDA contexts, parent)


def _start_worker(cfg: PCFGRunConfig, eval_sets: Path) -> None:
    """A spawned worker's one ``Runner`` over the parent's evaluation sets; CPU threads and the exact DP's GPU
    memory split among the workers (threads: unless ``cfg.threads`` is set). On a GPU each worker's allocator is
    capped at its share of the memory: it frees its own cached blocks at the cap instead of starving the others
    (without it, 8 workers' caches filled an 80 GB H100 and one evaluation ran out of memory, 2026-12-07)."""
    global _WORKER
    torch.set_num_threads(cfg.threads or max(1, (os.cpu_count() or 1) // cfg.workers))
    inference.CUDA_SHARE *= cfg.workers
    device = resolve_device(cfg)
    if device.type == "cuda":
        torch.cuda.set_per_process_memory_fraction(WORKER_GPU_SHARE / cfg.workers, device)
    _WORKER = Runner(cfg, progress=False, log=functools.partial(print, flush=True), eval_sets=eval_sets)


def _work(job: tuple) -> dict:
    return _WORKER(*job)


def run_parallel(cfg: PCFGRunConfig, keys: list, started: float, evaluator: Evaluator,
                 log=print) -> tuple[dict, list]:
    """Like ``run_sequential`` with up to ``cfg.workers`` runs at once, each in its own spawned process (sharing
    ``evaluator``'s sets through a file); a cooldown is started only after its parent run (whose branch
    checkpoint it resumes) is done or skipped."""
    runs, skipped, settled, pending, running = {}, [], set(), list(keys), {}
    context = torch.multiprocessing.get_context("spawn")
    sets = Path(cfg.out) / "eval_sets.tmp"
    evaluator.save(sets)
    if evaluator.device.type == "cuda":
        torch.cuda.empty_cache()   # the parent's DP buffers, for the workers
    with ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_start_worker,
                             initargs=(cfg, sets)) as pool:
        while pending or running:
            for job in list(pending):
                key, d, seed, cool = job
                if len(running) == cfg.workers:
                    break
                if cool and f"dm{d}_s{seed}" not in settled:
                    continue
                pending.remove(job)
                if _late(cfg, key, started):
                    _skip(cfg, key, skipped, log)
                    settled.add(key)
                else:
                    running[pool.submit(_work, job)] = key
            assert running or not pending, "a cooldown waits for a parent that is not scheduled"
            for future in wait(running, return_when=FIRST_COMPLETED).done:
                key = running.pop(future)
                runs[key] = future.result()
                settled.add(key)
    sets.unlink(missing_ok=True)
    order = [key for key, *_ in keys]
    return {k: runs[k] for k in order if k in runs}, sorted(skipped, key=order.index)


def run(cfg: PCFGRunConfig, progress: bool = True, log=print) -> dict:
    """Every run's training (on every rank under torchrun, or in ``cfg.workers`` processes) and evaluation (rank 0
    or the worker that trained it; rank 0 also writes the shared files and logs); every rank returns rank 0's
    metrics."""
    distributed.init()
    main = distributed.is_main()
    if cfg.workers > 1 and distributed.world_size() > 1:
        raise ValueError(f"workers={cfg.workers} starts its own processes; under torchrun pass --workers 1")
    if not main:
        log = _silent
    out = Path(cfg.out)
    (out / "runs").mkdir(parents=True, exist_ok=True)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    runner = Runner(cfg, progress, log)
    pcfg, device, evaluator = runner.pcfg, runner.device, runner.evaluator
    size = num_parameters(build_model(cfg, pcfg, 0))
    metrics = {"config": cfg.to_dict(), "device": str(device), "torch": torch.__version__,
               "world_size": distributed.world_size(),
               "grammar": {"depth": pcfg.depth, "sizes": list(pcfg.sizes), "vocab_size": pcfg.vocab_size,
                           "rules": [[[[[list(rhs), p] for rhs, p in rules] for rules in rule_set]
                                      for rule_set in level] for level in pcfg.rules]},
               "model": {"preset": cfg.model, "parameters": size, "attention": cfg.attention}}
    log(f"grammar D={pcfg.depth} sizes {list(pcfg.sizes)} K={pcfg.num_alternatives}; model {cfg.model} "
        f"({size / 1e6:.2f}M parameters, {cfg.attention}) on {device}"
        + (f", {cfg.workers} runs at a time" if cfg.workers > 1 else ""))
    metrics["reference"] = evaluator.reference if main else None
    started = time.time()
    if cfg.report_only:
        metrics["runs"], metrics["skipped"] = load_finished(cfg, run_keys(cfg))
        metrics["device"] += " (report only: runs trained and evaluated before, loaded from their directories)"
    elif cfg.workers > 1:
        metrics["runs"], metrics["skipped"] = run_parallel(cfg, run_keys(cfg), started, evaluator, log)
    else:
        metrics["runs"], metrics["skipped"] = run_sequential(runner, run_keys(cfg), started)
    metrics["runs_wall_seconds"] = time.time() - started
    if not main:
        return distributed.broadcast_object(None)
    for seed in cfg.seeds:   # branch checkpoints are only needed until the cooldown runs exist
        for d in cfg.meta_depths:
            (out / "runs" / f"dm{d}_s{seed}" / "branch.pt").unlink(missing_ok=True)
    control = out / "runs" / "random_init.json"
    if cfg.resume and control.exists():
        metrics["random_init"] = json.loads(control.read_text())
    else:
        model = build_model(cfg, pcfg, 999_983).to(device).eval()
        metrics["random_init"] = {"probes": evaluator.probes(model)}
        control.write_text(json.dumps(metrics["random_init"]))
    metrics["summary"] = summarize(metrics)
    return distributed.broadcast_object(metrics)


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def _mean(xs) -> float:
    return statistics.fmean(xs) if xs else float("nan")


def best_layer_curve(probes: list) -> list[float]:
    """Probe accuracy per position, averaged over levels, at the best layer for each position."""
    acc = torch.tensor(probes).mean(-1)                                                     # [L+1, P]
    return acc.max(0).values.tolist()


def summarize(metrics: dict) -> dict:
    """Per D_M (mean over seeds) and the issue's three targets, per seed, from the run results."""
    cfg = metrics["config"]
    positions = [str(k) for k in cfg["positions"]]
    third = max(1, len(positions) // 3)
    short, long = positions[:third], positions[-third:]
    runs = metrics["runs"]
    base = {(r["meta_depth"], r["seed"]): r for r in runs.values() if not r["cooldown"]}
    cool = {(r["meta_depth"], r["seed"]): r for r in runs.values() if r["cooldown"]}
    seeds, depths = cfg["seeds"], cfg["meta_depths"]

    def acc(r, ks):
        return _mean([r["grammar"][k]["accuracy"] for k in ks if k in r["grammar"]])

    def acc_var(r, ks):
        """Binomial variance of acc(r, ks): a mean over the lengths ks of accuracies on n prompts each."""
        gs = [r["grammar"][k] for k in ks if k in r["grammar"]]
        return sum(g["accuracy"] * (1 - g["accuracy"]) / g["n"] for g in gs) / len(gs) ** 2 if gs else math.nan

    def probe(r, ks):
        curve = best_layer_curve(r["probes"])
        return _mean([curve[positions.index(k)] for k in ks])

    out = {"short_positions": short, "long_positions": long, "per_meta_depth": {}, "targets": {}}
    for d in depths:
        rs = [base[(d, s)] for s in seeds if (d, s) in base]
        row = {"n": len(rs)}
        for mode in ("mask", "meta"):
            vals = [r["loss"][mode]["average"] for r in rs]
            row[f"loss_{mode}"] = _mean(vals)
            row[f"loss_{mode}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
        row["grammar"] = {k: _mean([r["grammar"][k]["accuracy"] for r in rs if k in r["grammar"]])
                          for k in positions}
        row["probe_best_layer"] = [_mean(v) for v in zip(*(best_layer_curve(r["probes"]) for r in rs))]
        out["per_meta_depth"][str(d)] = row
    if 0 not in depths:
        return out
    headline, probes, cooldown = {}, {}, {}
    for d in depths:
        if d == 0:
            continue
        for s in seeds:
            if (d, s) not in base or (0, s) not in base:
                continue
            b, r0 = base[(d, s)], base[(0, s)]
            diff = {k: b["grammar"][k]["accuracy"] - r0["grammar"][k]["accuracy"] for k in positions
                    if k in b["grammar"] and k in r0["grammar"]}
            ds, dl = acc(b, short) - acc(r0, short), acc(b, long) - acc(r0, long)
            # standard errors of the two differences (independent prompts' samples: binomial variances add)
            se_s, se_l = (math.sqrt(acc_var(b, ks) + acc_var(r0, ks)) for ks in (short, long))
            headline[f"dm{d}_s{s}"] = {"diff": diff, "short": ds, "long": dl, "short_se": se_s, "long_se": se_l,
                                       "holds": ds < 0 < dl}
            ps = probe(b, short) - probe(r0, short)
            probes[f"dm{d}_s{s}"] = {"short_diff": ps, "holds": ps < 0}
            if (d, s) in cool:
                c = cool[(d, s)]
                cooldown[f"dm{d}_s{s}"] = {"short_base": ds, "short_cooldown": acc(c, short) - acc(r0, short),
                                           "long_base": dl, "long_cooldown": acc(c, long) - acc(r0, long),
                                           "diff_cooldown": {k: c["grammar"][k]["accuracy"] -
                                                             r0["grammar"][k]["accuracy"] for k in diff}}
    masks = {str(d): out["per_meta_depth"][str(d)]["loss_mask"] for d in depths}
    spread = max(masks.values()) - min(masks.values())
    # pooled: the mean accuracy of every D_M>0 run minus that of every D_M=0 run (prompt-sampling error only)
    with_meta = [r for (d, _), r in base.items() if d > 0]
    without = [r for (d, _), r in base.items() if d == 0]
    pooled = {}
    if with_meta and without:
        for side, ks in (("short", short), ("long", long)):
            pooled[side] = _mean([acc(r, ks) for r in with_meta]) - _mean([acc(r, ks) for r in without])
            pooled[f"{side}_se"] = math.sqrt(sum(acc_var(r, ks) for r in with_meta) / len(with_meta) ** 2
                                             + sum(acc_var(r, ks) for r in without) / len(without) ** 2)
        pooled["runs"] = {"with_metadata": len(with_meta), "without": len(without)}
    out["targets"] = {
        "grammar_short_negative_long_positive": {"runs": headline, "pooled": pooled,
                                                 "holds_every_seed": bool(headline) and all(
                                                     v["holds"] for v in headline.values())},
        "probes_worse_at_short_positions": {"runs": probes,
                                            "holds_every_seed": bool(probes) and all(
                                                v["holds"] for v in probes.values())},
        "all_mask_loss_about_equal": {"loss_mask": masks, "spread": spread,
                                      "relative_spread": spread / masks["0"] if masks.get("0") else float("nan"),
                                      "bayes_mask": metrics["reference"]["loss"]["mask"]["average"]},
        "cooldown": cooldown}
    return out
