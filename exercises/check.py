"""Check the exercises: each function against closed-form answers, in seconds on a CPU.

    python exercises/check.py                 # every topic, from your files in exercises/
    python exercises/check.py basics dmd      # some topics
    python exercises/check.py --json          # the same, as JSON for an autograder
    python exercises/check.py --from DIR      # grade the files <topic>.py in DIR (a student's folder)
    python exercises/check.py --reference     # the repository's own code (every check passes)

Every exercise has a fixed list of checks; each prints what it checks and, when it fails, what came
back. A function scores the fraction of its checks that pass (an untouched stub: 0), and the total is
the sum over the functions graded, out of their number. The exit code is 0 only when every check
passes, 1 otherwise, and 2 for a usage error or an error of the checker itself (which is never
counted against you; please report it).

The checker is self-contained: it uses only torch and its own closed forms (the cosine schedule, the
DDIM step, the exact denoiser of a Gaussian mixture as a perfect teacher), never the functions being
asked for. While one function is graded, the other exercises it may call (`ddim_step` inside
`pd_target`, `cfg` inside `guided`, `alpha_sigma` inside `diffuse`) are these closed forms, so each
function is graded on its own.

It is three files: this one, the command line, which runs the checks, scores them and reports;
checks.py, the checks of every exercise; closed_forms.py, the answers they expect and the stand-ins
(teacher, scores, generator) they hand to your functions.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path
from typing import NamedTuple

import torch

HERE = Path(__file__).resolve().parent
if sys.path[:1] != [str(HERE.parent)]:
    # The folder above exercises/, where the code they import lives, first: run as a script, exercises/ itself is
    # on the path, and its dmd.py and disback.py (the stubs) would shadow the reference modules of those names.
    sys.path.insert(0, str(HERE.parent))

from exercises.checks import CHECKS, CURRENT, Crash, Fail, Stub, checker_files, where  # noqa: E402
from exercises.closed_forms import BY_HAND  # noqa: E402

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


# ----------------------------------------------------------------------------------------
# Running the checks
# ----------------------------------------------------------------------------------------


class Result(NamedTuple):
    """One check's verdict on one function."""

    what: str  # what the check checks
    passed: bool
    detail: str  # what came back (numbers, or why it failed)
    status: str  # "pass", "fail", "crash", "stub", or "error" (the checker's own; not the student's)


@contextlib.contextmanager
def others_by_hand(name: str, function):
    """While `name` is graded, the other exercises it can reach by name (in its module, and in the handout's
    exercises/toolkit.py) are the checker's closed forms."""
    spaces = [getattr(inspect.unwrap(function), "__globals__", {})]  # {}: not a Python function
    toolkit = sys.modules.get("exercises.toolkit")
    if toolkit is not None:
        spaces.append(vars(toolkit))
    saved = []
    for space in spaces:
        for other, by_hand in BY_HAND.items():
            if other != name and other in space:
                saved.append((space, other, space[other]))
                space[other] = by_hand
    try:
        yield
    finally:
        for space, other, value in reversed(saved):
            space[other] = value


def run(name: str, function) -> list[Result]:
    """Every check of one exercise, each on its own: a failure or a crash in one does not stop the others.
    An untouched stub fails them all."""
    results = []
    code = getattr(inspect.unwrap(function), "__code__", None)
    CURRENT.update(name=name, file=code.co_filename if code is not None else "")
    for what, check_ in CHECKS[name]:
        torch.manual_seed(0)
        try:
            with others_by_hand(name, function):
                detail = check_(function)
            results.append(Result(what, True, detail, "pass"))
        except Stub as e:
            results += [Result(w, False, str(e), "stub") for w, _ in CHECKS[name][len(results):]]
            break
        except Fail as e:
            results.append(Result(what, False, str(e), "fail"))
        except Crash as e:
            results.append(Result(what, False, f"your code raised {e}", "crash"))
        except Exception as e:  # noqa: BLE001 - the checker's own error: never the student's
            line = where(e, checker_files())
            results.append(Result(what, False, f"error in the checker, not in your code: {type(e).__name__}: "
                                                f"{e}{line}", "error"))
    return results


