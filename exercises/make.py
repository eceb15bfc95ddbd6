"""Write the exercise files from the repository's own code, so that they cannot drift from it.

Each exercise is a function of the reference code whose body sits between nbgrader's markers,
`### BEGIN SOLUTION` and `### END SOLUTION`. This script copies the function (decorators, signature,
docstring) into `exercises/<topic>.py` with that body replaced by a stub that raises
"not implemented yet", and imports whatever else the body may use from the reference modules.

    python exercises/make.py                  # rewrite the exercise files that are unedited
    python exercises/make.py --force          # also overwrite edited ones (their answers are lost)
    python exercises/make.py --check          # exit 1 if a file differs from what would be written
    python exercises/make.py --handout DIR    # a student copy without the answers (below)
    python exercises/make.py --handout DIR --force   # also over a handout with answers in it (they are lost)

An exercise file carries the fingerprint of the text make.py wrote; a file whose text no longer matches
it has been edited (someone's answers), and make.py leaves it alone unless told `--force`.

The handout, DIR/, holds DIR/README.md and DIR/exercises/: the stubs, the checker (its three files,
CHECKER: check.py, checks.py and closed_forms.py, which need only torch and use their own closed forms)
and toolkit.py, the helpers that the stubs import (copied from the reference code: `diffuse`, `bcast`,
`guided`, ...). No reference body is in it: where a helper calls an exercise (`diffuse` calls
`alpha_sigma`), toolkit.py calls the student's own function. make.py never writes a handout into the
repository, and never over stubs that have been edited (answers) unless told `--force`.

Errors go to stderr as one line `error: ...`, with exit status 2 (a bad argument, or files it refuses to
overwrite); `--check` exits 1 when a file differs.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import importlib
import inspect
import re
import sys
import textwrap
import types
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from exercises.check import TOPICS  # noqa: E402

BEGIN, END = "### BEGIN SOLUTION", "### END SOLUTION"
REFERENCE_MODULES = ("common", "dmd", "dmd2", "guided_distill", "progressive_distill", "disback")
EXERCISES = {name: (module, topic) for topic, (_, functions) in TOPICS.items() for module, name in functions}
CHECKER = ("check.py", "checks.py", "closed_forms.py")  # the checker's files, copied into the handout as they are
FINGERPRINT = re.compile(r"fingerprint ([0-9a-f]{12})")
PLACEHOLDER = "fingerprint ............"

# Shapes and a hint for each exercise, written above its stub.
HINTS = {
    "alpha_sigma": ["t is a float or a tensor of any shape; return two tensors of its shape.",
                    "_as_time(t) makes an fp32 tensor of it; clamp alpha at 0."],
    "ddim_step": ["x_hat, z_t: (B, ...); t, s: floats or (B,) tensors. _coeffs(t, z_t) gives alpha_t,",
                  "sigma_t shaped to broadcast against z_t. First the noise the step keeps: eps_hat."],
    "invert_ddim": ["z_t, z_s: (B, ...); t, s: floats or (B,) tensors (_coeffs). Solve the DDIM step",
                    "z_s = alpha_s x + sigma_s (z_t - alpha_t x) / sigma_t for x."],
    "cfg": ["w is a float or a (B,) tensor: bcast(_as_time(w, x_cond), x_cond) shapes it for x (B, ...)."],
    "pd_target": ["t (B,) on the student's N-step grid: t' = t - 0.5 / N, t'' = t - 1 / N. Two teacher DDIM",
                  "steps (ddim_step), then invert_ddim from z_t to z_t''. No gradient reaches the teacher."],
    "snr_weight": ["SNR = exp(logsnr(t)); truncated-snr is max(SNR, 1), snr+1 is SNR + 1; other names are errors."],
    "guided_target": ["guided(teacher, w, teacher.null_label) makes a guided denoiser (two calls of the teacher);",
                      "w is a float or a (B,) tensor."],
    "renoise": ["s < t are floats; alpha_sigma(s), alpha_sigma(t). The variance of z_t given z_s is",
                "sigma_t^2 - (alpha_t / alpha_s)^2 sigma_s^2."],
    "dmd_generator_loss": ["Draw t ~ U[DM_T_MIN, DM_T_MAX] (one per sample) and eps ~ N(0, I) when not given; both",
                           "scores without gradient, at x_t = diffuse(x, t, eps), with the given labels; the",
                           "normaliser per sample over all but the batch dimension, clamped at NORMALISER_EPS",
                           "(adding it passes too); the loss's gradient in x is grad / x.numel() (a mean)."],
    "fake_score_loss": ["Alg. 1's loss (diffusion_loss) on the generator's samples, with no gradient into them."],
    "generate": ["times = generator_times(steps); predict x at each t_k (t as a (B,) tensor); re-noise it with",
                 "diffuse to the next time with fresh noise (torch.randn_like) at every step; with first=k",
                 "return (z, t_k) before step k."],
    "gan_classifier_loss": ["Logits (B,) of D = sigmoid(logit). -log sigmoid(l) = softplus(-l) and",
                            "-log(1 - sigmoid(l)) = softplus(l) stay finite where the logs would not."],
    "gan_generator_loss": ["The generator raises D(fake): -log D, not log(1 - D), whose gradient vanishes where",
                           "D is sure (F.softplus)."],
    "snapshot_index": ["N - 1 for the first `interval` updates, then one less every `interval`, never below 0."],
}


def global_names(source: str) -> set[str]:
    """The names a function's or class's source reads that are neither its own, its arguments nor builtins."""
    tree = ast.parse(textwrap.dedent(source))
    node = tree.body[0]
    local = {a.arg for a in ast.walk(node) if isinstance(a, ast.arg)} | {node.name}
    local |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
    used = {n.id for n in ast.walk(node) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return used - local - set(dir(builtins))


def stub(function, topic: str, answer: bool = False) -> tuple[str, set[str]]:
    """The function's source with its marked body replaced by a stub (or, with `answer`, kept without the
    markers), and the global names it uses."""
    source = inspect.getsource(function)
    lines = source.splitlines(keepends=True)
    begin = next(i for i, line in enumerate(lines) if line.strip() == BEGIN)
    end = next(i for i, line in enumerate(lines) if line.strip() == END)
    indent = lines[begin][: len(lines[begin]) - len(lines[begin].lstrip())]
    hint = [f"{indent}# Hint: {line}\n" for line in HINTS.get(function.__name__, ())]
    pad = indent + " " * len("raise NotImplementedError(")
    raise_ = (f'{indent}raise NotImplementedError("not implemented yet: write {function.__name__} in '
              f'exercises/{topic}.py,"\n{pad}" then run `python exercises/check.py {topic}`")\n')
    lines[begin:end + 1] = lines[begin + 1:end] if answer else [*hint, raise_]
    tree = ast.parse(source)
    fn = tree.body[0]
    local = {a.arg for a in ast.walk(fn.args) if isinstance(a, ast.arg)} | {fn.name}
    used = {n.id for n in ast.walk(fn) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    return "".join(lines), used - local - set(dir(builtins))


def solution(name: str) -> str:
    """The reference body of exercise `name`, between its markers (dedented)."""
    source = inspect.getsource(getattr(importlib.import_module(EXERCISES[name][0]), name))
    return textwrap.dedent(source.split(BEGIN, 1)[1].split(END, 1)[0].split("\n", 1)[1].rsplit("\n", 1)[0])


def imported(module, ref: str):
    """What `ref` in `module` is: ("module", name), or ("object", the module it comes from)."""
    obj = getattr(module, ref)
    if isinstance(obj, types.ModuleType):
        return "module", obj.__name__
    origin = getattr(obj, "__module__", None) if callable(obj) else None
    at_home = origin in REFERENCE_MODULES or str(origin).startswith("plumbing.")  # imported from where it lives
    return "object", origin if at_home else module.__name__


def module_line(alias: str, name: str) -> str:
    return f"import {name}" if alias == name else f"import {name} as {alias}"


def render(topic: str, handout: bool = False, answers: bool = False) -> str:
    """exercises/<topic>.py: the stubs (or, with `answers`, the reference bodies), with the imports they need
    from the reference modules, or in the handout from exercises/toolkit.py."""
    about, functions = TOPICS[topic]
    bodies, imports, modules = [], {}, {}
    for module_name, name in functions:
        module = importlib.import_module(module_name)
        text, used = stub(getattr(module, name), topic, answers)
        bodies.append(text)
        for ref in sorted(used):
            if getattr(module, ref, None) is None:
                continue
            kind, source = imported(module, ref)
            if kind == "module":
                modules[ref] = source
            else:
                imports.setdefault("exercises.toolkit" if handout else source, set()).add(ref)
    names = {name for _, name in functions}
    title = textwrap.fill(f"Exercises: {about}.", 100)
    origin = ("Part of the handout: everything imported below is in exercises/toolkit.py and may be used;\n"
              "the exercises it needs from other files are yours. Keep the signatures.\n" if handout else
              f"Generated by `python exercises/make.py` from the repository's own code ({PLACEHOLDER}:\n"
              "make.py rewrites this file only while it is unedited, or with --force). Keep the signatures;\n"
              "everything imported below is the reference code and may be used.\n")
    header = [f'"""{title}\n\nWrite the body of each function below from its docstring, then check it:\n\n'
              f"    python exercises/check.py {topic}        (or: python exercises/{topic}.py)\n\n"
              f'{origin}"""\n\n',
              "from __future__ import annotations\n\nimport sys\nfrom pathlib import Path\n\n"
              "sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the folder above exercises/\n\n"]
    header += [f"{module_line(alias, m)}  # noqa: E402, F401\n" for alias, m in sorted(modules.items())]
    header.append("\n" if modules else "")
    for source in sorted(imports):
        refs = sorted(imports[source] - names)
        if refs:
            header.append(f"from {source} import {', '.join(refs)}  # noqa: E402, F401\n")
    footer = (f'\n\nif __name__ == "__main__":  # python exercises/{topic}.py: check this file\n'
              "    from exercises.check import main\n\n"
              f'    raise SystemExit(main(["{topic}"]))\n')
    text = "".join(header) + "\n\n" + "\n\n".join(bodies) + footer
    return text if handout else text.replace(PLACEHOLDER, f"fingerprint {digest(text)}")


