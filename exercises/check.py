"""Check the exercises: each function against closed-form answers and inside the algorithm that uses it, in
seconds on a CPU.

    python exercises/check.py                 # every topic, from your files in exercises/
    python exercises/check.py basics dmd      # some topics
    python exercises/check.py --json          # the same, as JSON for an autograder
    python exercises/check.py --from DIR      # grade the files <topic>.py in DIR (a student's folder)
    python exercises/check.py --reference     # the repository's own code (every check passes)
    python exercises/check.py --time-limit 20 # seconds one check may run (default 60)

Every exercise has a fixed list of checks; each prints what it checks and, when it fails, what came
back. A function scores the fraction of its checks that pass (an untouched stub: 0), and the total is
the sum over the functions graded, out of their number. The exit code is 0 only when every check
passes, 1 otherwise, and 2 for a usage error or an error of the checker itself (which is never
counted against you; please report it).

The checker is self-contained: it uses only torch and its own closed forms (the cosine schedule, the
DDIM step, the exact denoiser of a Gaussian mixture as a perfect teacher, the algorithms written out),
never the functions being asked for. Your code is graded as it is written: a helper you wrote yourself
is the one your function calls. Where it calls another exercise from the toolkit it imports
(`ddim_step` inside `pd_target`, `cfg` inside `guided`, `alpha_sigma` inside `diffuse`), that exercise is the
checker's closed form, so each function is graded on its own; the reference answers themselves are out of
reach while your code is graded.

Each topic is graded in a process of its own, with a time limit on every check: what your code prints is
kept apart from the report (and out of --json), and a function that exits, loops forever or ends the
process fails its check, never the checker. The table of checks is read before your file is loaded. In that
process your code cannot open the reference code or /proc, reach the checker's frames or objects, or start
processes (an audit hook refuses it), and a torch function or a part of the checker it replaced is put back and
fails the check; the checker is not a sandbox (exercises/README.md).

It is three files: this one, the command line, which runs the checks in their processes, scores them
and reports; checks.py, the checks of every exercise; closed_forms.py, the answers they expect, the
stand-ins (teacher, scores, generator) they hand to your functions and the algorithms they plug them into.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
if sys.path[:1] != [str(HERE.parent)]:
    # The folder above exercises/, where the code they import lives, first: run as a script, exercises/ itself is
    # on the path, and its dmd.py and disback.py (the stubs) would shadow the reference modules of those names.
    sys.path.insert(0, str(HERE.parent))

CHECKS_MODULE = []  # checks.py once imported: the parent process, which starts the topics' processes, needs neither
# it nor torch


def the_checks():
    """checks.py (and with it torch and closed_forms.py), imported on first use."""
    if not CHECKS_MODULE:
        import exercises.checks

        CHECKS_MODULE.append(exercises.checks)
    return CHECKS_MODULE[0]

# topic: (what it covers, [(reference module, function), ...]); exercises/<topic>.py holds the functions.
TOPICS = {
    "basics": ("the cosine schedule, the DDIM step, its inversion and classifier-free guidance "
               "(docs/methods.md section 0)",
               [("common", "alpha_sigma"), ("common", "ddim_step"), ("common", "invert_ddim"), ("common", "cfg")]),
    "progressive": ("progressive distillation's target and loss weighting (PD Alg. 2; docs/methods.md section 1)",
                    [("progressive_distill", "pd_target"), ("progressive_distill", "snr_weight")]),
    "guided": ("guided distillation's stage-one target and the stochastic sampler's re-noising step "
               "(Meng et al.; docs/methods.md section 2)",
               [("guided_distill", "guided_target"), ("guided_distill", "renoise")]),
    "dmd": ("DMD's distribution-matching gradient, the fake score's loss, the K-step generator and DMD2's two GAN "
            "losses (Yin et al., DMD2; docs/methods.md section 3)",
            [("dmd", "dmd_generator_loss"), ("dmd", "fake_score_loss"), ("dmd", "generate"),
             ("dmd2", "gan_classifier_loss"), ("dmd2", "gan_generator_loss")]),
    "disback": ("DisBack's backtracking schedule of real scores (Zhang et al.; docs/methods.md section 4)",
                [("disback", "snapshot_index")]),
}
TOPIC_OF = {name: topic for topic, (_, functions) in TOPICS.items() for _, name in functions}
HOMES = {name: module for _, (_, functions) in TOPICS.items() for module, name in functions}
CHECKER_MODULES = ("exercises.check", "exercises.checks", "exercises.closed_forms")  # out of the student's reach
TIME_LIMIT = 60.0  # seconds one check (or loading a file) may run


# ----------------------------------------------------------------------------------------
# The reference answers out of reach: the exercises in the reference modules are stand-ins
# ----------------------------------------------------------------------------------------


class Exercise:
    """What an exercise's name in the reference modules (and in the handout's toolkit.py) is while a student's
    code is graded: the checker's closed form of it while another function is graded (each function on its
    own), the student's own function where there is no closed form, and an error in the function itself (the
    reference answer is not the student's)."""

    def __init__(self, name: str, folder: Path):
        self.name, self.folder, self.__name__ = name, folder, name

    def __call__(self, *args, **kwargs):
        checks = the_checks()
        if checks.CURRENT["name"] == self.name:
            raise RuntimeError(f"{self.name} of the reference code is the exercise itself and not available while "
                               "it is graded: write it")
        if self.name in checks.BY_HAND:
            return checks.BY_HAND[self.name](*args, **kwargs)
        return getattr(load(TOPIC_OF[self.name], self.folder), self.name)(*args, **kwargs)