def implementations(topic: str, reference: bool = False, folder: Path = HERE) -> dict:
    """{function: the student's (<folder>/<topic>.py) or, with `reference`, the repository's implementation}."""
    functions = TOPICS[topic][1]
    if reference:
        return {name: getattr(importlib.import_module(module), name) for module, name in functions}
    path = Path(folder) / f"{topic}.py"
    spec = importlib.util.spec_from_file_location(f"exercise_{topic}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return {name: getattr(module, name, None) for _, name in functions}  # None: not in the file


def grade(topics: list[str], reference: bool = False, folder: Path = HERE) -> dict:
    """Every check of every function in `topics`: {function: {"topic", "results", "passed", "checks", "score"}}."""
    report = {}
    for topic in topics:
        message = ""
        try:
            impl = implementations(topic, reference, folder)
        except Exception as e:  # noqa: BLE001 - a syntax error or a bad import in the student's file
            what = "the reference code cannot be imported (a handout?)" if reference else f"{topic}.py cannot be loaded"
            message = f"{what}: {type(e).__name__}: {e}{where(e, {str(Path(folder) / f'{topic}.py')})}"
            impl = {name: None for _, name in TOPICS[topic][1]}
        for name, function in impl.items():
            if function is None:  # the file did not load, or it has no function of that name
                why = message or f"{topic}.py has no function {name} (keep the names and signatures)"
                results = [Result(what, False, why, "crash") for what, _ in CHECKS[name]]
            else:
                results = run(name, function)
            passed = sum(r.passed for r in results)
            report[name] = {"topic": topic, "results": results, "passed": passed, "checks": len(results),
                            "score": passed / len(results)}
    return report


def summary(report: dict) -> dict:
    results = [r for entry in report.values() for r in entry["results"]]
    return {"score": round(sum(e["score"] for e in report.values()), 4), "out_of": len(report),
            "checks_passed": sum(r.passed for r in results), "checks": len(results),
            "checker_errors": sum(r.status == "error" for r in results)}


def as_json(report: dict) -> dict:
    return {**summary(report),
            "functions": {name: {"topic": e["topic"], "score": round(e["score"], 4), "passed": e["passed"],
                                 "checks": e["checks"],
                                 "results": [{"check": r.what, "passed": r.passed, "status": r.status,
                                              "detail": r.detail} for r in e["results"]]}
                          for name, e in report.items()}}


def print_report(report: dict) -> None:
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


def main(argv: list[str]) -> int:
    reference, as_json_ = "--reference" in argv, "--json" in argv
    folder, rest = HERE, []
    args = iter(argv)
    for a in args:
        if a in ("--help", "-h"):
            print(__doc__)
            return 0
        if a == "--from":
            folder = next(args, None)
            if folder is None or not Path(folder).is_dir():
                print("error: --from needs the folder of the <topic>.py files to grade"
                      + (f"; {folder} is not a folder" if folder is not None else ""))
                return 2
            folder = Path(folder)
        elif not a.startswith("-"):
            rest.append(a)
        elif a not in ("--reference", "--json"):
            print(f"error: unknown option {a}; see `python exercises/check.py --help`")
            return 2
    topics = rest or list(TOPICS)
    unknown = [t for t in topics if t not in TOPICS]
    if unknown:
        print(f"error: unknown exercise {unknown[0]!r}; choose from {', '.join(TOPICS)}")
        return 2
    torch.set_num_threads(1)  # the checks are small: one thread is faster than two that wait for each other
    report = grade(topics, reference, folder)
    if as_json_:
        print(json.dumps(as_json(report), indent=1))
    else:
        print_report(report)
    s = summary(report)
    return 2 if s["checker_errors"] else 0 if s["checks_passed"] == s["checks"] else 1


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
