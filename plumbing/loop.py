"""Run management for every training loop, so that a method file shows only its update:

    loop = Loop(out / "progress.pt", config, phase="round 32", total=iterations, desc="PD 64->32",
                state={"model": student, "opt": opt, "stream": stream})
    for step in loop:                  # resumes, draws a progress bar, checkpoints every ckpt_every
        ...the update...
        loop.log(loss=loss, **loss_by_t_bucket(per_example, t))   # a log line every log_every

What it takes care of:
- resuming: a checkpoint of the same `phase` at `path` restores every object in `state` (modules,
  optimisers, EMA, batch streams: anything with `state_dict`), the RNGs, `loop.extra`, the step,
  and the log exactly as it was (a killed run's later lines are dropped, none is repeated);
  a checkpoint made with other settings (`keys` of the config) is refused with one line;
- checkpoints, written atomically every `ckpt_every` updates, and also whenever `ckpt_seconds` have
  passed since the last one (and after the last update when `checkpoint_at_end`), holding tensors and
  plain values only; a killed run loses minutes, not the run;
- Ctrl-C: the update under way ends, a checkpoint is written, then the run stops (a second Ctrl-C
  stops it at once);
- the run folder, held by this run alone (plumbing/folders.py's `hold`);
- a progress bar (`loop.show(...)` sets its postfix) and `loop.write(...)` for a line beside it;
- `loop.due(every)`: true after every `every`-th update and after the last one;
- `loop.extra`: plain data (histories, timers) that travels with the checkpoint;
- `loop.seconds`: training time, not counting the blocks run `with loop.off_the_clock():`, whose
  time is `loop.eval_seconds` (evaluation's share of the run, reported beside it);
- a projected wall time for the whole run, printed once after a short warm-up.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from pathlib import Path

import torch

from plumbing import distributed
from plumbing.errors import UserError
from plumbing.folders import check_start, check_teacher_path, hold
from plumbing.training import (LogWriter, check_compatible, load_checkpoint, progress, read_json, rng_state,
                               save_checkpoint, seed_everything, set_rng_state, write_json)


class Loop:
    """`resume`: None continues a checkpoint at `path` if there is one; True continues one, which must be there
    (--resume); False starts afresh and refuses to overwrite one. `log`: a LogWriter the caller shares, or
    where to write the log (default: beside the checkpoint). `rerun`: how to continue after Ctrl-C; `new_run`: how
    to start another run instead of this one (default: --out-dir, or --tag where the config has one)."""

    def __init__(self, path, config: dict, phase: str, total: int, state: dict, desc: str, keys=(),
                 log: LogWriter | Path | None = None, checkpoint_at_end: bool = False, ckpt_every: int | None = None,
                 resume: bool | None = None, kind: str = "progress", shared: bool = False,
                 rerun: str = "rerun the command with --resume to continue", new_run: str | None = None):
        self.path, self.config, self.phase, self.total = Path(path), config, phase, total
        self.state, self.desc, self.keys, self.kind, self.shared = state, desc, keys, kind, shared
        hold(self.path.parent)  # before anything is written there
        check_start(self.path.parent, self.path.exists(), resume,
                    new_run or ("--tag or --out-dir" if config.get("tag") is not None else "--out-dir"))
        if not isinstance(log, LogWriter):
            log = LogWriter(log or self.path.parent / "log.jsonl", resume=self.path.exists())
        self.log_writer, self.rerun = log, rerun
        self.checkpoint_at_end, self.ckpt_every = checkpoint_at_end, ckpt_every or config["ckpt_every"]
        self.ckpt_seconds = config.get("ckpt_seconds", math.inf)
        self.extra: dict = {}  # plain data saved with each checkpoint
        self.more: dict = {}  # fixed entries of every checkpoint, set by the caller
        self.step, self.index, self.seconds, self.eval_seconds, self._paused = 0, 0, 0.0, 0.0, 0.0
        self.resumed = self._restore()
        for obj in state.values():  # under torchrun every rank starts from rank 0's networks
            module = obj if isinstance(obj, torch.nn.Module) else getattr(obj, "model", None)
            if isinstance(module, torch.nn.Module):
                distributed.broadcast(module)

    # -- resume and checkpoints ----------------------------------------------------------

    def _restore(self) -> bool:
        if not self.path.exists():
            return False
        saved = load_checkpoint(self.path, f"{self.desc} checkpoint")
        if saved.get("phase") != self.phase:
            if self.shared:  # a progress file the stages share holds an earlier stage's progress: start afresh
                return False
            raise UserError(f"{self.path} is not a {self.desc} checkpoint of this version (it holds "
                            f"{saved.get('kind')!r}, {saved.get('phase')!r}); move it away or pass another --out-dir")
        check_compatible(saved["config"], self.config, self.keys, f"{self.desc} checkpoint", self.path)
        if saved["step"] > self.total:  # resumed with a smaller budget than it has run: nothing would be true
            raise UserError(f"{self.path} has {saved['step']} updates, more than the {self.total} this run asks for; "
                            f"ask for at least {saved['step']} to continue it, or pass another --out-dir")
        for name, obj in self.state.items():
            obj.load_state_dict(saved[name])
        set_rng_state(saved["rng"])
        if distributed.world() > 1:  # rank 0's RNG state is the one saved: each rank its own stream again
            seed_everything(self.config["seed"] + 7919 * saved["step"])
        self.log_writer.restore(saved["log"])
        self.step, self.seconds, self.extra = saved["step"], saved["seconds"], saved["extra"]
        self.eval_seconds = saved.get("eval_seconds", 0.0)
        self.saved = saved
        if self.step < self.total:
            print(f"resuming {self.desc} at update {self.step}")
        return True

    def checkpoint(self) -> None:
        """Save everything the loop resumes from, and the caller's fixed entries `more` (e.g. the teacher's
        fingerprint)."""
        save_checkpoint(self.path, {"kind": self.kind, "phase": self.phase, "config": self.config,
                                    "step": self.step, "seconds": self.seconds, "eval_seconds": self.eval_seconds,
                                    "extra": self.extra,
                                    **{name: obj.state_dict() for name, obj in self.state.items()},
                                    "rng": rng_state(), "log": self.log_writer.records(), **self.more})

    # -- the loop ------------------------------------------------------------------------

    def __iter__(self):
        self.bar = progress(range(self.step, self.total), self.desc, initial=self.step, total=self.total)
        projection = Projection(self.step, self.total)
        saved_at = time.monotonic()
        with self.stop_between_updates():
            for index in self.bar:
                self.index, self._paused, tick = index, 0.0, time.perf_counter()
                yield self.index
                self.step = self.index + 1
                self.seconds += time.perf_counter() - tick - self._paused
                if (line := projection.update(self.step, time.perf_counter() - tick - self._paused)) is not None:
                    self.write(f"{self.desc}: {line}")
                last = self.step == self.total
                due = self.step % self.ckpt_every == 0 or time.monotonic() - saved_at >= self.ckpt_seconds
                if (due and not last) or (last and self.checkpoint_at_end) or self.stopping:
                    self.checkpoint()
                    saved_at = time.monotonic()
                if self.stopping:
                    raise KeyboardInterrupt(f"{self.desc} saved at update {self.step} in {self.path}; {self.rerun}")
        self.bar.close()

    @contextlib.contextmanager
    def stop_between_updates(self):
        """Within it, Ctrl-C sets `stopping`: the update under way ends and is saved, then the loop stops. A second
        Ctrl-C stops at once. (Only where Python's own handler is in place, in one process.)"""
        self.stopping = False
        previous = signal.getsignal(signal.SIGINT)
        if (previous is not signal.default_int_handler or distributed.world() > 1
                or threading.current_thread() is not threading.main_thread()):
            yield
            return

        def stop(signum, frame):
            self.stopping = True
            signal.signal(signal.SIGINT, previous)
            self.write("Ctrl-C: stopping after this update, with a checkpoint (Ctrl-C again to stop at once)")

        signal.signal(signal.SIGINT, stop)
        try:
            yield
        finally:
            signal.signal(signal.SIGINT, previous)

    def due(self, every: int) -> bool:
        """Inside the loop: whether this update is an `every`-th one, or the last."""
        n = self.index + 1
        return n % every == 0 or n == self.total

    # -- logs and the bar ----------------------------------------------------------------

    def log(self, **values) -> None:
        """One JSON line {"step": updates done, **values} every `log_every` updates and after the last."""
        if self.due(self.config["log_every"]):
            values = distributed.mean_over_ranks(values)  # under torchrun: the losses of the global batch
            values = {k: (v.item() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}
            self.log_writer.write({"step": self.index + 1, **values})
            self.show(**{k: v for k, v in values.items() if k.startswith("loss")})

    def show(self, **values) -> None:
        self.bar.set_postfix({k: f"{v:.4g}" if isinstance(v, float) else v for k, v in values.items()})

    def write(self, line: str) -> None:
        self.bar.write(line)

    @contextlib.contextmanager
    def off_the_clock(self):
        """Evaluation: not counted in `loop.seconds`, but in `loop.eval_seconds`."""
        tick = time.perf_counter()
        try:
            yield
        finally:
            self._paused += time.perf_counter() - tick
            self.eval_seconds += time.perf_counter() - tick


class Projection:
    """The run's remaining wall time, told once: after `warmup` updates (compilation, caches), the
    following updates are timed until `seconds` of them have passed (or `updates` of them), and the
    rate is projected onto the updates left. Evaluation is not in it (it is off the clock)."""

    def __init__(self, start: int, total: int, warmup: int = 3, seconds: float = 10.0, updates: int = 200):
        self.start, self.total, self.warmup, self.seconds, self.updates = start, total, warmup, seconds, updates
        self.timed, self.count, self.done = 0.0, 0, False

    def update(self, step: int, seconds: float) -> str | None:
        if self.done or step - self.start <= self.warmup:
            return None
        self.timed, self.count = self.timed + seconds, self.count + 1
        if self.timed < self.seconds and self.count < self.updates:
            return None
        self.done = True
        rate, left = self.count / self.timed, self.total - step
        return (f"{rate:.3g} updates/s; the {left} updates left take about {duration(left / rate)} "
                f"(training only), ending around {time.strftime('%H:%M', time.localtime(time.time() + left / rate))}")


def duration(seconds: float) -> str:
    """'45 s', '12 min', '3.5 h', '2.1 days'."""
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 172800 else f"{seconds / 86400:.1f} days"


class Ladder:
    """A run whose stages each end in a saved model: progressive distillation's rounds, guided
    distillation's stage one and rounds. `ladder.stage(name, train, load)` loads a finished stage
    instead of training it again; an interrupted one resumes from its own progress checkpoint (its
    `Loop`), with the log as it was when the last finished stage ended. `ladder.metrics` is the
    run's metrics.json, kept across a resume; `ladder.save_metrics()` writes it. `ladder.teacher` (the first
    teacher's fingerprint, set by the caller) is saved with every stage, so a student knows its teacher."""

    def __init__(self, out: Path, config: dict, resume: bool):
        self.out, self.config = Path(out), config
        hold(self.out)
        started = any(self.out.glob("*.pt"))  # with --resume, a log is enough: killed before a checkpoint
        check_start(self.out, started or (resume and (self.out / "log.jsonl").exists()), resume)
        if resume and not started:
            print(f"note: the run in {self.out} was stopped before its first checkpoint; it starts at update 0")
        self.metrics = read_json(self.out / "metrics.json") if resume else {}
        self.log = LogWriter(self.out / "log.jsonl", resume=resume)
        self.logged: list = []  # the log as it was when the last finished stage ended
        self.teacher: str | None = None

    def stage(self, name: str, train, load, **saved):
        """(model, seconds) of stage `name`: `load(path)` if it has finished, otherwise `train()` -> (model,
        seconds), then saved as <out>/<name>.pt with `saved` (e.g. its step count) and the log. The seconds
        are its Loop's: training only (what ran off the clock is not in them), an interrupted stage's
        time up to its last checkpoint included."""
        path, progress = self.out / f"{name}.pt", self.out / "progress.pt"
        if path.exists():
            state = load_checkpoint(path, f"{name} checkpoint")
            if self.teacher and state.get("teacher") not in (None, self.teacher):  # (None: made before students knew)
                raise UserError(f"{path} was distilled from another teacher (weights {state['teacher']}, this run's "
                                f"are {self.teacher}); pass the --teacher it was made from, or another --out-dir")
            self.logged = state["log"]
            return load(path), state.get("seconds", state.get("round_time_s", 0.0))  # (older files)
        if progress.exists():  # an interrupted stage goes on only from the teacher it started from
            check_teacher_path(load_checkpoint(progress, f"{name} progress checkpoint")["config"].get("teacher"),
                               self.config, progress)
        self.log.restore(self.logged)  # drop an interrupted stage's lines (its Loop restores its checkpoint's)
        model, seconds = train()
        self.logged = self.log.records()
        save_checkpoint(path, {"kind": name, "config": self.config, **saved, "model": model.state_dict(),
                               "seconds": seconds, "log": self.logged,
                               "teacher": self.teacher})
        (self.out / "progress.pt").unlink(missing_ok=True)
        return model, seconds

    def save_metrics(self) -> None:
        write_json(self.out / "metrics.json", self.metrics)