class Guard(importlib.abc.MetaPathFinder):
    """Installed while a student's code is graded: the checker's own modules cannot be imported (their table of
    checks is out of reach), and every exercise in the reference modules, in plumbing/ and in the handout's
    toolkit.py is an `Exercise` as soon as the module is loaded. `restore()` puts everything back."""

    def __init__(self, folder: Path):
        self.folder, self.patched, self.originals = folder, [], {}

    @staticmethod
    def guarded(name: str) -> bool:
        return name in HOMES.values() or name == "exercises.toolkit" or name.startswith("plumbing.")

    def find_spec(self, fullname, path, target=None):
        if fullname in CHECKER_MODULES:
            raise ImportError(f"{fullname} is the checker's own module, not for import while your code is graded")
        if not self.guarded(fullname):
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path)
        if spec is not None and spec.loader is not None:
            spec.loader = PatchingLoader(spec.loader, self)
        return spec

    def patch(self) -> None:
        """Every exercise in the loaded guarded modules (where it lives, and where it was imported to) -> Exercise."""
        modules = {name: m for name, m in list(sys.modules.items()) if m is not None and self.guarded(name)}
        for name, home in HOMES.items():
            for module in (modules.get(home), modules.get("exercises.toolkit")):
                value = getattr(module, name, None)
                if callable(value) and not isinstance(value, Exercise):
                    self.originals[id(value)] = (name, value)
        done = {(id(module), attr) for module, attr, _ in self.patched}
        for module in modules.values():
            for attr, value in list(vars(module).items()):
                if isinstance(value, Exercise) and (id(module), attr) not in done:  # imported while its home was
                    originals = [v for n, v in self.originals.values() if n == value.name]  # patched: put back too
                    if originals:
                        self.patched.append((module, attr, originals[0]))
                elif id(value) in self.originals:
                    self.patched.append((module, attr, value))
                    setattr(module, attr, Exercise(self.originals[id(value)][0], self.folder))

    def restore(self) -> None:
        for module, attr, value in reversed(self.patched):
            setattr(module, attr, value)
        self.patched.clear()


class PatchingLoader(importlib.abc.Loader):
    """A module's own loader, then the guard's patch."""

    def __init__(self, loader, guard: Guard):
        self.loader, self.guard = loader, guard

    def create_module(self, spec):
        return self.loader.create_module(spec)

    def exec_module(self, module):
        self.loader.exec_module(module)
        self.guard.patch()

    def __getattr__(self, name):  # get_source, get_filename, ...: the module's own loader's
        return getattr(self.loader, name)


