"""``python -m treadfx demo``: dense vs TREAD training of a small DiT on a bundled data set.

The demo trains the reference DiT (``treadfx.models.dit``) as a class-conditional
rectified-flow model (SiT-style velocity objective) on scikit-learn's bundled
8x8 digits (1797 images, 10 classes, no download), upsampled to 16x16:

* **Objective.** ``x_t = (1 - t) * x0 + t * eps``, target velocity ``v = eps - x0``,
  loss ``mean((model(x_t, 1000 t, y) - v) ** 2)``. Training draws
  ``t ~ logit-normal(0, 1)`` (``sigmoid`` of a standard normal, as in SD3); the
  model sees the timestep as ``1000 t`` (DiT's sinusoidal embedding scale).
* **Two runs, one budget, interleaved.** The same initial weights (a state copy),
  the same batches, noise, ``t`` and label-dropout draws (one seeded generator and
  one saved global-RNG state per run; route selection uses treadfx's counter-based
  seed so it draws nothing from torch's RNG), the same AdamW: one run dense, one
  ``treadfx.transform``-ed. The runs step in one process, interleaved: the run
  whose own clock is behind steps next (:func:`interleave`), so load that comes
  and goes on a shared machine hits both alike. Each run's clock counts only its
  own training steps: the other run's steps, the held-out evaluations, treadfx's
  one-time trace (done by ``treadfx.inspect`` before training, reported as
  ``trace_s``) and one untimed forward+backward warm-up per model are outside it.
  A run stops before a step that would take its clock past the budget.
* **Threads.** torch uses :func:`auto_threads` CPU threads unless ``--threads``
  says otherwise: 1 on a machine with at most 2 cores, where two busy threads on
  shared cores thrash.
* **Held-out loss** is the same objective on a fixed split of 297 images with
  fixed noise and ``t`` (independent of ``--seed``), in eval mode (for TREAD
  that is the original model), so it is deterministic and comparable. It is
  measured periodically (for the curves), at the end of the budget (equal
  wall-clock), and for both runs at the larger of the two step counts (equal
  steps: the run with fewer steps continues outside the budget to get there).
* **Samples** come from an Euler sampler over the velocity field (t = 1 -> 0),
  with classifier-free guidance: the DiT's label embedder drops 10% of the
  labels in training into a null class.

``run_demo(DemoConfig(...))`` returns a JSON-serialisable dict; ``main(argv)``
is the command line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import sys
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

import treadfx
from treadfx.models.dit import DiT

__all__ = [
    "DemoConfig", "PRESETS", "load_digits_dataset", "make_heldout", "rectified_flow_loss", "heldout_loss",
    "sample", "build_model", "auto_threads", "Run", "interleave", "train_interleaved", "run_demo", "speed_label",
    "format_table", "plot_result", "build_parser", "main",
]

#: model presets for ``--size`` (depth, hidden size, attention heads); ``--depth/--hidden/--heads`` override them
PRESETS: dict[str, dict[str, int]] = {
    "tiny": dict(depth=4, hidden=64, heads=2),
    "small": dict(depth=6, hidden=96, heads=4),
    "medium": dict(depth=12, hidden=192, heads=6),
}
NUM_CLASSES = 10
HELDOUT_SIZE = 297  # 1797 = 1500 train + 297 held out
SPLIT_SEED = 0  # the held-out split and its noise / t are fixed, whatever --seed is
HELDOUT_SEED = 1234


@dataclasses.dataclass
class DemoConfig:
    """Everything one demo run depends on. ``resolved()`` fills defaults and validates."""

    seconds: float | None = None  # training wall-clock budget per model; None: 60 s unless ``steps`` is given
    steps: int | None = None  # optional step cap per model (with or instead of the time budget)
    batch: int = 32
    size: str = "small"
    depth: int | None = None
    hidden: int | None = None
    heads: int | None = None
    resolution: int = 16
    patch: int = 2
    ratio: float = 0.5
    start: int | None = None  # None: min(2, depth // 4)
    end: int | None = None  # None: -min(4, depth // 4 + 1)
    lr: float = 2e-3
    cfg_scale: float = 2.0
    sample_steps: int = 25
    samples_per_class: int = 6
    eval_points: int = 10  # periodic held-out evaluations per run (plus start, end and equal-steps)
    device: str = "cpu"
    threads: int | None = None  # torch CPU threads; None: auto_threads()
    seed: int = 0
    out: str | None = "treadfx_demo.png"
    progress: bool = True

    def resolved(self) -> "DemoConfig":
        """A copy with model size, route and budget filled in; raises ``ValueError`` naming a bad setting."""
        c = dataclasses.replace(self)
        if c.size not in PRESETS:
            raise ValueError(f"--size {c.size!r}: choose one of {', '.join(PRESETS)}")
        for k, v in PRESETS[c.size].items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if c.seconds is None and c.steps is None:
            c.seconds = 60.0
        if c.seconds is not None and not (c.seconds > 0 and math.isfinite(c.seconds)):
            raise ValueError(f"--seconds must be a positive number, got {c.seconds}")
        if c.steps is not None and c.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {c.steps}")
        if c.batch < 1:
            raise ValueError(f"--batch must be >= 1, got {c.batch}")
        if c.depth < 3:
            raise ValueError(f"--depth must be >= 3 (a route needs blocks before and after it), got {c.depth}")
        if c.heads < 1 or c.hidden < 1 or c.hidden % c.heads or (c.hidden // c.heads) % 2 or c.hidden % 4:
            raise ValueError(f"--hidden {c.hidden} must be a multiple of 4 and of --heads {c.heads} "
                             "with an even head size")
        if c.patch not in (1, 2, 4, 8) or c.resolution < 8 or c.resolution % c.patch:
            raise ValueError(f"--resolution {c.resolution} must be >= 8 and divisible by the patch size {c.patch}")
        if not (0.0 < c.ratio < 1.0):
            raise ValueError(f"--ratio must be in (0, 1) (fraction of image tokens that skip the route), got {c.ratio}")
        if c.start is None:
            c.start = min(2, c.depth // 4)
        if c.end is None:
            c.end = -min(4, c.depth // 4 + 1)
        for name in ("start", "end"):
            v = getattr(c, name)
            if not -c.depth <= v < c.depth:
                raise ValueError(f"--{name} {v} is out of range for depth {c.depth} (valid: {-c.depth}..{c.depth - 1})")
        if c.start % c.depth > c.end % c.depth:
            raise ValueError(f"--start {c.start} comes after --end {c.end} (block {c.end % c.depth}) at depth {c.depth}")
        if c.device not in ("cpu", "cuda") and not c.device.startswith("cuda:"):
            raise ValueError(f"--device must be cpu or cuda, got {c.device!r}")
        if c.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device is available to torch")
        if c.sample_steps < 1 or c.samples_per_class < 1 or c.eval_points < 1:
            raise ValueError("--sample-steps, samples per class and eval points must be >= 1")
        if c.threads is not None and c.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {c.threads}")
        if not c.lr > 0:
            raise ValueError(f"--lr must be > 0, got {c.lr}")
        return c

    @property
    def num_tokens(self) -> int:
        """Image tokens per sample: (resolution / patch) ** 2."""
        return (self.resolution // self.patch) ** 2

    @property
    def time_limited(self) -> bool:
        """Whether a wall-clock budget applies (else only the step cap)."""
        return self.seconds is not None


# ---------------------------------------------------------------------------------------------------- data


def load_digits_dataset(resolution: int = 16, heldout: int = HELDOUT_SIZE, split_seed: int = SPLIT_SEED):
    """scikit-learn's 8x8 digits as ``(x_train, y_train, x_test, y_test)``.

    Guarantees: images are float32 ``[N, 1, resolution, resolution]`` in [-1, 1]
    (pixel values 0..16 scaled linearly, then bilinear upsampling, which stays in
    range), labels int64 in 0..9; the ``heldout`` test images are a fixed random
    subset chosen by ``split_seed`` (deterministic, disjoint from train, together
    all 1797 images). No download: the data ship with scikit-learn.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2.0 - 1.0
    if resolution != x.shape[-1]:
        x = F.interpolate(x, size=(resolution, resolution), mode="bilinear", align_corners=False)
    x = x.clamp_(-1.0, 1.0).contiguous()
    y = torch.as_tensor(d.target, dtype=torch.int64)
    if not 0 < heldout < len(x):
        raise ValueError(f"heldout={heldout} must be between 1 and {len(x) - 1}")
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(split_seed))
    test, train = perm[:heldout], perm[heldout:]
    return x[train], y[train], x[test], y[test]