def digest(text: str) -> str:
    return hashlib.sha256(FINGERPRINT.sub(PLACEHOLDER, text).encode()).hexdigest()[:12]


def unedited(text: str) -> bool:
    """Whether an exercise file is still the text make.py wrote (its fingerprint matches)."""
    found = FINGERPRINT.search(text)
    return found is not None and found.group(1) == digest(text)


def toolkit() -> str:
    """exercises/toolkit.py of the handout: every helper the stubs import, copied from the reference code with
    what it needs in turn; an exercise that a helper calls is a forwarder to the student's function."""
    queue = []
    for topic, (_, functions) in TOPICS.items():
        for module_name, name in functions:
            module = importlib.import_module(module_name)
            queue += [(ref, module_name) for ref in stub(getattr(module, name), topic)[1]
                      if getattr(module, ref, None) is not None]
    modules, constants, definitions, forwarders, seen = {}, {}, {}, {}, set()
    while queue:
        ref, module_name = queue.pop()
        if ref in seen:
            continue
        seen.add(ref)
        module = importlib.import_module(module_name)
        obj = getattr(module, ref, None)
        if obj is None:
            continue
        if ref in EXERCISES:
            forwarders[ref] = EXERCISES[ref][1]
        elif isinstance(obj, types.ModuleType):
            modules[ref] = obj.__name__
        elif inspect.isfunction(obj) or inspect.isclass(obj):
            home = obj.__module__
            source = inspect.getsource(obj)
            assert BEGIN not in source, f"{ref} holds a solution"
            definitions[ref] = source
            queue += [(name, home) for name in global_names(source)]
        else:
            constants[ref] = repr(obj)
    lines = ['"""The helpers that the exercises may use, copied from the reference code of the repository.\n\n'
             "The exercises themselves are not here: where a helper needs one (`diffuse` calls `alpha_sigma`,\n"
             "`guided` calls `cfg`), it calls yours, from exercises/<topic>.py.\n"
             '"""\n\nfrom __future__ import annotations\n\n']
    lines += [module_line(alias, m) + "\n" for alias, m in sorted(modules.items(), key=lambda kv: kv[1])]
    lines += ["\n"] + [f"{name} = {value}\n" for name, value in sorted(constants.items())]
    for name, topic in sorted(forwarders.items()):
        lines.append(f'\n\ndef {name}(*args, **kwargs):\n    """Yours: `{name}` from exercises/{topic}.py."""\n'
                     f"    from exercises.{topic} import {name} as yours\n\n    return yours(*args, **kwargs)\n")
    lines += [f"\n\n{definitions[name]}" for name in sorted(definitions)]
    return "".join(lines)