@contextlib.contextmanager
def guarded(folder: Path):
    """While a student's code is graded: the reference answers and the checker's modules out of reach."""
    the_checks()  # imported before its module is hidden
    guard = Guard(folder)
    hidden = {name: sys.modules.pop(name) for name in CHECKER_MODULES if name in sys.modules}
    sys.meta_path.insert(0, guard)
    guard.patch()
    try:
        yield guard
    finally:
        sys.meta_path.remove(guard)
        guard.restore()
        sys.modules.update(hidden)
        LOADED.clear()


# ----------------------------------------------------------------------------------------
# Running the checks
# ----------------------------------------------------------------------------------------


class Result(NamedTuple):
    """One check's verdict on one function."""

    what: str  # what the check checks
    passed: bool
    detail: str  # what came back (numbers, or why it failed)
    status: str  # "pass", "fail", "crash", "stub", "timeout", or "error" (the checker's own; not the student's)


def run(name: str, function, table: list | None = None, skip: int = 0, report=None) -> list[Result]:
    """Every check of one exercise (from `skip` on), each on its own: a failure or a crash in one does not stop
    the others. An untouched stub fails them all. `report(index, result or None)` is told when each starts and
    ends."""
    import torch

    checks = the_checks()
    results = []
    table = checks.CHECKS[name] if table is None else table
    code = getattr(inspect.unwrap(function), "__code__", None)
    checks.CURRENT.update(name=name, file=code.co_filename if code is not None else "")
    report = report or (lambda index, result: None)
    for index, (what, check_) in enumerate(table[skip:], skip):
        report(index, None)
        torch.manual_seed(0)
        try:
            result = Result(what, True, check_(function), "pass")
        except checks.Stub as e:
            stubs = [Result(w, False, str(e), "stub") for w, _ in table[index:]]
            for i, stub in enumerate(stubs, index):
                report(i, stub)
            results += stubs
            break
        except (checks.Fail, checks.WrongCall) as e:
            result = Result(what, False, str(e), "fail")
        except checks.Crash as e:
            result = Result(what, False, f"your code raised {e}", "crash")
        except Exception as e:  # noqa: BLE001 - the checker's own error: never the student's
            line = checks.where(e, checks.checker_files())
            result = Result(what, False, f"error in the checker, not in your code: {type(e).__name__}: {e}{line}",
                            "error")
        report(index, result)
        results.append(result)
    checks.CURRENT.update(name="", file="")
    return results


LOADED: dict = {}  # {(folder, topic): the student's module}, for the exercises one topic calls from another