def sample_t(n: int, generator: torch.Generator) -> torch.Tensor:
    """``n`` times from logit-normal(0, 1): ``sigmoid(N(0, 1))``, in (0, 1)."""
    return torch.sigmoid(torch.randn(n, generator=generator))


def make_heldout(x: torch.Tensor, y: torch.Tensor, seed: int = HELDOUT_SEED) -> dict[str, torch.Tensor]:
    """Fixed held-out batch ``{x0, y, noise, t}``: one noise draw and one ``t`` per image, from ``seed`` only."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(x.shape, generator=g)
    return {"x0": x, "y": y, "noise": noise, "t": sample_t(len(x), g)}


def _batches(x: torch.Tensor, y: torch.Tensor, batch: int, seed: int) -> Iterator[tuple[torch.Tensor, ...]]:
    """Endless ``(x0, y, noise, t)`` batches: reshuffled epochs (drop last), all drawn from one generator."""
    g = torch.Generator().manual_seed(seed)
    n = len(x)
    if batch > n:
        raise ValueError(f"--batch {batch} is larger than the training set ({n} images)")
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            idx = perm[i:i + batch]
            x0 = x[idx]
            yield x0, y[idx], torch.randn(x0.shape, generator=g), sample_t(batch, g)


# ---------------------------------------------------------------------------------------------------- objective


def _autocast(device: torch.device | str):
    dev = torch.device(device)
    return torch.autocast(device_type="cuda", dtype=torch.bfloat16) if dev.type == "cuda" else torch.autocast(
        device_type="cpu", enabled=False)


def rectified_flow_loss(model: Callable, x0: torch.Tensor, y: torch.Tensor, noise: torch.Tensor,
                        t: torch.Tensor) -> torch.Tensor:
    """Rectified-flow velocity loss: ``mean((model((1-t) x0 + t noise, 1000 t, y) - (noise - x0))^2)``.

    ``t`` is ``[B]`` in [0, 1]; the mean is over every element, computed in float32.
    """
    tb = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    xt = (1 - tb) * x0 + tb * noise
    pred = model(xt, t * 1000.0, y)
    return ((pred.float() - (noise - x0).float()) ** 2).mean()


@torch.no_grad()
def heldout_loss(model: nn.Module, heldout: dict[str, torch.Tensor], batch_size: int = 128,
                 device: torch.device | str = "cpu") -> float:
    """The rectified-flow loss on the fixed held-out batch, in eval mode, as a Python float.

    Guarantees: deterministic (fixed noise and ``t``, eval mode: no label dropout
    and, for a treadfx model, no routing: the original forward); the model's
    train/eval flags are restored; the result is the per-element mean over the
    whole held-out set, whatever ``batch_size``.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        total, count = 0.0, 0
        n = len(heldout["x0"])
        for i in range(0, n, batch_size):
            part = {k: v[i:i + batch_size].to(device) for k, v in heldout.items()}
            with _autocast(device):
                loss = rectified_flow_loss(model, part["x0"], part["y"], part["noise"], part["t"])
            total += float(loss) * part["x0"].numel()
            count += part["x0"].numel()
        return total / count
    finally:
        for m, f in flags:
            m.training = f