HANDOUT_README = """# Exercises: write the heart of each paper, get a verdict in seconds

Fourteen functions at the core of progressive distillation, guided distillation, DMD and DisBack, each
to be written from its signature and docstring (the equation, the shapes, a hint) in
`exercises/<topic>.py`. A checker grades them against its own closed-form answers, and inside the
algorithm that uses them, on a CPU in a few seconds: no GPU, no training, only PyTorch (`pip install torch`).

```bash
python exercises/check.py basics         # after writing the functions in exercises/basics.py
python exercises/check.py                # every topic
python exercises/check.py --json         # the same for an autograder
```

{table}

Each function has a fixed list of checks and scores the fraction that passes (an untouched stub
scores 0); the total is out of the number of functions graded. The exit code is 0 only when every
check passes. A crash in your code is reported with its line, and the other checks still run; so does
a function that loops forever (each check has a time limit, `--time-limit SECONDS`) or calls exit().
Your function must leave its inputs as they are, keep their dtype and device, and draw fresh noise
for every entry and every call: the checks look at each.

Each function is graded on its own: while the checker grades `pd_target`, the `ddim_step` it imports
from toolkit.py is the checker's own (a helper you write yourself is yours). In your code it is yours:
`exercises/toolkit.py` holds the helpers you may use (`diffuse`, `bcast`, `guided`, ...), and where one
needs an exercise (`diffuse` needs `alpha_sigma`) it calls your function. Write `basics` first.
"""