def load(topic: str, folder: Path):
    """The student's <folder>/<topic>.py as a module of its own (not exercises.<topic>)."""
    key = (str(folder), topic)
    if key not in LOADED:
        path = Path(folder) / f"{topic}.py"
        spec = importlib.util.spec_from_file_location(f"exercise_{topic}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        LOADED[key] = module
    return LOADED[key]


def implementations(topic: str, reference: bool = False, folder: Path = HERE) -> dict:
    """{function: the student's (<folder>/<topic>.py) or, with `reference`, the repository's implementation}."""
    functions = TOPICS[topic][1]
    if reference:
        return {name: getattr(importlib.import_module(module), name) for module, name in functions}
    module = load(topic, folder)
    return {name: getattr(module, name, None) for _, name in functions}  # None: not in the file


def loaded(topic: str, reference: bool, folder: Path) -> tuple[dict, str]:
    """`implementations`, and why they are missing if the file cannot be loaded (anything it raises, also
    SystemExit, is the file's)."""
    try:
        found = implementations(topic, reference, folder)
        replaced, refused = the_checks().tampered(), the_checks().REFUSED  # at import: torch.randn = ..., a frame
        if replaced or refused:
            why = f"replaced {replaced}: leave torch and the checker as they are" if replaced else \
                f"tried what is refused: {refused[0]}"
            refused.clear()
            return {name: None for name in found}, f"{topic}.py {why} (when it was loaded)"
        return found, ""
    except BaseException as e:  # noqa: BLE001 - a syntax error, a bad import or an exit() in the student's file
        what = "the reference code cannot be imported (a handout?)" if reference else f"{topic}.py cannot be loaded"
        where_ = the_checks().where(e, {str(Path(folder) / f"{topic}.py")})
        return {name: None for _, name in TOPICS[topic][1]}, f"{what}: {type(e).__name__}: {e}{where_}"


def missing(name: str, topic: str, message: str) -> list[Result]:
    why = message or f"{topic}.py has no function {name} (keep the names and signatures)"
    return [Result(what, False, why, "crash") for what, _ in the_checks().CHECKS[name]]


def entry(topic: str, results: list[Result]) -> dict:
    passed = sum(r.passed for r in results)
    return {"topic": topic, "results": results, "passed": passed, "checks": len(results),
            "score": passed / len(results)}


def grade(topics: list[str], reference: bool = False, folder: Path = HERE) -> dict:
    """Every check of every function in `topics`, in this process: {function: {"topic", "results", "passed",
    "checks", "score"}}. `main` runs each topic in a process of its own instead (`grade_apart`)."""
    report = {}
    for topic in topics:
        with contextlib.nullcontext() if reference else guarded(folder):
            impl, message = loaded(topic, reference, folder)
            for name, function in impl.items():
                results = missing(name, topic, message) if function is None else run(name, function)
                report[name] = entry(topic, results)
    return report


# ----------------------------------------------------------------------------------------
# Each topic in a process of its own, with a time limit
# ----------------------------------------------------------------------------------------


PRELOAD = ["torch", "exercises.checks", *sorted(set(HOMES.values()))]  # imported once, before the topics' processes


def processes():
    """Where the topics' processes come from: a server process that has imported torch, the checks and the reference
    code once and forks one process per topic (forkserver), or where there is none (Windows), fresh ones."""
    import multiprocessing

    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)  # a module that is not there (the handout's reference code) is skipped
    return context


REFUSED_EVENTS = {"sys._getframe", "sys._current_frames", "sys.settrace", "sys.setprofile", "sys.addaudithook",
                  "gc.get_objects", "gc.get_referrers", "gc.get_referents", "subprocess.Popen", "os.system",
                  "os.posix_spawn", "os.fork", "os.forkpty", "os.kill", "os.killpg", "os.symlink", "os.link",
                  "signal.pthread_kill"}
REFUSED_PREFIXES = ("os.exec", "os.spawn", "ctypes.")
FRAME_ATTRIBUTES = {"tb_frame", "gi_frame", "cr_frame", "ag_frame"}  # the way from an object to the checker's frames
OPAQUE = {("collections/__init__.py", "namedtuple"), ("typing.py", "_caller"), ("enum.py", "_create_")}  # they read a
# frame and keep it