@torch.no_grad()
def sample(model: nn.Module, labels: torch.Tensor, noise: torch.Tensor, steps: int = 25, cfg_scale: float = 1.0,
           null_label: int | None = NUM_CLASSES, device: torch.device | str = "cpu") -> torch.Tensor:
    """Euler integration of ``dx/dt = v`` from ``t = 1`` (``noise``) to ``t = 0``, in eval mode.

    Guarantees: returns a float32 CPU tensor shaped like ``noise``; deterministic
    for given weights and noise; with ``cfg_scale != 1`` the velocity is
    ``v_null + cfg_scale * (v_label - v_null)`` using ``null_label`` (DiT's
    dropped-label class); the model's train/eval flags are restored.
    """
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        x = noise.to(device, torch.float32)
        labels = labels.to(device)
        use_cfg = cfg_scale != 1.0 and null_label is not None
        ts = torch.linspace(1.0, 0.0, steps + 1)
        for i in range(steps):
            t, dt = float(ts[i]), float(ts[i] - ts[i + 1])
            if use_cfg:
                xin = torch.cat([x, x])
                yin = torch.cat([labels, torch.full_like(labels, null_label)])
            else:
                xin, yin = x, labels
            tt = torch.full((len(xin),), t * 1000.0, device=device)
            with _autocast(device):
                v = model(xin, tt, yin).float()
            if use_cfg:
                v_cond, v_null = v.chunk(2)
                v = v_null + cfg_scale * (v_cond - v_null)
            x = x - dt * v
        return x.cpu()
    finally:
        for m, f in flags:
            m.training = f


# ---------------------------------------------------------------------------------------------------- training