class Refused(Exception):
    """make.py will not write there (the message says why and what to do)."""


def handout(folder: Path, force: bool = False) -> list[Path]:
    """Write the student copy to `folder`: README.md and exercises/ (stubs, checker, toolkit). Never into the
    repository, and, unless `force`, never over a stub or README.md that differs from what it writes (a
    student's answers)."""
    if not str(folder).strip():
        raise Refused("--handout is empty; give a folder for the handout")
    folder = Path(folder).expanduser().resolve()
    out = folder / "exercises"
    if folder == ROOT or ROOT in folder.parents:
        raise Refused(f"{folder} is inside the repository; give a folder outside it for the handout")
    if folder.exists() and not folder.is_dir() or out.exists() and not out.is_dir():
        raise Refused(f"{folder} is a file, not a folder; give a folder for the handout")
    rows = ["| topic | functions | what it covers |", "|---|---|---|"]
    rows += [f"| `{topic}` | {', '.join(f'`{n}`' for _, n in fs)} | {about} |" for topic, (about, fs) in TOPICS.items()]
    written = {out / f"{topic}.py": render(topic, handout=True) for topic in TOPICS}
    written[folder / "README.md"] = HANDOUT_README.format(table="\n".join(rows))
    written[out / "toolkit.py"] = toolkit()
    written.update({out / name: (HERE / name).read_text() for name in CHECKER})
    edited = [path for path, text in written.items() if path.is_file() and path.read_text() != text]
    if edited and not force:  # every file it would write: stubs, README, toolkit and checker
        shown = ", ".join(str(path.relative_to(folder)) for path in edited)
        raise Refused(f"{folder} holds {shown}, which differ from the handout (someone's answers or changes?); hand "
                      "out into a new folder, or add --force to overwrite them")
    try:
        out.mkdir(parents=True, exist_ok=True)
        for path, text in written.items():
            path.write_text(text)
    except OSError as e:  # a parent that is a file, a read-only place
        raise Refused(f"cannot write the handout into {folder}: {e.strerror}; give a folder you can write to") from None
    return list(written)


def main(argv: list[str]) -> int:
    if "-h" in argv or "--help" in argv:
        print(__doc__)
        return 0
    unknown = [a for i, a in enumerate(argv) if a not in ("--handout", "--force", "--check")
               and not (i > 0 and argv[i - 1] == "--handout")]
    if unknown:
        print(f"error: unknown argument {unknown[0]!r}; see python exercises/make.py --help", file=sys.stderr)
        return 2
    if "--handout" in argv:
        i = argv.index("--handout")
        if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
            print("error: --handout needs a folder: python exercises/make.py --handout DIR", file=sys.stderr)
            return 2
        try:
            paths = handout(Path(argv[i + 1]), force="--force" in argv)
        except Refused as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        for path in paths:
            print(f"wrote {path}")
        return 0
    stale, kept = [], []
    for topic in TOPICS:
        path, text = HERE / f"{topic}.py", render(topic)
        old = path.read_text() if path.exists() else None
        if old == text:
            continue
        if "--check" in argv:
            stale.append(path.name)
        elif old is not None and not unedited(old) and "--force" not in argv:
            kept.append(path.name)
        else:
            path.write_text(text)
            print(f"wrote {path.relative_to(ROOT)}")
    if stale:
        print(f"error: {', '.join(stale)} differ from what `python exercises/make.py` writes from the reference code",
              file=sys.stderr)
        return 1
    if kept:
        print(f"error: {', '.join(kept)} have been edited since make.py wrote them (your answers?) and were left as "
              "they are. Copy them elsewhere first, then run `python exercises/make.py --force` to overwrite them; "
              "`python exercises/check.py --from FOLDER` grades the copies.", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