def shield() -> None:
    """In a topic's process only, before the student's file is loaded (an audit hook cannot be removed): the
    student's code cannot open the reference code (by file path, or its __pycache__), the repository's .git and
    tests/, or anything under /proc and /dev/fd (another process's stdout, this one's memory); nor get at the
    checker's frames or objects (sys._getframe, sys._current_frames, a traceback's or a generator's frame, gc's
    lists of objects, a trace, profile or audit function of its own), start or signal processes, make links, or
    use ctypes. Each is a PermissionError in the student's code. Whose code asks is read from the stack: the
    standard library's frames count as their caller's, torch's and the checker's own are not the student's."""
    import threading

    import torch

    root = HERE.parent
    modules = sorted(set(HOMES.values()))
    files = {str(root / f"{m}.py") for m in modules}
    closed = (*(str(root / "__pycache__" / f"{m}.") for m in modules), str(root / ".git") + os.sep,
              str(root / "tests") + os.sep, "/proc/", "/dev/fd/")
    stdlib = (os.path.dirname(os.__file__) + os.sep, "<frozen ")
    libraries = tuple({os.path.dirname(os.path.dirname(torch.__file__)) + os.sep, os.path.dirname(torch.__file__)})
    checker = {str(HERE / name) for name in ("check.py", "checks.py", "closed_forms.py")}
    busy = set()

    def closed_path(path) -> bool:
        path = os.fsdecode(path)
        return any(p in files or p.startswith(closed) or p in ("/proc", "/dev/fd")
                   for p in {os.path.abspath(path), os.path.realpath(path)})

    def students(frame) -> bool:
        while frame is not None:
            code = frame.f_code
            if not code.co_filename.startswith(stdlib):
                return not (code.co_filename in checker or code.co_filename.startswith(libraries))
            if any(code.co_filename.endswith(f) and code.co_name.startswith(n) for f, n in OPAQUE):
                return False
            frame = frame.f_back
        return False  # the standard library's alone (a thread's start)

    def asked_by_student() -> bool:
        me = threading.get_ident()
        if me in busy:  # the hook's own sys._getframe
            return False
        busy.add(me)
        try:
            return students(sys._getframe(2))
        finally:
            busy.discard(me)

    def refuse(why: str) -> None:
        the_checks().REFUSED.append(why)  # the check that runs fails, also if the student's code catches it
        raise PermissionError(why)

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            if args and isinstance(args[0], (str, bytes)) and closed_path(args[0]):
                why = (f"{os.fsdecode(args[0])} cannot be opened while your code is graded: the reference code, the "
                       "repository's tests and /proc are out of reach")
                if asked_by_student():
                    refuse(why)
                raise PermissionError(why)  # the checker's own (linecache, for a traceback's line): nothing shown
            return
        if event == "object.__getattr__":
            if len(args) < 2 or args[1] not in FRAME_ATTRIBUTES:
                return
        elif event not in REFUSED_EVENTS and not event.startswith(REFUSED_PREFIXES):
            return
        if asked_by_student():
            what = f"{args[1]} of a {type(args[0]).__name__}" if event == "object.__getattr__" else event
            refuse(f"{what} is not available to your code while it is graded (the checker's own frames and objects, "
                   "other processes and ctypes are out of reach)")

    sys.addaudithook(hook)


def worker(channel, topic: str, reference: bool, folder: str, skip: list[str], printed: str) -> None:
    """Grade one topic in this process and send each check's start and verdict to the parent through `channel`.
    Everything written to stdout or stderr (the student's prints) goes to the file `printed`."""
    with open(printed, "ab") as out:
        for fd in (1, 2):
            os.dup2(out.fileno(), fd)

    def send(**event):
        channel.send(event)

    import torch

    torch.set_num_threads(1)  # the checks are small: one thread is faster than two that wait for each other
    checks = the_checks()
    table = {name: list(checks.CHECKS[name]) for _, name in TOPICS[topic][1]}  # before any student code runs
    send(ready={name: [what for what, _ in listed] for name, listed in table.items()})
    for module in PRELOAD:  # imported before the shield closes their files (already, in a forkserver's process)
        with contextlib.suppress(ImportError):
            importlib.import_module(module)
    if not reference:
        shield()
    with contextlib.nullcontext() if reference else guarded(Path(folder)):
        impl, message = loaded(topic, reference, Path(folder))
        send(loaded=True)
        for name, function in impl.items():
            if name in skip:
                continue
            if function is None:
                for index, result in enumerate(missing(name, topic, message)):
                    send(result=[name, index, *result])
                continue
            run(name, function, table[name],
                report=lambda index, result, name=name: send(start=[name, index]) if result is None else
                send(result=[name, index, *result]))
    send(done=True)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # not the student's atexit handlers or threads