def build_model(config: DemoConfig) -> DiT:
    """The demo's DiT: ``torch.manual_seed(config.seed)`` then ``DiT(...)`` (1 channel, 10 classes, velocity output).

    ``config`` must be resolved. Label dropout 0.1 into a null class enables CFG sampling.
    """
    torch.manual_seed(config.seed)
    return DiT(input_size=config.resolution, patch_size=config.patch, in_channels=1, hidden_size=config.hidden,
               depth=config.depth, num_heads=config.heads, num_classes=NUM_CLASSES, class_dropout_prob=0.1,
               learn_sigma=False)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _warm_up(model: nn.Module, config: DemoConfig) -> None:
    """One forward+backward on a dummy batch, gradients dropped: no parameter changes, no global RNG drawn."""
    device = torch.device(config.device)
    model.to(device).train()
    g = torch.Generator().manual_seed(12345)
    x0 = torch.randn(config.batch, 1, config.resolution, config.resolution, generator=g)
    batch = (x0, torch.randint(0, NUM_CLASSES, (config.batch,), generator=g), torch.randn(x0.shape, generator=g),
             sample_t(config.batch, g))
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), _autocast(device):
        rectified_flow_loss(model, *(v.to(device) for v in batch)).backward()
    _sync(device)
    for p in model.parameters():
        p.grad = None


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """The demo's torch thread count: 1 on machines with at most 2 cores (two busy threads on two shared
    cores thrash: one thread is several times faster there), else the cores left idle by the current load,
    at least 1 and at most half the cores (capped at 8). ``cores``/``load`` default to this machine's."""
    if cores is None:
        try:
            cores = len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            cores = os.cpu_count() or 1
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (AttributeError, OSError):
            load = 0.0
    if cores <= 2:
        return 1
    return max(1, min(cores // 2, 8, int(cores - load)))


class Run:
    """One training run of the demo, advanced one optimizer step at a time by :func:`interleave`.

    Guarantees: its batches (images, labels, noise, t) come from its own generator
    seeded with ``config.seed``, and torch's global RNG (label dropout) is swapped
    in and out around each step from a state seeded with ``config.seed``, so two
    runs see the same data in the same order whatever the interleaving.
    """

    def __init__(self, name: str, model: nn.Module, data: tuple[torch.Tensor, torch.Tensor], config: DemoConfig):
        self.name, self.model, self.config = name, model, config
        self.device = torch.device(config.device)
        model.to(self.device).train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=0.0)
        self.batches = _batches(data[0], data[1], config.batch, config.seed)
        cuda = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            torch.manual_seed(config.seed)
            self.rng = torch.get_rng_state()
            self.cuda_rng = torch.cuda.get_rng_state(self.device) if cuda else None
        self.steps = 0
        self.train_losses: list[float] = []

    def step(self) -> float:
        """One optimizer step on the next batch (synchronised on CUDA); returns its training loss."""
        outer = torch.get_rng_state()
        torch.set_rng_state(self.rng)
        if self.cuda_rng is not None:
            outer_cuda = torch.cuda.get_rng_state(self.device)
            torch.cuda.set_rng_state(self.cuda_rng, self.device)
        try:
            x0, yb, noise, tb = (v.to(self.device, non_blocking=True) for v in next(self.batches))
            with _autocast(self.device):
                loss = rectified_flow_loss(self.model, x0, yb, noise, tb)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            _sync(self.device)
        finally:
            self.rng = torch.get_rng_state()
            torch.set_rng_state(outer)
            if self.cuda_rng is not None:
                self.cuda_rng = torch.cuda.get_rng_state(self.device)
                torch.cuda.set_rng_state(outer_cuda, self.device)
        self.steps += 1
        self.train_losses.append(float(loss.detach()))
        return self.train_losses[-1]


def interleave(step_fns: dict[str, Callable[[], Any]], seconds: float | None, steps: int | None, *,
               clock: Callable[[], float] = time.perf_counter,
               after_step: Callable[[str, int, float], Any] | None = None) -> dict[str, Any]:
    """Run several training loops in one process, interleaved so that changing machine load hits them alike.

    Each call of ``step_fns[name]()`` is one training step of run ``name``; it is timed
    with ``clock`` and charged to that run's own clock only. Next, the unfinished run
    whose clock is smallest steps (ties: the order of ``step_fns``), so all clocks
    advance together and every run sees the same stretch of real time. A run stops
    when it has done ``steps`` steps, or (after at least one step) when one more step,
    estimated as the median of its last 5, would take its clock past ``seconds``: no
    run's clock passes the budget unless a step runs far over its estimate.
    ``after_step(name, step, clock)`` is called after each step, outside every clock
    (evaluations, progress bars). Returns ``{"order": [names in the order they
    stepped], "clock": {name: seconds}, "step_times": {name: [seconds, ...]}}``.
    """
    if seconds is None and steps is None:
        raise ValueError("interleave needs a time budget (seconds) or a step cap (steps)")
    names = list(step_fns)
    clocks = {n: 0.0 for n in names}
    times: dict[str, list[float]] = {n: [] for n in names}
    order: list[str] = []
    active = list(names)

    def finished(n: str) -> bool:
        if steps is not None and len(times[n]) >= steps:
            return True
        if seconds is not None and times[n]:
            return clocks[n] + statistics.median(times[n][-5:]) > seconds
        return False

    active = [n for n in active if not finished(n)]
    while active:
        name = min(active, key=lambda n: (clocks[n], names.index(n)))
        t0 = clock()
        step_fns[name]()
        dt = clock() - t0
        clocks[name] += dt
        times[name].append(dt)
        order.append(name)
        if after_step is not None:
            after_step(name, len(times[name]), clocks[name])
        if finished(name):
            active.remove(name)
    return {"order": order, "clock": clocks, "step_times": times}


def train_interleaved(models: dict[str, nn.Module], data: tuple[torch.Tensor, torch.Tensor],
                      heldout: dict[str, torch.Tensor], config: DemoConfig) -> dict[str, dict[str, Any]]:
    """Train every model with AdamW on the rectified-flow loss, interleaved (:func:`interleave`), same budget each.

    Guarantees: every run sees the same batches and label-dropout draws (:class:`Run`);
    each run's clock counts only its own training steps (batch, forward, backward,
    optimizer step; synchronised on CUDA), never the held-out evaluations nor the
    other runs' steps; training stops at ``config.seconds`` of a run's own clock
    (before a step that would pass it) or at ``config.steps`` steps. Afterwards the
    runs with fewer steps continue, outside the budget and unrecorded in the curve,
    up to the largest step count, so ``equal_steps`` compares all models after the
    same number of identical batches. Each record has ``steps``, ``clock_s``,
    ``step_times``, ``train_losses``, the held-out ``curve`` (``[clock_s, step,
    loss]`` at step 0, about ``config.eval_points`` times and at the end of the
    budget), ``final_loss`` (end of the budget) and ``equal_steps`` (``[step, loss]``).
    """
    device = torch.device(config.device)
    runs = {n: Run(n, m, data, config) for n, m in models.items()}
    if config.time_limited:
        interval, total = config.seconds / config.eval_points, config.seconds
    else:
        interval, total = max(1, config.steps // config.eval_points), config.steps
    curves = {n: [[0.0, 0, heldout_loss(m, heldout, device=device)]] for n, m in models.items()}
    next_eval = {n: interval for n in models}
    bar = _progress(total * len(runs), "dense + TREAD, interleaved", config)
    last_clock = {n: 0.0 for n in models}

    def after_step(name: str, step: int, clock_s: float) -> None:
        progress = clock_s if config.time_limited else step
        if bar is not None:
            bar.update(clock_s - last_clock[name] if config.time_limited else 1)
            bar.set_postfix_str(", ".join(f"{n} {r.steps} steps" for n, r in runs.items()), refresh=False)
        last_clock[name] = clock_s
        if progress >= next_eval[name]:
            curves[name].append([clock_s, step, heldout_loss(runs[name].model, heldout, device=device)])
            while next_eval[name] <= progress:
                next_eval[name] += interval

    try:
        sched = interleave({n: r.step for n, r in runs.items()}, config.seconds, config.steps,
                           after_step=after_step)
    finally:
        if bar is not None:
            bar.close()
    out: dict[str, dict[str, Any]] = {}
    for n, r in runs.items():
        cur = curves[n]
        if cur[-1][1] != r.steps:  # the end of the budget, unless the last periodic point already is
            cur.append([sched["clock"][n], r.steps, heldout_loss(r.model, heldout, device=device)])
        out[n] = {"steps": r.steps, "clock_s": sched["clock"][n], "step_times": sched["step_times"][n],
                  "train_losses": list(r.train_losses), "curve": cur, "final_loss": cur[-1][2]}
    target = max(r.steps for r in runs.values())
    for n, r in runs.items():  # equal steps: the runs behind continue, untimed, to the same step count
        while r.steps < target:
            r.step()
        out[n]["equal_steps"] = [target, out[n]["final_loss"] if r.steps == out[n]["steps"]
                                 else heldout_loss(r.model, heldout, device=device)]
    return out


def _progress(total: float, desc: str, config: DemoConfig):
    if not config.progress:
        return None
    from tqdm.auto import tqdm

    if config.time_limited:
        return tqdm(total=total, desc=desc, unit="s", file=sys.stderr, dynamic_ncols=True,
                    bar_format="{desc}: {percentage:3.0f}%|{bar}| {n:.1f}/{total:.0f} s {postfix}")
    return tqdm(total=total, desc=desc, unit="step", file=sys.stderr, dynamic_ncols=True)


def _state_checksum(model: nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.state_dict().values()))


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Train dense and TREAD, interleaved, from the same initial weights for the same budget; return a JSON-able dict.

    Result keys: ``config`` (resolved), ``model`` (description), ``route``
    (start, end as block indices, ratio, tokens kept of N), ``flops`` (fwd+bwd
    per training step from ``treadfx.inspect``: ``dense``, ``routed``,
    ``ideal_speedup``), ``threads`` (torch CPU threads used), ``dense`` and
    ``tread`` (each: ``steps``, ``median_step_s``, ``clock_s``, ``first_step_s``,
    ``init_loss``, ``final_loss`` (end of the budget: equal wall-clock when
    time-limited), ``curve``, ``train_losses`` and ``step_times`` (per budgeted step),
    ``init_checksum`` (sum of the initial state)), ``equal_steps`` (``step``: the
    larger step count, and both held-out losses there; the run with fewer steps
    continued outside the budget to reach it), ``png`` (path or ``None``),
    ``trace_s`` (treadfx's trace + analysis, before the clocks) and ``wall_s``.
    torch's thread count is restored on return.
    """
    wall0 = time.perf_counter()
    config = config.resolved()
    device = torch.device(config.device)
    threads_before = torch.get_num_threads()
    threads = config.threads if config.threads is not None else auto_threads()
    torch.set_num_threads(threads)
    try:
        return _run_demo(config, device, threads, wall0)
    finally:
        torch.set_num_threads(threads_before)


def _run_demo(config: DemoConfig, device: torch.device, threads: int, wall0: float) -> dict[str, Any]:
    x_tr, y_tr, x_te, y_te = load_digits_dataset(config.resolution)
    heldout = make_heldout(x_te, y_te)

    dense = build_model(config)
    init_state = {k: v.detach().clone() for k, v in dense.state_dict().items()}
    base = build_model(dataclasses.replace(config, seed=config.seed + 1))  # any weights: overwritten below
    base.load_state_dict(init_state)
    tread = treadfx.transform(base, start=config.start, end=config.end, ratio=config.ratio, seed=config.seed)
    init_checksums = (_state_checksum(dense), _state_checksum(tread))

    ex = (torch.zeros(config.batch, 1, config.resolution, config.resolution), torch.zeros(config.batch),
          torch.zeros(config.batch, dtype=torch.int64))
    report = treadfx.inspect(tread, *ex)
    route = report.routes[0]

    for m in (dense, tread):  # allocator / thread-pool warm-up outside the clocks (the trace ran in inspect)
        _warm_up(m, config)
    runs = train_interleaved({"dense": dense, "tread": tread}, (x_tr, y_tr), heldout, config)

    out: dict[str, Any] = {
        "config": dataclasses.asdict(config),
        "model": f"DiT depth {config.depth}, hidden {config.hidden}, {config.heads} heads, patch {config.patch} "
                 f"({config.num_tokens} tokens), {sum(p.numel() for p in dense.parameters()) / 1e6:.2f} M params",
        "data": f"sklearn digits 8x8 -> {config.resolution}x{config.resolution}, {len(x_tr)} train / "
                f"{len(x_te)} held out",
        "objective": "rectified flow, v = eps - x0, t ~ logit-normal(0, 1), AdamW lr %g" % config.lr,
        "route": {"start": route.start, "end": route.end, "depth": config.depth, "ratio": route.ratio,
                  "num_tokens": route.num_tokens, "num_keep": route.num_keep},
        "flops": {"dense": report.dense_flops, "routed": report.routed_flops, "ideal_speedup": report.ideal_speedup},
        "trace_s": report.trace_seconds,
        "threads": threads,
        "device": str(device) + (" (bf16 autocast)" if device.type == "cuda" else
                                 f" ({threads} torch thread{'s' if threads != 1 else ''}"
                                 f"{', chosen automatically' if config.threads is None else ''})"),
    }
    for name, ck in (("dense", init_checksums[0]), ("tread", init_checksums[1])):
        r = runs[name]
        out[name] = {"steps": r["steps"], "median_step_s": statistics.median(r["step_times"]),
                     "clock_s": r["clock_s"], "first_step_s": r["step_times"][0], "init_loss": r["curve"][0][2],
                     "final_loss": r["final_loss"], "curve": r["curve"], "init_checksum": ck,
                     "train_losses": r["train_losses"], "step_times": r["step_times"]}
    out["equal_steps"] = {"step": runs["dense"]["equal_steps"][0], "dense": runs["dense"]["equal_steps"][1],
                          "tread": runs["tread"]["equal_steps"][1]}
    out["png"] = None
    if config.out:
        g = torch.Generator().manual_seed(config.seed)
        k = config.samples_per_class
        labels = torch.arange(NUM_CLASSES).repeat_interleave(k)
        noise = torch.randn(len(labels), 1, config.resolution, config.resolution, generator=g)
        imgs = {name: sample(m, labels, noise, config.sample_steps, config.cfg_scale, device=device)
                for name, m in (("dense", dense), ("tread", tread))}
        plot_result(out, imgs, config.out)
        out["png"] = config.out
    out["wall_s"] = time.perf_counter() - wall0
    return out


# ---------------------------------------------------------------------------------------------------- output


def speed_label(dense_s: float, tread_s: float) -> str:
    """``"1.28x faster"`` when TREAD's step time is shorter, ``"1.05x slower"`` when longer (ratio >= 1 either way)."""
    if tread_s <= dense_s:
        return f"{dense_s / tread_s:.2f}x faster"
    return f"{tread_s / dense_s:.2f}x slower"


def format_table(result: dict[str, Any]) -> str:
    """The human-readable comparison table of a :func:`run_demo` result."""
    d, t, c, f = result["dense"], result["tread"], result["config"], result["flops"]
    r = result["route"]
    budget = f"{c['seconds']:g} s" if c["seconds"] is not None else "no time limit"
    if c["steps"] is not None:
        budget += f", at most {c['steps']} steps"
    eq = result["equal_steps"]
    rows = [
        ("steps done", f"{d['steps']}", f"{t['steps']}", f"{t['steps'] / d['steps']:.2f}x"),
        ("median step time", f"{d['median_step_s'] * 1e3:.1f} ms", f"{t['median_step_s'] * 1e3:.1f} ms",
         speed_label(d["median_step_s"], t["median_step_s"])),
        ("FLOPs/step (fwd+bwd)", f"{f['dense'] / 1e9:.2f} G", f"{f['routed'] / 1e9:.2f} G",
         f"{f['ideal_speedup']:.2f}x fewer"),
        ("held-out loss, start", f"{d['init_loss']:.4f}", f"{t['init_loss']:.4f}", ""),
        ("held-out loss, equal wall-clock" if c["seconds"] is not None and c["steps"] is None
         else "held-out loss, end of run", f"{d['final_loss']:.4f}", f"{t['final_loss']:.4f}",
         f"{t['final_loss'] - d['final_loss']:+.4f}"),
        (f"held-out loss, equal steps ({eq['step']})", f"{eq['dense']:.4f}", f"{eq['tread']:.4f}",
         f"{eq['tread'] - eq['dense']:+.4f}"),
    ]
    w0 = max(len(x[0]) for x in rows)
    lines = [
        f"treadfx demo: {result['model']}",
        f"  data: {result['data']}; {result['objective']}; batch {c['batch']}; {result['device']}",
        f"  TREAD: blocks {r['start']}..{r['end']} of {r['depth']}, ratio {r['ratio']:g} "
        f"(keep {r['num_keep']} of {r['num_tokens']} tokens); budget per model: {budget} "
        "(interleaved, each run on its own training clock; held-out evaluations excluded)",
        "",
        f"  {'':<{w0}}  {'dense':>11}  {'TREAD':>11}  TREAD vs dense",
    ]
    lines += [f"  {a:<{w0}}  {b:>11}  {x:>11}  {e}".rstrip() for a, b, x, e in rows]
    lines.append("  (held-out: fixed 297 images, fixed noise and t, eval mode; lower is better; equal steps: the run "
                 "with fewer steps continued outside the budget)")
    if result.get("png"):
        lines.append(f"  plot and samples: {result['png']}")
    return "\n".join(lines)


def plot_result(result: dict[str, Any], samples: dict[str, torch.Tensor], path: str) -> None:
    """Write a PNG: held-out loss vs training wall-clock for both runs, and the two sample grids.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change).
    ``samples`` maps ``"dense"``/``"tread"`` to ``[10 * k, 1, H, W]`` tensors, class-major.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 5), dpi=100)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(1, 3, width_ratios=[1.25, 1, 1], wspace=0.25)
    ax = fig.add_subplot(gs[0])
    for name, label, color in (("dense", "dense", "tab:blue"), ("tread", "TREAD", "tab:orange")):
        cur = result[name]["curve"]
        ax.plot([p[0] for p in cur], [p[2] for p in cur], "o-", color=color, ms=3,
                label=f"{label} ({result[name]['steps']} steps)")
    eq = result["equal_steps"]
    for name, color in (("dense", "tab:blue"), ("tread", "tab:orange")):
        ax.axhline(eq[name], color=color, ls=":", lw=1)
    ax.annotate(f"dotted: both at {eq['step']} steps", (0, min(eq["dense"], eq["tread"])), fontsize=8,
                xytext=(2, -10), textcoords="offset points")
    if result["config"]["seconds"] is not None:
        ax.set_xlim(0, result["config"]["seconds"])
    ax.set_yscale("log")
    ax.set_xlabel("training wall-clock (s)")
    ax.set_ylabel("held-out velocity loss (eval mode)")
    ax.set_title("held-out loss vs wall-clock")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    for i, (name, title) in enumerate((("dense", "dense samples"), ("tread", "TREAD samples"))):
        imgs = samples[name]
        k = len(imgs) // NUM_CLASSES
        h, w = imgs.shape[-2:]
        grid = torch.ones(NUM_CLASSES * (h + 1) - 1, k * (w + 1) - 1)
        for j, img in enumerate(imgs):
            r, cc = divmod(j, k)
            grid[r * (h + 1):r * (h + 1) + h, cc * (w + 1):cc * (w + 1) + w] = img[0].clamp(-1, 1)
        a = fig.add_subplot(gs[i + 1])
        a.imshow(grid.numpy(), cmap="gray_r", vmin=-1, vmax=1, interpolation="nearest")
        a.set_title(f"{title} (Euler {result['config']['sample_steps']} steps, CFG {result['config']['cfg_scale']:g})")
        a.set_yticks([r * (h + 1) + h / 2 for r in range(NUM_CLASSES)], [str(r) for r in range(NUM_CLASSES)])
        a.set_xticks([])
    fig.suptitle(f"treadfx demo: {result['model']}", fontsize=10)
    fig.savefig(path, format="png")


# ---------------------------------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m treadfx demo`` argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m treadfx demo",
        description="Train a small DiT dense, then with TREAD, on scikit-learn's digits for the same wall-clock "
                    "budget; print steps, step time, FLOPs and held-out loss; plot curves and samples.")
    p.add_argument("--seconds", type=float, default=None,
                   help="training wall-clock budget per model (default 60; none if only --steps is given)")
    p.add_argument("--steps", type=int, default=None, help="step cap per model (instead of or with --seconds)")
    p.add_argument("--batch", type=int, default=32, help="batch size (default 32)")
    p.add_argument("--size", default="small", choices=list(PRESETS),
                   help="model preset: " + ", ".join(f"{k} (depth {v['depth']}, hidden {v['hidden']})"
                                                     for k, v in PRESETS.items()) + " (default small)")
    p.add_argument("--depth", type=int, default=None, help="number of DiT blocks (overrides --size)")
    p.add_argument("--hidden", type=int, default=None, help="hidden size (overrides --size)")
    p.add_argument("--heads", type=int, default=None, help="attention heads (overrides --size)")
    p.add_argument("--ratio", type=float, default=0.5, help="fraction of image tokens that skip the route (0.5)")
    p.add_argument("--start", type=int, default=None, help="first routed block (default min(2, depth//4))")
    p.add_argument("--end", type=int, default=None,
                   help="last routed block, negatives from the end (default -min(4, depth//4+1))")
    p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default 2e-3)")
    p.add_argument("--cfg", type=float, default=2.0, dest="cfg_scale",
                   help="classifier-free guidance scale for the samples (1 = off; default 2)")
    p.add_argument("--sample-steps", type=int, default=25, help="Euler steps for the samples (default 25)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (cuda trains under bf16 autocast)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 on <= 2 cores, else the idle cores, at most half)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, batches, noise and routes")
    p.add_argument("--out", default="treadfx_demo.png", help="PNG path (default treadfx_demo.png)")
    p.add_argument("--no-plot", action="store_true", help="skip sampling and the PNG")
    p.add_argument("--json", action="store_true", help="print the result as JSON instead of the table")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m treadfx demo [flags]``: run the demo, print the table (or JSON); returns the exit code."""
    parser = build_parser()
    ns = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    config = DemoConfig(
        seconds=ns.seconds, steps=ns.steps, batch=ns.batch, size=ns.size, depth=ns.depth, hidden=ns.hidden,
        heads=ns.heads, ratio=ns.ratio, start=ns.start, end=ns.end, lr=ns.lr, cfg_scale=ns.cfg_scale,
        sample_steps=ns.sample_steps, device=ns.device, threads=ns.threads, seed=ns.seed, out=None if ns.no_plot else ns.out,
        progress=not ns.quiet,
    )
    try:
        config = config.resolved()
    except ValueError as e:
        parser.error(str(e))
    try:
        result = run_demo(config)
    except treadfx.TransformError as e:
        print(f"treadfx demo: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(json.dumps(result, indent=2) if ns.json else format_table(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