def grade_apart(topic: str, reference: bool = False, folder: Path = HERE,
                time_limit: float = TIME_LIMIT) -> tuple[dict, str]:
    """One topic graded in processes of its own: {function: entry}, and what the student's code printed. A check
    that runs past `time_limit` seconds, or ends the process, fails; the topic's process then starts again after
    that function."""
    names = [name for _, name in TOPICS[topic][1]]
    verdicts, skip, output, checker_error, table = {}, [], [], "", {}
    while len(skip) < len(names) and not checker_error:
        context = processes()
        with tempfile.TemporaryDirectory() as scratch:
            printed = Path(scratch) / "printed.txt"
            printed.touch()
            receiver, sender = context.Pipe(duplex=False)
            process = context.Process(target=worker, daemon=True,
                                      args=(sender, topic, reference, str(folder), skip, str(printed)))
            process.start()
            sender.close()
            phase, current, deadline, ended = "start", None, time.monotonic() + max(time_limit, 120.0), ""
            while True:
                if not receiver.poll(max(deadline - time.monotonic(), 0.0)):
                    process.kill()
                    ended = "timeout"
                    break
                try:
                    event = receiver.recv()
                except (EOFError, OSError):
                    process.join()
                    ended = f"exit code {process.exitcode}"
                    break
                if not isinstance(event, dict):
                    continue  # not the checker's
                if event.get("ready"):
                    table = table or event["ready"]  # the table of the first process: read before any student code
                    phase, deadline = "load", time.monotonic() + time_limit
                elif event.get("loaded"):
                    phase = "run"
                elif "start" in event:
                    current, deadline = tuple(event["start"]), time.monotonic() + time_limit
                elif "result" in event:
                    name, index, *result = event["result"]
                    verdicts[name, index] = Result(*result)
                    current = None
                elif event.get("done"):
                    break
            process.join(timeout=10)
            if process.is_alive():
                process.kill()
                process.join()
            receiver.close()
            output.append(printed.read_text(errors="replace"))
        done = {name for name in names if all((name, i) in verdicts for i in range(len(table.get(name, []))))}
        if not ended:
            skip = names
            break
        if phase == "start":
            checker_error = (f"the checker could not start ({ended}): "
                             + " | ".join(output[-1].strip().splitlines()[-3:]))
            break
        why = (f"stopped after {time_limit:g} s: an endless loop?" if ended == "timeout" else
               f"the process ended while your code ran ({ended}): exit() from a thread, os._exit or a crash of "
               "Python itself")
        if current is None:  # loading the file, or between two checks
            stage = "loading the file" if phase == "load" else "your code"
            for name in names:
                for i, what in enumerate(table[name]):
                    verdicts.setdefault((name, i), Result(what, False, f"{stage}: {why}", "timeout" if ended ==
                                                          "timeout" else "crash"))
            break
        name, index = current
        verdicts[name, index] = Result(table[name][index], False, why, "timeout" if ended == "timeout" else "crash")
        for i, what in enumerate(table[name][index + 1:], index + 1):
            verdicts[name, i] = Result(what, False, "not run: an earlier check of this function did not finish",
                                       "timeout" if ended == "timeout" else "crash")
        skip = sorted(done | {name} | set(skip), key=names.index)
    table = table or {name: [what for what, _ in the_checks().CHECKS[name]] for name in names}  # never started
    report = {}
    for name in names:
        results = []
        for i, what in enumerate(table[name]):
            got = verdicts.get((name, i))
            if checker_error:
                got = Result(what, False, checker_error, "error")
            elif got is None or got.what != what:  # the table is the checker's, whatever came back
                got = Result(what, False, "no verdict came back for this check", "crash")
            results.append(got)
        report[name] = entry(topic, results)
    return report, "".join(output)


# ----------------------------------------------------------------------------------------
# The report
# ----------------------------------------------------------------------------------------


def summary(report: dict) -> dict:
    results = [r for entry in report.values() for r in entry["results"]]
    return {"score": round(sum(e["score"] for e in report.values()), 4), "out_of": len(report),
            "checks_passed": sum(r.passed for r in results), "checks": len(results),
            "checker_errors": sum(r.status == "error" for r in results)}


def as_json(report: dict, printed: dict | None = None) -> dict:
    return {**summary(report),
            "functions": {name: {"topic": e["topic"], "score": round(e["score"], 4), "passed": e["passed"],
                                 "checks": e["checks"],
                                 "results": [{"check": r.what, "passed": r.passed, "status": r.status,
                                              "detail": r.detail} for r in e["results"]]}
                          for name, e in report.items()},
            "printed": {topic: text[-4000:] for topic, text in (printed or {}).items() if text}}


def print_report(report: dict, printed: dict | None = None) -> None:
    for topic, text in (printed or {}).items():
        if text.strip():
            lines = text.rstrip().splitlines()
            print(f"what your code printed while {topic} was graded"
                  + (f" (the last 20 of {len(lines)} lines)" if len(lines) > 20 else "") + ":")
            print("\n".join(f"  | {line}" for line in lines[-20:]))
    for name, entry in report.items():
        print(f"{entry['topic']}.{name}: {entry['passed']}/{entry['checks']} checks")
        results = entry["results"]
        if len({(r.status, r.detail) for r in results}) == 1 and not results[0].passed:  # a stub, or a file not loaded
            print(f"  FAIL  {results[0].detail}")
            continue
        for r in results:
            mark = {"pass": "pass", "error": "ERROR"}.get(r.status, "FAIL")
            print(f"  {mark:5} {r.what}" + (f"\n        {r.detail}" if r.detail and not r.passed else ""))
    s = summary(report)
    print(f"score {s['score']:.2f} / {s['out_of']} (each function counts 1); "
          f"{s['checks_passed']} of {s['checks']} checks passed")
    if s["checker_errors"]:
        print(f"{s['checker_errors']} checks hit an error in the checker itself (not counted as yours; please report)")


@contextlib.contextmanager
def report_later():
    """While the topics are graded, this process's stdout (fd 1, which the processes it starts inherit) is a scratch
    file: graded code that writes to it (through /proc/<pid>/fd/1) cannot reach the report, written after."""
    sys.stdout.flush()
    saved = os.dup(1)
    try:
        with tempfile.TemporaryFile() as scratch:
            os.dup2(scratch.fileno(), 1)
            yield
    finally:
        os.dup2(saved, 1)
        os.close(saved)


def main(argv: list[str]) -> int:
    reference, as_json_ = "--reference" in argv, "--json" in argv
    folder, rest, time_limit = HERE, [], TIME_LIMIT
    args = iter(argv)
    for a in args:
        if a in ("--help", "-h"):
            print(__doc__)
            return 0
        if a == "--from":
            folder = next(args, None)
            if folder is None or not Path(folder).is_dir():
                print("error: --from needs the folder of the <topic>.py files to grade"
                      + (f"; {folder} is not a folder" if folder is not None else ""), file=sys.stderr)
                return 2
            folder = Path(folder).resolve()
            if not any((folder / f"{t}.py").exists() for t in TOPICS):  # a wrong folder, not a failing student
                hint = (f"a handout's are in {folder / 'exercises'}" if (folder / "exercises").is_dir()
                        else f"name the folder that holds them ({', '.join(f'{t}.py' for t in TOPICS)})")
                print(f"error: --from {folder} holds no <topic>.py; {hint}", file=sys.stderr)
                return 2
        elif a == "--time-limit":
            value = next(args, "")
            try:
                time_limit = float(value)
                assert 1 <= time_limit <= 3600  # below a second even the reference would time out
            except (ValueError, AssertionError):
                print(f"error: --time-limit needs a number of seconds from 1 to 3600, got {value!r}", file=sys.stderr)
                return 2
        elif not a.startswith("-"):
            rest.append(a)
        elif a not in ("--reference", "--json"):
            print(f"error: unknown option {a}; see `python exercises/check.py --help`", file=sys.stderr)
            return 2
    topics = rest or list(TOPICS)
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        print(f"error: unknown exercise {unknown[0]!r}; choose from {', '.join(TOPICS)}", file=sys.stderr)
        return 2
    with report_later(), ThreadPoolExecutor(max_workers=min(len(topics), os.cpu_count() or 1)) as pool:
        graded = list(pool.map(lambda topic: grade_apart(topic, reference, folder, time_limit), topics))
    report = {name: e for entries, _ in graded for name, e in entries.items()}
    printed = {topic: text for topic, (_, text) in zip(topics, graded)}
    if as_json_:
        print(json.dumps(as_json(report, printed), indent=1))
    else:
        print_report(report, printed)
    s = summary(report)
    return 2 if s["checker_errors"] else 0 if s["checks_passed"] == s["checks"] else 1


if __name__ == "__main__":
    try:
        raise SystemExit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
